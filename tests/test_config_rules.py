"""
The identity and access-control options of the configuration: verify-depth,
forward-cert, forward-headers, allow-san patterns and [[rule]] tables, and the
sample etc/mtlsproxy.toml.  Every problem names the key and the file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mtlsproxy.config import OPTIONS, REPEATABLE, TOML_ONLY, build_config
from mtlsproxy.errors import ConfigError
from mtlsproxy.identity import DEFAULT_FORWARD_HEADERS, HeaderSettings
from mtlsproxy.policy import AllowRule

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "etc" / "mtlsproxy.toml"

BASE = {"backend": "http://127.0.0.1:8080", "cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}
BASE_TOML = 'backend = "http://127.0.0.1:8080"\ncert = "c.pem"\nkey = "k.pem"\nca = "ca.pem"\n'


def toml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc.toml"
    path.write_text(BASE_TOML + text)
    return path


def error_of(tmp_path: Path, text: str) -> str:
    path = toml_file(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        build_config({}, path)
    return str(e.value).removeprefix(f"{path}: ")


# -- new options ----------------------------------------------------------


def test_defaults() -> None:
    """verify-depth 10, no certificate forwarded, the eight identity headers, no rules."""
    config = build_config(BASE)
    assert config.verify_depth == 10
    assert config.forward_cert == "none"
    assert config.forward_headers == DEFAULT_FORWARD_HEADERS
    assert config.rules == ()
    assert config.header_settings() == HeaderSettings()
    assert not config.policy().restricts


def test_new_options_are_command_line_options() -> None:
    """tap.py makes twistd options from OPTIONS: the new ones are there, forward-headers repeats."""
    assert {"verify-depth", "forward-cert", "forward-headers"} <= set(OPTIONS)
    assert "forward-headers" in REPEATABLE
    assert "rule" in TOML_ONLY and "rule" not in OPTIONS


@pytest.mark.parametrize(("value", "depth"), [("0", 0), ("3", 3), (100, 100)])
def test_verify_depth(value: object, depth: int) -> None:
    """0 (clients issued by a trusted CA directly) up to 100."""
    assert build_config({**BASE, "verify-depth": value}).verify_depth == depth


@pytest.mark.parametrize("value", ["-1", "101", "two", "1.5", True])
def test_bad_verify_depth(value: object) -> None:
    """Anything else is an error naming --verify-depth."""
    with pytest.raises(ConfigError, match="^--verify-depth: "):
        build_config({**BASE, "verify-depth": value})


@pytest.mark.parametrize("mode", ["none", "pem", "xfcc", "rfc9440"])
def test_forward_cert(mode: str) -> None:
    """The four forms of --forward-cert."""
    config = build_config({**BASE, "forward-cert": mode})
    assert config.header_settings().forward_cert == mode


def test_bad_forward_cert() -> None:
    """An unknown form names the option and the choices."""
    message = "^--forward-cert: must be one of none, pem, xfcc, rfc9440"
    with pytest.raises(ConfigError, match=message):
        build_config({**BASE, "forward-cert": "der"})


def test_forward_headers_from_command_line() -> None:
    """Repeated or comma-separated, short names or header names."""
    config = build_config({**BASE, "forward-headers": ["cn,fingerprint", "X-Client-Cert-SAN"]})
    assert config.forward_headers == ("cn", "fingerprint", "san")


def test_forward_headers_empty_list_in_file(tmp_path: Path) -> None:
    """forward-headers = [] sends no identity header at all (X-Client-Cert-* are still stripped)."""
    config = build_config({}, toml_file(tmp_path, "forward-headers = []\n"))
    assert config.header_settings().headers == ()


def test_bad_forward_header_names_key_and_file(tmp_path: Path) -> None:
    """A typo in the file names the key and the file."""
    assert error_of(tmp_path, 'forward-headers = ["cn", "subjekt"]\n').startswith(
        "forward-headers: unknown header 'subjekt'"
    )


# -- allow-san ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("alice", "'alice' must start with DNS:, URI:, email: or IP:"),
        ("DNS:*.com", "too few host components"),
        ("DNS:a*.example.com", "whole left-most label"),
        ("IP:10.0.0.1/8", "not an IP address or network"),
    ],
)
def test_bad_allow_san(value: str, message: str) -> None:
    """allow-san patterns are checked at start-up, not at the first request."""
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, "allow-san": [value]})
    assert str(e.value).startswith("--allow-san: ") and message in str(e.value)


@pytest.mark.parametrize("name", ["allow-cn", "allow-ou"])
def test_empty_allowed_name_is_refused(name: str) -> None:
    """allow-cn = [""] would admit a certificate with an empty CN: refused."""
    with pytest.raises(ConfigError, match=f"^--{name}: an empty name"):
        build_config({**BASE, name: ["alice", ""]})


def test_listener_policy_from_allow_options() -> None:
    """The allow-* options make the listener-wide rule."""
    config = build_config(
        {**BASE, "allow-cn": ["alice"], "allow-ou": ["ops"], "allow-san": ["DNS:*.example.com"]}
    )
    listener = config.policy().listener
    assert listener.path is None
    assert listener.cn == {"alice"} and listener.ou == {"ops"}
    assert [p.text for p in listener.san] == ["DNS:*.example.com"]


# -- [[rule]] -------------------------------------------------------------


def test_rules_are_read(tmp_path: Path) -> None:
    """[[rule]] tables become AllowRules, paths normalised, single strings accepted as lists."""
    config = build_config(
        {},
        toml_file(
            tmp_path,
            '[[rule]]\npath = "/admin/"\nallow-cn = ["root"]\n'
            '[[rule]]\npath = "/api"\nallow-san = "URI:spiffe://example.com/api"\n'
            '[[rule]]\npath = "/public"\n',
        ),
    )
    assert [r.path for r in config.rules] == ["/admin", "/api", "/public"]
    assert config.rules[0] == AllowRule(path="/admin", cn=frozenset({"root"}))
    assert config.rules[1].san[0].text == "URI:spiffe://example.com/api"
    assert not config.rules[2].restricts
    policy = config.policy()
    assert policy.rule_for("/admin/x").path == "/admin"
    assert policy.restricts


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\npath = "admin"\n', 'rule[1].path: must start with "/"'),
        ('[[rule]]\npath = "/a"\n[[rule]]\npath = "admin"\n', 'rule[2].path: must start with "/"'),
        ('[[rule]]\nallow-cn = ["x"]\n', "rule[1]: needs a path"),
        ('[[rule]]\npath = 3\n', "rule[1].path: expected a non-empty string"),
        ('[[rule]]\npath = "/a"\nallow_cn = ["x"]\n', "rule[1].allow_cn: unknown key"),
        ('[[rule]]\npath = "/a"\nallow-cn = [1]\n', "rule[1].allow-cn: expected a list of strings"),
        ('[[rule]]\npath = "/a"\nallow-san = ["bob"]\n', "rule[1].allow-san: 'bob' must start"),
        ('[[rule]]\npath = "/a/../b"\n', "rule[1].path: '/a/../b' is not in normal form"),
        ('[[rule]]\npath = "/a%2Fb"\n', "rule[1].path: '/a%2Fb' is not a valid path"),
        (
            '[[rule]]\npath = "/a"\n[[rule]]\npath = "/a/"\n',
            "rule[2].path: '/a' already has a rule (rule[1])",
        ),
        ('[[rule]]\npath = "/a"\nallow-cn = []\n', "rule[1].allow-cn: is empty; leave the key out"),
        ('[[rule]]\npath = "/a"\nallow-ou = [""]\n', "rule[1].allow-ou: an empty name"),
        ('rule = "x"\n', "rule: must be [[rule]] tables"),
        ("rule = [1]\n", "rule: must be [[rule]] tables"),
    ],
)
def test_bad_rules_name_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    """Each mistake in a [[rule]] names the table (counted from 1), the key and the file."""
    assert error_of(tmp_path, text).startswith(message)


def test_rule_is_not_a_command_line_option() -> None:
    """Rules live in the file only."""
    with pytest.raises(ConfigError, match="^--rule: unknown option"):
        build_config({**BASE, "rule": "/admin"})


# -- the sample configuration --------------------------------------------

_EXAMPLE = re.compile(r"^#([a-z][a-z0-9-]*) = (.*)$")


def _examples() -> list[tuple[str, Any]]:
    """The #name = value examples of the sample, outside the [[rule]] examples."""
    found = []
    in_rules = False
    for line in SAMPLE.read_text().splitlines():
        in_rules = line == "#[[rule]]" or (in_rules and line.startswith("#"))
        match = _EXAMPLE.match(line)
        if match and not in_rules:
            found.append((match.group(1), tomllib.loads(f"v = {match.group(2)}")["v"]))
    return found


