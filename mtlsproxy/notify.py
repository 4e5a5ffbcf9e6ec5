"""
sd_notify(3) without libsystemd: tell the service manager how start-up,
reload and shutdown are going.

With C{Type=notify}, systemd considers the service started only once it
receives C{READY=1}, so C{systemctl start} (and units ordered after the proxy)
wait until the port is really open, and a start-up error shows as a failed
start instead of a service that looked fine for a moment.  Around a reload
C{RELOADING=1} ... C{READY=1} makes C{systemctl reload} report the reload's
span; C{STOPPING=1} tells systemd the SIGTERM was understood and draining has
begun.

The protocol is one datagram per message on the C{AF_UNIX} socket named by
C{NOTIFY_SOCKET}; a name starting with C{@} is in the abstract namespace.
When the variable is unset (not run by systemd, or C{Type=simple}) every call
is a no-op, so callers never need to check.  Notification is best effort: a
failure to send must never take the proxy down, so errors are returned, not
raised.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

NOTIFY_SOCKET = "NOTIFY_SOCKET"

READY = "READY=1"
RELOADING = "RELOADING=1"
STOPPING = "STOPPING=1"


def socket_address(value: str) -> str | bytes | None:
    """
    The C{AF_UNIX} address named by a C{NOTIFY_SOCKET} value.

    C{@name} is the abstract socket C{"\\0name"} (Linux); an absolute path is a
    socket file.  Anything else (systemd's C{vsock:} addresses, garbage) is
    C{None}: not something this module can send to.
    """
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode("utf-8", "surrogateescape")
    if value.startswith("/"):
        return value
    return None


def notify(state: str, environ: Mapping[str, str] = os.environ) -> bool:
    """
    Send C{state} (C{"READY=1"}, C{"STATUS=..."}, several separated by
    newlines) to the service manager.

    @return: whether the message was sent; C{False} when C{NOTIFY_SOCKET} is
        unset, unusable or the send failed.  Never raises.
    """
    value = environ.get(NOTIFY_SOCKET)
    if not value:
        return False
    address = socket_address(value)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def ready(status: str | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """The service is up: listening, certificates loaded (and a reload is over)."""
    return notify(_with_status(READY, status), environ)


def reloading(status: str | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """
    A reload has begun; follow it with L{ready} whatever its outcome.

    C{MONOTONIC_USEC} goes with it because systemd 253 and later require it
    for C{Type=notify-reload} and older versions ignore it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(_with_status(f"{RELOADING}\nMONOTONIC_USEC={usec}", status), environ)


#: the C{STATUS=} after a reload that worked: it replaces a failure's status
RELOAD_OK = "serving; last reload succeeded"


def reload_status(error: str | None) -> str:
    """
    The C{STATUS=} to send with the C{READY=1} that ends a reload.

    A failed reload still ends in C{READY=1} (the old material keeps
    serving), so the status line is the only place C{systemctl status} can
    show that the new certificates were not taken.  A success sends a status
    too, or the last failure's would stay on display.
    """
    if error is None:
        return RELOAD_OK
    return f"reload failed, keeping the current certificates: {error}"


def stopping(status: str | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Shutdown has begun (SIGTERM received, connections draining)."""
    return notify(_with_status(STOPPING, status), environ)


def status(text: str, environ: Mapping[str, str] = os.environ) -> bool:
    """A one-line status that C{systemctl status} shows."""
    return notify(_with_status(None, text), environ)


def _with_status(state: str | None, status: str | None) -> str:
    lines = [] if state is None else [state]
    if status:
        # One message per line: a newline in the text would start a new field.
        lines.append("STATUS=" + " ".join(status.splitlines()))
    return "\n".join(lines)
