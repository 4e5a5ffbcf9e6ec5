"""twistd drop-in: ``twistd mtlsproxy`` finds the service maker through this one declaration."""

from twisted.application.service import ServiceMaker

mtlsproxy = ServiceMaker(
    "mtlsproxy",
    "mtlsproxy.tap",
    "TLS-terminating reverse proxy that requires client certificates",
    "mtlsproxy",
)