def test_sample_configuration_parses() -> None:
    """etc/mtlsproxy.toml, as shipped, is a valid configuration with the documented defaults."""
    config = build_config({}, SAMPLE)
    defaults = build_config(BASE)
    for name in ("listen", "client_auth", "min_tls", "verify_depth", "forward_cert",
                 "forward_headers", "handshake_timeout", "idle_timeout",
                 "backend_connect_timeout", "backend_timeout", "max_header_bytes", "workers",
                 "shutdown_timeout", "rules"):
        assert getattr(config, name) == getattr(defaults, name), name


def test_sample_configuration_explains_every_option() -> None:
    """Each option appears in the sample, set or as a #example, and each example is valid."""
    text = SAMPLE.read_text()
    for name in OPTIONS:
        assert re.search(rf"^#?{re.escape(name)} = ", text, re.MULTILINE), name
    examples = dict(_examples())
    assert {"keystore", "truststore", "crl", "allow-cn", "allow-san", "metrics"} <= set(examples)


@pytest.mark.parametrize(("name", "value"), _examples(), ids=[n for n, _ in _examples()])
def test_sample_examples_are_valid(tmp_path: Path, name: str, value: Any) -> None:
    """Uncommenting any one #example of the sample gives a valid configuration."""
    given = dict(BASE)
    if name.startswith("keystore"):
        given = {k: v for k, v in given.items() if k not in ("cert", "key")}
        given["keystore"] = "k.p12"
    if name.startswith("truststore"):
        given = {k: v for k, v in given.items() if k != "ca"}
        given["truststore"] = "t.p12"
    if name.endswith("password-file"):
        (tmp_path / "pass").write_text("secret\n")
        value = str(tmp_path / "pass")
    build_config({**given, name: value})


def test_sample_rule_examples_are_valid(tmp_path: Path) -> None:
    """The commented [[rule]] tables of the sample, uncommented, parse and decide as described."""
    lines = SAMPLE.read_text().splitlines()
    start = lines.index("#[[rule]]")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[1:])
    config = build_config({}, toml_file(tmp_path, "\n".join(block) + "\n"))
    assert [r.path for r in config.rules] == ["/admin", "/admin/audit", "/status"]
    policy = config.policy()
    assert policy.rule_for("/admin/audit/log").path == "/admin/audit"
    assert policy.rule_for("/administrator").path is None
