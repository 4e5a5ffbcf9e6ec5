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


TOML_BASE = 'backend = "http://x:1"\ncert = "c"\nkey = "k"\nca = "a"\n'


@pytest.mark.parametrize(
    ("line", "message"),
    [
        # integer options: no string, no float (not even a whole one), no boolean
        ('workers = "2"', 'workers: expected a whole number, got the TOML string "2" '
         "(write workers = 2)"),
        ("workers = 2.0", "workers: expected a whole number, got the TOML float 2.0 "
         "(write workers = 2)"),
        ("max-header-bytes = 1.5", "max-header-bytes: expected a whole number, "
         "got the TOML float 1.5"),
        ("verify-depth = true", "verify-depth: expected a whole number, got the TOML boolean true"),
        # float options: a number, not a string or boolean
        ('shutdown-timeout = "10"', 'shutdown-timeout: expected a number of seconds, got the '
         'TOML string "10" (write shutdown-timeout = 10, without quotes)'),
        ("idle-timeout = false", "idle-timeout: expected a number of seconds, "
         "got the TOML boolean false"),
        # strings and file names: strings only
        ("listen = 8443", "listen: expected a string, got the TOML integer 8443"),
        ("crl = true", "crl: expected an array of strings (file names), got the TOML boolean true"),
        ("truststore-password-file = 0", "truststore-password-file: expected a string "
         "(a file name), got the TOML integer 0"),
        ("min-tls = 1.3", 'min-tls: expected a string, got the TOML float 1.3 '
         '(a version is a string: write min-tls = "1.3")'),
        ("metrics = 1979-05-27", "metrics: expected a string, got the TOML date/time 1979-05-27"),
        # lists: arrays of strings
        ("crl = [1]", "crl: expected an array of strings (file names), got the TOML array [1]"),
        ('allow-cn = ["a", true]', 'allow-cn: expected an array of strings, '
         'got the TOML array ["a", true]'),
        ("allow-ou = {x = 1}", "allow-ou: expected an array of strings, got the TOML table {...}"),
    ],
)
def test_toml_types_are_checked_not_converted(tmp_path: Path, line: str, message: str) -> None:
    """
    In the file, a value must have its option's TOML type: nothing is converted
    (a quoted number, a float for a count).  The error is one line naming the
    file and the key, as for an unknown key.
    """
    f = tmp_path / "t.toml"
    f.write_text(TOML_BASE + line + "\n")
    with pytest.raises(ConfigError) as e:
        build_config({}, f)
    assert str(e.value) == f"{f}: {message}"
    assert "\n" not in str(e.value)


def test_toml_numbers_of_the_right_type_are_accepted(tmp_path: Path) -> None:
    """A float option takes a TOML integer or float; an integer option a TOML integer."""
    f = tmp_path / "t.toml"
    f.write_text(
        TOML_BASE + "shutdown-timeout = 3\nidle-timeout = 2.5\nworkers = 1\nverify-depth = 0\n"
        'crl = "one.pem"\n'
    )
    config = build_config({}, f)
    assert config.shutdown_timeout == 3.0 and isinstance(config.shutdown_timeout, float)
    assert config.idle_timeout == 2.5
    assert config.workers == 1 and config.verify_depth == 0
    # a single string is one entry, as in [[rule]] tables
    assert config.crl == (Path("one.pem"),)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"workers": "2"}, ("workers", 2)),
        ({"shutdown-timeout": "10"}, ("shutdown_timeout", 10.0)),
        ({"idle-timeout": "2.5"}, ("idle_timeout", 2.5)),
        ({"verify-depth": "3"}, ("verify_depth", 3)),
    ],
)
def test_command_line_strings_still_parse(
    extra: dict[str, str], expected: tuple[str, object]
) -> None:
    """The command line has only strings: they are parsed as before."""
    config = build_config({**BASE, **extra})
    attribute, value = expected
    assert getattr(config, attribute) == value


@pytest.mark.parametrize("value", ["2.0", "two", "true"])
def test_command_line_count_must_be_whole(value: str) -> None:
    """--workers 2.0 is not a whole number on the command line either."""
    with pytest.raises(ConfigError, match="^--workers: expected a whole number"):
        build_config({**BASE, "workers": value})
