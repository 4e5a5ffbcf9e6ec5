"""The units in etc/systemd: `systemd-analyze verify`, and the settings the proxy relies on."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.scripts.twistd import ServerOptions

from mtlsproxy.check import CheckOptions
from mtlsproxy.config import Config, parse_backend

UNITS = Path(__file__).resolve().parent.parent / "etc" / "systemd"
SERVICES = ("mtlsproxy.service", "mtlsproxy@.service")
ALL_UNITS = (*SERVICES, "mtlsproxy.socket")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
#: an executable that exists wherever the tests run, standing in for /usr/bin/twistd
STAND_IN = Path(sys.executable).parent / "twistd"


def directives(name: str) -> dict[str, list[str]]:
    """Every `Key=value` of a unit, keyed by `Section.Key`, values in order (keys may repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def one(name: str, key: str) -> str:
    values = directives(name)[key]
    assert len(values) == 1, (name, key, values)
    return values[0]


def copy_for_verify(tmp_path: Path, uncomment_credentials: bool = False) -> Path:
    """
    The units with ExecStart's binary replaced by one that exists here:
    verify refuses a unit whose command is missing, and /usr/bin/twistd is
    where a system install puts it, not where the tests run.
    """
    target = tmp_path / "units"
    target.mkdir()
    for name in ALL_UNITS:
        text = (UNITS / name).read_text().replace("/usr/bin/twistd", str(STAND_IN))
        if uncomment_credentials:
            text = re.sub(r"^#(LoadCredential=)", r"\1", text, flags=re.MULTILINE)
        (target / name).write_text(text)
    return target


def verify(paths: list[Path]) -> None:
    assert SYSTEMD_ANALYZE is not None
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    # Warnings about our units (unknown keys, bad values) do not change the
    # exit status, so they are looked for in the output; lines about the host's
    # own units are none of our business.
    ours = [
        line for line in output.splitlines()
        if "mtlsproxy" in line or str(paths[0].parent) in line
    ]
    assert proc.returncode == 0 and not ours, output


needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package systemd; "
    "scripts/system-deps.sh installs it)",
)


@needs_systemd_analyze
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """All three units, the template as shipped and as an instance, verify without a warning."""
    units = copy_for_verify(tmp_path)
    shutil.copy(units / "mtlsproxy@.service", units / "mtlsproxy@edge.service")
    verify([units / name for name in (*ALL_UNITS, "mtlsproxy@edge.service")])


@needs_systemd_analyze
def test_units_with_credentials_enabled_verify(tmp_path: Path) -> None:
    """The commented LoadCredential= lines are valid once uncommented, as the README says."""
    units = copy_for_verify(tmp_path, uncomment_credentials=True)
    text = (units / "mtlsproxy.service").read_text()
    assert "\nLoadCredential=keystore-password:/etc/mtlsproxy/keystore.pass" in text
    verify([units / name for name in SERVICES])


