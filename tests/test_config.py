"""Command line + TOML -> Config: every problem names the option or key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlsproxy.config import build_config, parse_backend
from mtlsproxy.errors import ConfigError

BASE = {"backend": "http://127.0.0.1:8080", "cert": "c.pem", "key": "k.pem", "ca": "ca.pem"}


def test_defaults_follow_the_interface() -> None:
    """Defaults are the documented ones."""
    config = build_config(BASE)
    assert config.listen == "tcp:8443"
    assert config.client_auth == "required"
    assert config.min_tls == "1.2"
    assert (config.handshake_timeout, config.idle_timeout) == (10, 60)
    assert (config.backend_connect_timeout, config.backend_timeout) == (5, 60)
    assert config.max_header_bytes == 65536
    assert config.workers == 1 and config.shutdown_timeout == 10


@pytest.mark.parametrize(
    ("value", "host", "port", "path"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1", 8080, None),
        ("http://app.internal", "app.internal", 80, None),
        ("http://[::1]:9000/", "::1", 9000, None),
        ("unix:/run/app.sock", None, None, "/run/app.sock"),
    ],
)
def test_backend_forms(value: str, host: str | None, port: int | None, path: str | None) -> None:
    """http://HOST:PORT and unix:/path are understood."""
    backend = parse_backend(value)
    assert (backend.host, backend.port, backend.path) == (host, port, path)


@pytest.mark.parametrize(
    "value", ["https://app:443", "app:8080", "http://app:80/base", "unix:", "http://:80", "http://a:x"]
)
def test_bad_backends_are_refused(value: str) -> None:
    """Anything but plain http://HOST:PORT or unix:/path is a start-up error naming --backend."""
    with pytest.raises(ConfigError) as e:
        parse_backend(value)
    assert str(e.value).startswith("--backend: ")


def test_missing_backend_is_named() -> None:
    """--backend is required."""
    with pytest.raises(ConfigError, match="^--backend: is required"):
        build_config({k: v for k, v in BASE.items() if k != "backend"})


def test_no_trust_anchor_is_an_error_not_trust_everyone() -> None:
    """Without --ca or --truststore the proxy refuses to start."""
    with pytest.raises(ConfigError, match="^--ca: .*never falls back"):
        build_config({k: v for k, v in BASE.items() if k != "ca"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"client-auth": "maybe"}, "--client-auth: must be 'required' or 'optional'"),
        ({"min-tls": "1.1"}, "--min-tls: must be '1.2' or '1.3'"),
        ({"idle-timeout": "-1"}, "--idle-timeout: must be a positive number"),
        ({"idle-timeout": "soon"}, "--idle-timeout: expected a number"),
        ({"max-header-bytes": "0"}, "--max-header-bytes: must be at least 1"),
        ({"keystore": "k.p12"}, "--keystore: give either"),
        ({"truststore": "t.p12"}, "--truststore: give either"),
        ({"allow-san": ["alice"]}, "--allow-san: 'alice' must start with"),
    ],
)
def test_bad_values_name_the_option(extra: dict[str, object], message: str) -> None:
    """Each bad value is reported with its option name."""
    with pytest.raises(ConfigError) as e:
        build_config({**BASE, **extra})
    assert str(e.value).startswith(message)


def test_cert_without_key() -> None:
    """--cert and --key go together."""
    with pytest.raises(ConfigError, match="^--key: is required together with --cert"):
        build_config({k: v for k, v in BASE.items() if k != "key"})


def test_toml_file_and_command_line_precedence(tmp_path: Path) -> None:
    """The file supplies values; the command line wins; lists come from TOML arrays."""
    f = tmp_path / "p.toml"
    f.write_text(
        'listen = "tcp:9443"\nbackend = "http://127.0.0.1:1"\ncert = "c"\nkey = "k"\nca = "a"\n'
        'crl = ["one.pem", "two.pem"]\nidle-timeout = 5\nallow-cn = ["alice"]\n'
    )
    config = build_config({"backend": "http://127.0.0.1:2"}, f)
    assert config.backend.port == 2
    assert config.listen == "tcp:9443"
    assert config.crl == (Path("one.pem"), Path("two.pem"))
    assert config.idle_timeout == 5.0
    assert config.allow_cn == ("alice",)


def test_unknown_toml_key_names_key_and_file(tmp_path: Path) -> None:
    """A typo in the file is an error naming the key and the file."""
    f = tmp_path / "p.toml"
    f.write_text('backnd = "http://x:1"\n')
    with pytest.raises(ConfigError) as e:
        build_config({}, f)
    assert str(e.value) == f"{f}: unknown key 'backnd'"


def test_wrong_toml_type_names_key_and_file(tmp_path: Path) -> None:
    """A wrong type in the file names the key and the file."""
    f = tmp_path / "p.toml"
    f.write_text('backend = "http://x:1"\ncert = "c"\nkey = "k"\nca = "a"\nworkers = "two"\n')
    with pytest.raises(ConfigError) as e:
        build_config({}, f)
    assert str(e.value).startswith(f"{f}: workers: expected a whole number")


def test_invalid_toml(tmp_path: Path) -> None:
    """A file that is not TOML is reported with --config and the parser's position."""
    f = tmp_path / "p.toml"
    f.write_text("backend = \n")
    with pytest.raises(ConfigError, match="^--config: .*not valid TOML"):
        build_config({}, f)


def test_password_file_trailing_newline_is_stripped(tmp_path: Path) -> None:
    """The keystore password file's trailing newline is not part of the password."""
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    config = build_config(
        {"backend": "http://a:1", "keystore": "k.p12", "keystore-password-file": str(pw), "ca": "c"}
    )
    assert config.keystore_password == b"s3cret"


def test_password_from_environment() -> None:
    """MTLSPROXY_TRUSTSTORE_PASSWORD is used when no file is given."""
    config = build_config(
        {"backend": "http://a:1", "cert": "c", "key": "k", "truststore": "t.p12"},
        environ={"MTLSPROXY_TRUSTSTORE_PASSWORD": "pw"},
    )
    assert config.truststore_password == b"pw"


def test_missing_password_file_is_named(tmp_path: Path) -> None:
    """A password file that does not exist is a start-up error naming the option."""
    with pytest.raises(ConfigError, match="^--keystore-password-file: .*no such file"):
        build_config(
            {"backend": "http://a:1", "keystore": "k", "ca": "c",
             "keystore-password-file": str(tmp_path / "nope")}
        )
