"""
Settings for the whole suite.

Hypothesis's per-example deadline (200 ms) measures the machine, not the
code: on a shared CI runner a slow example failed a run that asserted
nothing about speed. Property tests here assert behaviour only, so no
deadline (speed lives in bench/).
"""

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

from . import certfactory

settings.register_profile(
    "mtlsproxy", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("mtlsproxy")


@pytest.fixture(scope="module")
def client_cert() -> Any:
    """A client certificate (CN alice) for the in-memory proxy tests."""
    return certfactory.make_client(certfactory.make_ca(), "alice").cert


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    """The C{line} of every access-log event while the test runs."""
    lines: list[str] = []

    def observe(event: Any) -> None:
        if event.get("log_namespace") == "mtlsproxy.access":
            lines.append(event["line"])

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)
