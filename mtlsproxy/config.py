"""
Command line and TOML file -> one frozen, fully validated L{Config}.

Everything here is pure: no reactor, no sockets.  Files are only opened to
read password files and the TOML file; certificates are loaded by
L{mtlsproxy.certs}.  Each check names the option (or the TOML key and file)
so that the operator's one line on stderr says what to fix.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError
from .identity import (
    DEFAULT_FORWARD_HEADERS,
    FORWARD_CERT_MODES,
    ForwardCert,
    HeaderSettings,
    parse_header_names,
)
from .policy import AllowRule, Policy, parse_san_pattern

KEYSTORE_PASSWORD_ENV = "MTLSPROXY_KEYSTORE_PASSWORD"
TRUSTSTORE_PASSWORD_ENV = "MTLSPROXY_TRUSTSTORE_PASSWORD"


@dataclass(frozen=True)
class Backend:
    """
    Where the plain-HTTP application listens.

    @ivar url: the value as the operator wrote it, for messages.
    @ivar host: host name or address for C{http://} backends.
    @ivar port: TCP port for C{http://} backends.
    @ivar path: socket path for C{unix:} backends.
    """

    url: str
    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def parse_backend(value: str, option: str = "--backend") -> Backend:
    """
    Parse C{http://HOST:PORT} or C{unix:/path}.

    Only plain HTTP is accepted: the backend is a legacy application on the same
    host or network, and a silently ignored C{https://} would be a surprise.
    """
    if value.startswith("unix:"):
        path = value[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise ConfigError(option, f"{value!r} names no socket path (use unix:/path/to/socket)")
        return Backend(url=value, path=path)
    parts = urlsplit(value)
    if parts.scheme != "http":
        raise ConfigError(
            option,
            f"{value!r} is not http://HOST:PORT or unix:/path "
            "(the backend is spoken to in plain HTTP)",
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            option,
            f"{value!r} has a path; the client's path is forwarded unchanged, give only HOST:PORT",
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(option, f"{value!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(option, f"{value!r} names no host")
    return Backend(url=value, host=parts.hostname, port=port if port is not None else 80)


@dataclass(frozen=True)
class Config:
    """
    The validated configuration of one proxy.

    Passwords are resolved (from their file or the environment) when the
    configuration is built, so that a missing password file is a start-up error.
    """

    backend: Backend
    listen: str = "tcp:8443"
    cert: Path | None = None
    key: Path | None = None
    keystore: Path | None = None
    keystore_password: bytes | None = field(default=None, repr=False)
    ca: Path | None = None
    truststore: Path | None = None
    truststore_password: bytes | None = field(default=None, repr=False)
    crl: tuple[Path, ...] = ()
    client_auth: Literal["required", "optional"] = "required"
    allow_cn: tuple[str, ...] = ()
    allow_ou: tuple[str, ...] = ()
    allow_san: tuple[str, ...] = ()
    min_tls: Literal["1.2", "1.3"] = "1.2"
    handshake_timeout: float = 10.0
    idle_timeout: float = 60.0
    backend_connect_timeout: float = 5.0
    backend_timeout: float = 60.0
    max_header_bytes: int = 65536
    metrics: str | None = None
    workers: int = 1
    shutdown_timeout: float = 10.0
    reload_interval: float | None = None
    max_connections: int = 4096
    keystore_password_file: Path | None = None
    truststore_password_file: Path | None = None
    verify_depth: int = 10
    forward_cert: ForwardCert = "none"
    forward_headers: tuple[str, ...] = DEFAULT_FORWARD_HEADERS
    rules: tuple[AllowRule, ...] = ()
    config_file: Path | None = None

    def policy(self) -> Policy:
        """
        The access policy: the listener-wide rule from C{allow-*} and the
        C{[[rule]]} tables (validated when the configuration was built).
        """
        listener = AllowRule.build(None, self.allow_cn, self.allow_ou, self.allow_san)
        return Policy(listener=listener, rules=self.rules)

    def header_settings(self) -> HeaderSettings:
        """Which identity headers, and which form of the certificate, the backend receives."""
        return HeaderSettings(headers=self.forward_headers, forward_cert=self.forward_cert)


#: option name (as on the command line, without dashes) -> kind of value
OPTIONS: dict[str, str] = {
    "listen": "str",
    "backend": "str",
    "cert": "path",
    "key": "path",
    "keystore": "path",
    "keystore-password-file": "path",
    "ca": "path",
    "truststore": "path",
    "truststore-password-file": "path",
    "crl": "paths",
    "client-auth": "str",
    "allow-cn": "strs",
    "allow-ou": "strs",
    "allow-san": "strs",
    "min-tls": "str",
    "handshake-timeout": "seconds",
    "idle-timeout": "seconds",
    "backend-connect-timeout": "seconds",
    "backend-timeout": "seconds",
    "max-header-bytes": "count",
    "metrics": "str",
    "workers": "count",
    "shutdown-timeout": "seconds",
    "reload-interval": "seconds",
    "max-connections": "count",
    "verify-depth": "depth",
    "forward-cert": "str",
    "forward-headers": "strs",
}

#: Keys only the TOML file can hold (tables, not options).
TOML_ONLY = frozenset({"rule"})

#: Keys of a C{[[rule]]} table.
RULE_KEYS = ("path", "allow-cn", "allow-ou", "allow-san")

#: Most intermediate CAs C{--verify-depth} accepts; OpenSSL's own limit is
#: far above anything a real PKI needs.
MAX_VERIFY_DEPTH = 100

REPEATABLE = frozenset(name for name, kind in OPTIONS.items() if kind in ("paths", "strs"))


def load_toml(path: Path) -> dict[str, Any]:
    """
    Read a TOML configuration file into a raw option mapping.

    Values keep their TOML types; L{build_config} checks them, naming the key and file.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError("--config", f"{path}: permission denied") from None
    except IsADirectoryError:
        raise ConfigError("--config", f"{path}: is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path}: not valid TOML: {e}") from None
    for key in data:
        if key not in OPTIONS and key not in TOML_ONLY:
            raise ConfigError(None, f"unknown key {key!r}", source=str(path))
    return data


def _read_password(option: str, path: Path, source: str | None) -> bytes:
    """The file's content with its trailing newline stripped, as the interface says."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(option, f"{path}: no such file", source) from None
    except PermissionError:
        raise ConfigError(option, f"{path}: permission denied", source) from None
    except IsADirectoryError:
        raise ConfigError(option, f"{path}: is a directory", source) from None
    return raw.rstrip(b"\r\n")


def _toml_type(value: Any) -> str:
    """What a TOML value is, in the words of the TOML spec, for error messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "date/time"


def _toml_text(value: Any) -> str:
    """A TOML value as it would be written in the file (near enough for a message)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_text(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{...}"
    return str(value.isoformat()) if hasattr(value, "isoformat") else repr(value)


def _check_toml_type(name: str, kind: str, value: Any, source: str) -> None:
    """
    Refuse a TOML value whose type does not fit the option's kind.

    The command line only has strings, so L{_coerce} parses them; a TOML file
    has types, and C{workers = "2"} or C{workers = 2.0} is a mistake worth
    saying rather than guessing at (the same file read by another tool, or a
    later version, would not guess the same).  A float option takes an
    integer (C{idle-timeout = 5}); an integer option takes no float.
    """
    kind_types: dict[str, tuple[tuple[type, ...], str]] = {
        "str": ((str,), "a string"),
        "path": ((str,), "a string (a file name)"),
        # A single string is one entry, as in [[rule]] tables.
        "strs": ((list, str), "an array of strings"),
        "paths": ((list, str), "an array of strings (file names)"),
        "seconds": ((int, float), "a number of seconds"),
        "count": ((int,), "a whole number"),
        "depth": ((int,), "a whole number"),
    }
    types, wanted = kind_types[kind]
    fits = isinstance(value, types) and not isinstance(value, bool)
    if fits and isinstance(value, list):
        fits = all(isinstance(v, str) for v in value)
    if fits:
        return
    raise ConfigError(
        name,
        f"expected {wanted}, got the TOML {_toml_type(value)} {_toml_text(value)}"
        + _number_hint(name, kind, value),
        source,
    )


def _number_hint(name: str, kind: str, value: Any) -> str:
    """How the operator surely meant to write a number, when that is clear; else ''."""
    if name == "min-tls" and isinstance(value, float) and str(value) in ("1.2", "1.3"):
        return f' (a version is a string: write min-tls = "{value}")'
    if kind not in ("seconds", "count", "depth") or not isinstance(value, str | float):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    if kind == "seconds" and isinstance(value, str):
        return f" (write {name} = {value.strip()}, without quotes)"
    if kind != "seconds" and number.is_integer():
        return f" (write {name} = {int(number)})"
    return ""


def _coerce(name: str, value: Any, source: str | None) -> Any:
    """
    Check one raw value against its option's kind and convert it.

    @param source: the TOML file the value comes from (its types must fit,
        see L{_check_toml_type}), or C{None} for the command line (strings,
        parsed here).
    """
    kind = OPTIONS[name]
    option = f"--{name}" if source is None else name
    if source is not None:
        _check_toml_type(name, kind, value, source)

    def fail(problem: str) -> ConfigError:
        return ConfigError(option, problem, source=source)

    if kind in ("paths", "strs"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise fail(f"expected a list of strings, got {value!r}")
        if kind == "paths":
            return tuple(Path(v) for v in value)
        return tuple(value)
    if kind in ("str", "path"):
        if not isinstance(value, str) or not value:
            raise fail(f"expected a non-empty string, got {value!r}")
        return Path(value) if kind == "path" else value
    if kind == "seconds":
        if isinstance(value, bool):
            raise fail(f"expected a number of seconds, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise fail(f"expected a number of seconds, got {value!r}") from None
        if not number > 0 or number == float("inf"):
            raise fail(f"must be a positive number of seconds, got {value!r}")
        return number
    if kind == "count":
        if isinstance(value, bool):
            raise fail(f"expected a whole number, got {value!r}")
        try:
            count = int(value)
        except (TypeError, ValueError):
            raise fail(f"expected a whole number, got {value!r}") from None
        if isinstance(value, float) and count != value:
            raise fail(f"expected a whole number, got {value!r}")
        if count < 1:
            raise fail(f"must be at least 1, got {value!r}")
        return count
    if kind == "depth":
        if isinstance(value, bool):
            raise fail(f"expected a whole number, got {value!r}")
        try:
            depth = int(value)
        except (TypeError, ValueError):
            raise fail(f"expected a whole number, got {value!r}") from None
        if isinstance(value, float) and depth != value:
            raise fail(f"expected a whole number, got {value!r}")
        if not 0 <= depth <= MAX_VERIFY_DEPTH:
            raise fail(f"must be between 0 and {MAX_VERIFY_DEPTH}, got {value!r}")
        return depth
    raise AssertionError(kind)  # pragma: no cover


def build_config(
    command_line: Mapping[str, Any],
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """
    Merge the TOML file (if any) and the command line, then validate everything.

    @param command_line: option name (without dashes) -> value, only for the
        options the operator actually gave; repeatable ones as lists.
    @param config_file: the C{--config} file, read here.
    @raise ConfigError: naming the option or key that is wrong.
    """
    merged: dict[str, Any] = {}
    sources: dict[str, str | None] = {}
    rules: tuple[AllowRule, ...] = ()
    if config_file is not None:
        for name, value in load_toml(config_file).items():
            if name == "rule":
                rules = _parse_rules(value, str(config_file))
                continue
            merged[name] = _coerce(name, value, str(config_file))
            sources[name] = str(config_file)
    for name, value in command_line.items():
        if name not in OPTIONS:
            raise ConfigError(f"--{name}", "unknown option")
        merged[name] = _coerce(name, value, None)
        sources[name] = None

    def option(name: str) -> str:
        return f"--{name}" if sources.get(name) is None else name

    def fail(name: str, problem: str) -> ConfigError:
        return ConfigError(option(name), problem, source=sources.get(name))

    if "backend" not in merged:
        raise ConfigError("--backend", "is required (http://HOST:PORT or unix:/path)")
    backend = parse_backend(merged["backend"], option("backend"))

    client_auth = merged.get("client-auth", "required")
    if client_auth not in ("required", "optional"):
        raise fail("client-auth", f"must be 'required' or 'optional', got {client_auth!r}")
    min_tls = merged.get("min-tls", "1.2")
    if min_tls not in ("1.2", "1.3"):
        raise fail("min-tls", f"must be '1.2' or '1.3', got {min_tls!r}")

    has_pem = "cert" in merged or "key" in merged
    if has_pem and "keystore" in merged:
        raise fail("keystore", "give either --cert/--key or --keystore, not both")
    if has_pem:
        for name in ("cert", "key"):
            if name not in merged:
                other = "key" if name == "cert" else "cert"
                raise ConfigError(f"--{name}", f"is required together with --{other}")
    elif "keystore" not in merged:
        raise ConfigError(
            "--cert", "the server needs a certificate: give --cert and --key, or --keystore"
        )
    if "ca" in merged and "truststore" in merged:
        raise fail("truststore", "give either --ca or --truststore, not both")
    if "ca" not in merged and "truststore" not in merged:
        raise ConfigError(
            "--ca",
            "client certificates need a trusted CA: give --ca or --truststore "
            "(mtlsproxy never falls back to the system trust store)",
        )
    for name in ("allow-cn", "allow-ou"):
        if "" in merged.get(name, ()):
            raise fail(name, "an empty name would admit certificates with an empty " + name[6:])
    for value in merged.get("allow-san", ()):
        try:
            parse_san_pattern(value)
        except ValueError as e:
            raise fail("allow-san", str(e)) from None

    forward_cert = merged.get("forward-cert", "none")
    if forward_cert not in FORWARD_CERT_MODES:
        raise fail(
            "forward-cert", f"must be one of {', '.join(FORWARD_CERT_MODES)}, got {forward_cert!r}"
        )
    forward_headers = DEFAULT_FORWARD_HEADERS
    if "forward-headers" in merged:
        try:
            forward_headers = parse_header_names(merged["forward-headers"])
        except ValueError as e:
            raise fail("forward-headers", str(e)) from None

    env = os.environ if environ is None else environ

    def password(store: str, env_name: str) -> bytes | None:
        name = f"{store}-password-file"
        if store not in merged:
            return None
        if name in merged:
            return _read_password(option(name), merged[name], sources.get(name))
        value = env.get(env_name)
        return None if value is None else value.encode("utf-8")

    keystore_password = password("keystore", KEYSTORE_PASSWORD_ENV)
    truststore_password = password("truststore", TRUSTSTORE_PASSWORD_ENV)

    return Config(
        backend=backend,
        listen=merged.get("listen", "tcp:8443"),
        cert=merged.get("cert"),
        key=merged.get("key"),
        keystore=merged.get("keystore"),
        keystore_password=keystore_password,
        ca=merged.get("ca"),
        truststore=merged.get("truststore"),
        truststore_password=truststore_password,
        crl=merged.get("crl", ()),
        client_auth=client_auth,
        allow_cn=merged.get("allow-cn", ()),
        allow_ou=merged.get("allow-ou", ()),
        allow_san=merged.get("allow-san", ()),
        min_tls=min_tls,
        handshake_timeout=merged.get("handshake-timeout", 10.0),
        idle_timeout=merged.get("idle-timeout", 60.0),
        backend_connect_timeout=merged.get("backend-connect-timeout", 5.0),
        backend_timeout=merged.get("backend-timeout", 60.0),
        max_header_bytes=merged.get("max-header-bytes", 65536),
        metrics=merged.get("metrics"),
        workers=merged.get("workers", 1),
        shutdown_timeout=merged.get("shutdown-timeout", 10.0),
        reload_interval=merged.get("reload-interval"),
        max_connections=merged.get("max-connections", 4096),
        keystore_password_file=merged.get("keystore-password-file"),
        truststore_password_file=merged.get("truststore-password-file"),
        verify_depth=merged.get("verify-depth", 10),
        forward_cert=forward_cert,
        forward_headers=forward_headers,
        rules=rules,
        config_file=config_file,
    )


def _parse_rules(value: Any, source: str) -> tuple[AllowRule, ...]:
    """
    The C{[[rule]]} tables of a TOML file -> validated L{AllowRule}s.

    Errors name the table by its position, counted from 1 as an operator
    reads the file (C{rule[2].path}), and the file.
    """
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(
            "rule", "must be [[rule]] tables, each with a path and allow-* keys", source
        )
    rules: list[AllowRule] = []
    seen: dict[str, int] = {}
    for index, table in enumerate(value, start=1):
        here = f"rule[{index}]"

        def fail(key: str, problem: str, here: str = here) -> ConfigError:
            return ConfigError(f"{here}.{key}", problem, source)

        for key in table:
            if key not in RULE_KEYS:
                raise fail(key, f"unknown key (a rule takes {', '.join(RULE_KEYS)})")
        if "path" not in table:
            raise ConfigError(here, "needs a path", source)
        path = table["path"]
        if not isinstance(path, str) or not path:
            raise fail("path", f"expected a non-empty string, got {path!r}")
        lists: dict[str, tuple[str, ...]] = {}
        for key in RULE_KEYS[1:]:
            raw = table.get(key, [])
            if isinstance(raw, str):
                raw = [raw]
            if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
                raise fail(key, f"expected a list of strings, got {raw!r}")
            if key in table and not raw:
                # A rule without allow-* keys admits everyone: an empty list
                # meant as "nobody" must not quietly mean that.
                raise fail(key, "is empty; leave the key out to admit every client")
            if "" in raw:
                raise fail(key, "an empty name would admit certificates with an empty " + key[6:])
            lists[key] = tuple(raw)
        for san in lists["allow-san"]:
            try:
                parse_san_pattern(san)
            except ValueError as e:
                raise fail("allow-san", str(e)) from None
        try:
            rule = AllowRule.build(path, lists["allow-cn"], lists["allow-ou"], lists["allow-san"])
        except ValueError as e:
            raise fail("path", str(e)) from None
        assert rule.path is not None
        if rule.path in seen:
            raise fail("path", f"{rule.path!r} already has a rule (rule[{seen[rule.path]}])")
        seen[rule.path] = index
        rules.append(rule)
    return tuple(rules)


def refresh_passwords(config: Config) -> Config:
    """
    The same configuration with its password files read again.

    A reload picks up a renewed keystore together with its new password;
    passwords from the environment cannot change in a running process.
    """
    if config.keystore_password_file is not None:
        config = replace(
            config,
            keystore_password=_read_password(
                "--keystore-password-file", config.keystore_password_file, None
            ),
        )
    if config.truststore_password_file is not None:
        config = replace(
            config,
            truststore_password=_read_password(
                "--truststore-password-file", config.truststore_password_file, None
            ),
        )
    return config
