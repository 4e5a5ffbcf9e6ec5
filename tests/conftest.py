"""
Settings for the whole suite.

Hypothesis's per-example deadline (200 ms) measures the machine, not the
code: on a shared CI runner a slow example failed a run that asserted
nothing about speed. Property tests here assert behaviour only, so no
deadline (speed lives in bench/).
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "mtlsproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("mtlsproxy")
