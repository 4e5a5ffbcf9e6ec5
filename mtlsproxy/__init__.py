"""
mtlsproxy: a TLS-terminating reverse proxy that admits only clients holding a
certificate from a trusted CA, and tells the plain-HTTP application behind it
who they are.
"""

__version__ = "0.1.0"