@needs_systemd_analyze
def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The verify check is not vacuous: a misspelt setting in our unit fails it."""
    units = copy_for_verify(tmp_path)
    path = units / "mtlsproxy.service"
    path.write_text(path.read_text().replace("Type=notify", "Type=notifyy"))
    with pytest.raises(AssertionError):
        verify([path])


@pytest.mark.parametrize("name", SERVICES)
def test_service_readiness_reload_and_stop(name: str) -> None:
    """Type=notify from the main process, reload by SIGHUP, more stop time than the drain needs."""
    assert one(name, "Service.Type") == "notify"
    assert one(name, "Service.NotifyAccess") == "main"
    assert one(name, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(name, "Service.Restart") == "on-failure"
    stop = one(name, "Service.TimeoutStopSec")
    assert stop.endswith("s") and float(stop[:-1]) > Config(parse_backend("http://x:1")).shutdown_timeout


@pytest.mark.parametrize(("name", "config"), [
    ("mtlsproxy.service", "/etc/mtlsproxy/mtlsproxy.toml"),
    ("mtlsproxy@.service", "/etc/mtlsproxy/%i.toml"),
])
def test_exec_start_is_a_valid_command_line(name: str, config: str) -> None:
    """ExecStart: twistd in the foreground without a pid file, mtlsproxy with options it knows."""
    argv = shlex.split(one(name, "Service.ExecStart"))
    assert argv[0] == "/usr/bin/twistd"
    split = argv.index("mtlsproxy")
    twistd_options = ServerOptions()
    twistd_options.parseOptions(argv[1:split])
    assert twistd_options["nodaemon"] and twistd_options["pidfile"] == ""
    assert argv[split + 1:] == ["--config", config]
    CheckOptions().parseOptions(argv[split + 1:])  # raises on an unknown option


@pytest.mark.parametrize("name", SERVICES)
def test_service_hardening(name: str) -> None:
    """An unprivileged user, a read-only system, and CAP_NET_BIND_SERVICE as the only capability."""
    d = directives(name)
    assert d["Service.DynamicUser"] == ["yes"]
    assert d["Service.User"] == ["mtlsproxy"]
    assert d["Service.ProtectSystem"] == ["strict"]
    assert d["Service.ProtectHome"] == ["yes"]
    assert d["Service.PrivateTmp"] == ["yes"]
    assert d["Service.NoNewPrivileges"] == ["yes"]
    assert d["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert d["Service.AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert d["Service.RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    assert "Service.MemoryDenyWriteExecute" not in d  # cffi callbacks need W+X memory


def test_template_is_per_instance() -> None:
    """Each instance reads its own file and logs under its own identifier."""
    assert one("mtlsproxy@.service", "Service.SyslogIdentifier") == "mtlsproxy@%i"
    assert "%i" in one("mtlsproxy@.service", "Unit.Description")


def test_credentials_are_documented_in_the_unit() -> None:
    """The LoadCredential= example names the path the TOML file must then use."""
    text = (UNITS / "mtlsproxy.service").read_text()
    assert "#LoadCredential=keystore-password:/etc/mtlsproxy/keystore.pass" in text
    assert "/run/credentials/mtlsproxy.service/keystore-password" in text


def test_socket_matches_the_systemd_listen_description() -> None:
    """
    ListenStream is an IPv4 address, as `--listen systemd:domain=INET:index=0`
    needs: a bare port would make an IPv6 socket that Twisted, told INET,
    reads garbage peer addresses from.
    """
    listen = directives("mtlsproxy.socket")["Socket.ListenStream"]
    assert listen == ["0.0.0.0:443"]
    assert one("mtlsproxy.socket", "Socket.Accept") == "no"
    text = (UNITS / "mtlsproxy.socket").read_text()
    assert 'listen = "systemd:domain=INET:index=0"' in text


@pytest.mark.parametrize("name", ALL_UNITS)
def test_units_are_installable(name: str) -> None:
    """Each unit parses as an INI file and has an [Install] section for `systemctl enable`."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read(UNITS / name)
    assert parser.has_option("Install", "WantedBy")


DOCS = UNITS.parent.parent / "README.md"


def _doc_toml_snippets() -> list[str]:
    text = DOCS.read_text()
    fenced = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    heredocs = re.findall(r"tee /etc/mtlsproxy/\S+\.toml.*?<<'EOF'\n(.*?)\nEOF", text, re.DOTALL)
    return fenced + heredocs


def test_docs_configuration_examples_are_valid(tmp_path: Path) -> None:
    """Every TOML example in the README uses only keys the proxy knows."""
    from mtlsproxy.config import load_toml

    snippets = _doc_toml_snippets()
    assert len(snippets) >= 4
    for number, snippet in enumerate(snippets):
        path = tmp_path / f"example{number}.toml"
        path.write_text(snippet)
        load_toml(path)  # raises ConfigError on an unknown key or bad TOML


def test_docs_exec_start_lines_are_valid() -> None:
    """The ExecStart= drop-ins in the README parse as twistd and mtlsproxy options."""
    lines = re.findall(r"^ExecStart=(/\S+twistd .*)$", DOCS.read_text(), flags=re.MULTILINE)
    assert len(lines) >= 2
    for line in lines:
        argv = shlex.split(line)
        split = argv.index("mtlsproxy")
        ServerOptions().parseOptions(argv[1:split])
        CheckOptions().parseOptions(argv[split + 1:])
