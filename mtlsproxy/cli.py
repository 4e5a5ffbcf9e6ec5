"""
The ``mtlsproxy`` console script: ``mtlsproxy pki ...`` and ``mtlsproxy check ...``.

The proxy itself runs under C{twistd mtlsproxy}; this script holds the tools
around it.  Expected failures never show a traceback: the operator gets one
line, C{mtlsproxy: <what is wrong>}, on stderr and exit status 1 (2 for a
command line argparse cannot parse, as argparse itself does).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TextIO

from . import __version__, pki
from .errors import MtlsProxyError

PROG = "mtlsproxy"


def _days(value: str) -> int:
    """An argparse type: a whole number of days, at least 1 (else a usage error, exit 2)."""
    try:
        days = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of days, got {value!r}"
        ) from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value!r}")
    return days


def _serial(value: str) -> int:
    """An argparse type: a serial in hex as C{pki list} prints it (colons and 0x tolerated)."""
    text = value.replace(":", "").lower().removeprefix("0x")
    try:
        return int(text, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a hexadecimal serial, got {value!r}") from None


def _add_leaf_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--key-type",
        choices=pki.KEY_TYPES,
        default="ec",
        help="key algorithm: ec (P-256, default, instant) or rsa2048/rsa4096 (slow)",
    )
    parser.add_argument(
        "--days",
        type=_days,
        metavar="N",
        help=f"validity of the {what} in days (default and recommended maximum for "
        f"servers: {pki.SERVER_MAX_DAYS}; more prints a warning)",
    )
    parser.add_argument(
        "--p12",
        action="store_true",
        help="also write PKCS#12 keystores (and truststores) with random passwords "
        "in *.pass files, for Java, browsers and --keystore/--truststore",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace existing files instead of refusing"
    )


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; separate from L{main} so that tests and docs can inspect it."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tools for mtlsproxy, the TLS-terminating reverse proxy that requires "
        "client certificates.  The proxy itself runs as: twistd -n mtlsproxy ...",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ``check`` is dispatched before argparse sees it (see main); this entry is
    # here so that ``mtlsproxy --help`` lists it.
    commands.add_parser(
        "check",
        add_help=False,
        help="check a proxy configuration (all further arguments are passed on)",
    )

    pki_parser = commands.add_parser(
        "pki",
        help="make a private CA with server and client certificates",
        description="Create and manage a private CA for mtlsproxy in one directory.",
    )
    pki_commands = pki_parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    init = pki_commands.add_parser(
        "init",
        help="create a CA, a server and a client certificate in one step",
        description="Create DIR (mode 0700) with ca-cert.pem, ca-key.pem, server-cert.pem, "
        "server-key.pem, client-cert.pem, client-key.pem and index.json.  Private keys and "
        "password files are created mode 0600.",
    )
    init.add_argument("directory", metavar="DIR", type=Path)
    init.add_argument(
        "--server-name",
        action="append",
        metavar="NAME",
        help="DNS name or IP address of the server (repeatable; default: localhost, "
        "127.0.0.1, ::1)",
    )
    init.add_argument(
        "--client-name",
        default=pki.DEFAULT_CLIENT_NAME,
        metavar="CN",
        help="commonName of the client certificate (default: %(default)s)",
    )
    init.add_argument(
        "--ca-name",
        metavar="CN",
        help="commonName of the CA (default: 'mtlsproxy CA' and a random suffix)",
    )
    init.add_argument(
        "--ca-days",
        type=_days,
        default=pki.CA_DAYS,
        metavar="N",
        help="validity of the CA in days (default: %(default)s)",
    )
    _add_leaf_options(init, "server and client certificates")

    issue = pki_commands.add_parser(
        "issue",
        help="issue another server or client certificate from the CA in DIR",
        description="Write NAME-cert.pem and NAME-key.pem signed by the CA in DIR; with "
        "--p12 also NAME-keystore.p12 with NAME-keystore.pass, and the CA's "
        "server-truststore.p12 and client-truststore.p12 (with .pass files) if missing.  "
        "For an IPv6 --server address, NAME in the file names has _ for : (::1 gives "
        "__1-cert.pem).",
    )
    issue.add_argument("directory", metavar="DIR", type=Path)
    which = issue.add_mutually_exclusive_group(required=True)
    which.add_argument("--client", metavar="NAME", help="a client certificate with commonName NAME")
    which.add_argument(
        "--server",
        metavar="NAME",
        help="a server certificate for the DNS name or IP address NAME",
    )
    issue.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="another DNS name or IP address for a --server certificate (repeatable)",
    )
    _add_leaf_options(issue, "certificate")

    revoke = pki_commands.add_parser(
        "revoke",
        help="revoke a certificate and write DIR/crl.pem",
        description="Add a certificate issued by the CA in DIR to DIR/crl.pem (created if "
        "absent) and mark it revoked in DIR/index.json.  Give the proxy the CRL with --crl.",
    )
    revoke.add_argument("directory", metavar="DIR", type=Path)
    revoke.add_argument("cert_file", metavar="CERT_FILE", type=Path, nargs="?")
    revoke.add_argument(
        "--serial",
        type=_serial,
        metavar="HEX",
        help="revoke by serial (as 'pki list' shows it) instead of CERT_FILE",
    )
    revoke.add_argument(
        "--crl-days",
        type=_days,
        default=pki.CRL_DAYS,
        metavar="N",
        help="days until the CRL's nextUpdate (default: %(default)s); re-run revoke "
        "before then to refresh it",
    )

    crl = pki_commands.add_parser(
        "crl",
        help="re-sign DIR/crl.pem (or write a first, empty one) without revoking anything",
        description="Write a fresh DIR/crl.pem listing everything revoked so far.  A CRL "
        "past its next update makes the proxy refuse every client: run this from cron, "
        "then send the proxy SIGHUP.",
    )
    crl.add_argument("directory", metavar="DIR", type=Path)
    crl.add_argument(
        "--crl-days",
        type=_days,
        default=pki.CRL_DAYS,
        metavar="N",
        help="days until the CRL's nextUpdate (default: %(default)s)",
    )

    listing = pki_commands.add_parser(
        "list",
        help="list the certificates issued from DIR with their status",
        description="Show serial, subject, kind, expiry, status and file of every "
        "certificate recorded in DIR/index.json.",
    )
    listing.add_argument("directory", metavar="DIR", type=Path)
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    return parser


def _report(result: pki.IssueResult, out: TextIO, err: TextIO) -> None:
    for line in result.warnings:
        print(f"{PROG}: {line}", file=err)
    for path in result.removed:
        print(f"removed {path} ({result.removed_why})", file=out)
    for path in result.written:
        print(f"wrote {path}", file=out)
    for entry in result.certificates:
        print(
            f"{entry.kind} certificate {entry.subject}, serial {entry.serial_hex}, "
            f"valid until {entry.not_after:%Y-%m-%d %H:%M} UTC",
            file=out,
        )


def _cmd_init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = pki.init_pki(
        args.directory,
        server_names=args.server_name or pki.DEFAULT_SERVER_NAMES,
        client_name=args.client_name,
        ca_name=args.ca_name,
        key_type=args.key_type,
        days=args.days,
        ca_days=args.ca_days,
        p12=args.p12,
        force=args.force,
    )
    _report(result, out, err)
    return 0


def _cmd_issue(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    kind: Literal["server", "client"] = "server" if args.server is not None else "client"
    result = pki.issue(
        args.directory,
        kind,
        args.server if kind == "server" else args.client,
        server_names=args.server_name,
        key_type=args.key_type,
        days=args.days,
        p12=args.p12,
        force=args.force,
    )
    _report(result, out, err)
    return 0


def _cmd_revoke(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = pki.revoke(args.directory, args.cert_file, serial=args.serial, crl_days=args.crl_days)
    entry = result.entry
    if result.already_revoked:
        assert entry.revoked_at is not None
        print(
            f"{entry.subject} (serial {entry.serial_hex}) was already revoked on "
            f"{entry.revoked_at:%Y-%m-%d %H:%M} UTC; CRL re-signed",
            file=out,
        )
    else:
        print(f"revoked {entry.subject} (serial {entry.serial_hex})", file=out)
    print(
        f"wrote {result.crl} (CRL number {result.crl_number}, next update "
        f"{result.next_update:%Y-%m-%d %H:%M} UTC)",
        file=out,
    )
    return 0


def _cmd_crl(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    result = pki.refresh_crl(args.directory, crl_days=args.crl_days)
    print(
        f"wrote {result.crl} (CRL number {result.crl_number}, {result.revoked} revoked, "
        f"next update {result.next_update:%Y-%m-%d %H:%M} UTC)",
        file=out,
    )
    return 0


def _cmd_list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    entries = pki.list_certificates(args.directory)
    if args.json:
        rows = [{**e.to_json(), "status": e.status()} for e in entries]
        print(json.dumps(rows, indent=2), file=out)
        return 0
    # The subject goes last: it is the only column that may contain spaces,
    # so ``awk '{print $1, $3}'`` works on the others.
    table = [("SERIAL", "KIND", "STATUS", "EXPIRES", "FILE", "SUBJECT")]
    for e in entries:
        table.append(
            (e.serial_hex, e.kind, e.status(), f"{e.not_after:%Y-%m-%dT%H:%MZ}", e.file, e.subject)
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]), file=out)
    return 0


def _run_check(argv: list[str]) -> int:
    """Imported only when used: the checker pulls in the whole proxy, pki does not need it."""
    try:
        from .check import run_check
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.check":
            raise
        raise MtlsProxyError("check: not available in this installation") from None
    return run_check(argv)


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """
    Run the console script; return the exit status instead of exiting, for tests.

    @param argv: arguments without the program name (default: C{sys.argv[1:]}).
    @param out: where results go (default: stdout).
    @param err: where warnings and the error line go (default: stderr).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        # ``check`` hands everything after it to the checker untouched, options
        # included; argparse's REMAINDER would reject a leading ``--option``.
        if args_list[:1] == ["check"]:
            return _run_check(args_list[1:])
        parser = build_parser()
        try:
            args = parser.parse_args(args_list)
        except SystemExit as e:  # usage error (2) or --help/--version (0)
            return e.code if isinstance(e.code, int) else 2
        handlers = {
            "init": _cmd_init,
            "issue": _cmd_issue,
            "revoke": _cmd_revoke,
            "crl": _cmd_crl,
            "list": _cmd_list,
        }
        if args.command == "pki":
            if args.pki_command == "issue" and args.client is not None and args.server_name:
                parser.error("--server-name is only for --server certificates")
            if args.pki_command == "revoke" and (args.cert_file is None) == (args.serial is None):
                parser.error("pki revoke: give either CERT_FILE or --serial HEX")
            return handlers[args.pki_command](args, out, err)
        return _run_check([])  # pragma: no cover - ``check`` is dispatched above
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except MtlsProxyError as e:
        print(f"{PROG}: {e}", file=err)
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=err)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
