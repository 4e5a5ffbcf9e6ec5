"""End-to-end tests: twistd mtlsproxy, examples/legacy_app.py and real clients as processes."""
