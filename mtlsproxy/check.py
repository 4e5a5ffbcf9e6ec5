"""
C{mtlsproxy check}: load a configuration the way the daemon does, serve nothing,
and say what is in it and what is wrong with it.

It exists so that an operator (or a deployment script, before C{systemctl
reload}) can find a wrong key, an expired certificate or a stale CRL without
restarting the proxy and reading its log.  Unlike start-up, which stops at the
first problem, the check goes on after one so that a single run lists them all.

Exit status: 0 when the configuration is usable (warnings allowed), 1 when
something is wrong, 2 when the command line itself cannot be parsed.

The expiry helpers (L{tls.load_material}, L{expiries}, L{warnings_for},
L{expiry_warnings}) are shared with the daemon, which logs the same
"expires within 14 days" warnings at start-up, after each reload and every
L{service.EXPIRY_CHECK_INTERVAL} seconds while it runs.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.python import usage

from . import certs, tap, tls
from .config import Config, build_config
from .errors import CertificateLoadError, ConfigError, MtlsProxyError
from .tls import Material, load_material

PROG = "mtlsproxy check"

#: Certificates and CRLs closer than this to their end are warned about.
WARN_DAYS = 14

ExpiryKind = Literal["server", "chain", "ca", "crl"]

_WHAT = {
    "server": "server certificate",
    "chain": "chain certificate",
    "ca": "CA certificate",
    "crl": "CRL from",
}


@dataclass(frozen=True)
class Expiry:
    """
    When one certificate in use expires, or when one CRL is due for renewal.

    @ivar kind: C{server}, C{chain} (intermediates sent with it), C{ca}
        (trusted for clients) or C{crl} (its nextUpdate; past it, OpenSSL
        refuses every client the CRL covers).
    @ivar subject: the certificate's subject, or the CRL's issuer, RFC 4514.
    @ivar when: notAfter, or nextUpdate, in UTC.
    @ivar fingerprint: L{fingerprint} of the certificate or CRL: two CA
        certificates with one subject (a CA rollover) are two entries.
    """

    kind: ExpiryKind
    subject: str
    when: datetime.datetime
    fingerprint: str = ""

    @property
    def timestamp(self) -> float:
        """C{when} as Unix time, for the metrics gauge."""
        return self.when.timestamp()

    def as_metric(self) -> tuple[str, str, float, str]:
        """
        C{(kind, subject, timestamp, fingerprint)}, as
        L{mtlsproxy.metrics.Metrics.set_expiries} takes.
        """
        return (self.kind, self.subject, self.timestamp, self.fingerprint)


def fingerprint(item: x509.Certificate | x509.CertificateRevocationList) -> str:
    """
    The first 16 hex digits of the SHA-256 of C{item}'s DER: enough to tell
    apart certificates that share a subject, short enough for a label.
    """
    return item.fingerprint(hashes.SHA256()).hex()[:16]


def _subject(name: x509.Name) -> str:
    return name.rfc4514_string() or "(empty subject)"


def expiries(material: Material) -> list[Expiry]:
    """Every expiry that matters in C{material}; CRLs without nextUpdate never expire."""
    identity = material.identity
    cert = identity.cert
    found = [Expiry("server", _subject(cert.subject), cert.not_valid_after_utc, fingerprint(cert))]
    found += [
        Expiry("chain", _subject(c.subject), c.not_valid_after_utc, fingerprint(c))
        for c in identity.chain
    ]
    found += [
        Expiry("ca", _subject(c.subject), c.not_valid_after_utc, fingerprint(c))
        for c in material.cas
    ]
    for crl in material.crls:
        if crl.next_update_utc is not None:
            found.append(
                Expiry("crl", _subject(crl.issuer), crl.next_update_utc, fingerprint(crl))
            )
    return found


def _utc(when: datetime.datetime) -> str:
    return f"{when:%Y-%m-%d %H:%M} UTC"


def _days_between(now: datetime.datetime, when: datetime.datetime) -> int:
    """Whole days from C{now} to C{when}, rounded towards zero."""
    return int((when - now).total_seconds() // 86400) if when >= now else -int(
        (now - when).total_seconds() // 86400
    )


def _in_days(now: datetime.datetime, when: datetime.datetime) -> str:
    days = _days_between(now, when)
    if when < now:
        return "less than a day ago" if days == 0 else f"{-days} day{'s' if days != -1 else ''} ago"
    return "in less than a day" if days == 0 else f"in {days} day{'s' if days != 1 else ''}"


def describe_expiry(entry: Expiry, now: datetime.datetime) -> str:
    """One warning line for an entry that is close to (or past) its end."""
    what = f"{_WHAT[entry.kind]} {entry.subject}"
    if entry.kind == "crl":
        if entry.when < now:
            return (
                f"{what} was due for its next update {_in_days(now, entry.when)} "
                f"({_utc(entry.when)}); clients it covers are refused (CRL expired)"
            )
        return (
            f"{what} is due for its next update {_in_days(now, entry.when)} "
            f"({_utc(entry.when)}); after that clients it covers are refused"
        )
    verb = "expired" if entry.when < now else "expires"
    return f"{what} {verb} {_in_days(now, entry.when)} ({_utc(entry.when)})"


def warnings_for(
    entries: Iterable[Expiry], now: datetime.datetime | None = None, days: float = WARN_DAYS
) -> list[str]:
    """Warning lines for the entries that end within C{days} of C{now} (or have ended)."""
    now = now or datetime.datetime.now(datetime.UTC)
    limit = now + datetime.timedelta(days=days)
    return [describe_expiry(e, now) for e in entries if e.when <= limit]


def expiry_warnings(
    config: Config, now: datetime.datetime | None = None, days: float = WARN_DAYS
) -> list[str]:
    """
    What the daemon logs as warnings at start-up, after a reload and twice a day: each
    certificate or CRL in use that ends within C{days}.

    Reads the files again; a daemon that has just loaded them can use
    L{load_material}, L{expiries} and L{warnings_for} to read them once.
    Never raises for a file problem (the load that matters has already
    reported it); such a problem becomes a line of its own.
    """
    try:
        material = load_material(config)
    except MtlsProxyError as e:
        return [f"cannot check certificate expiry: {e}"]
    return warnings_for(expiries(material), now, days)


# -- the command -----------------------------------------------------------------


class CheckOptions(tap.Options):
    """The daemon's own option table (including C{--config}), without twistd."""

    synopsis = "Usage: mtlsproxy check [options]"
    longdesc = (
        "Check an mtlsproxy configuration without serving: files readable, key matches "
        "certificate, certificates valid now and days until they expire, chain, CAs, "
        "CRLs and their next update.  Takes the same options as 'twistd mtlsproxy'. "
        "Exit status 0: usable (warnings allowed), 1: a problem, 2: bad command line."
    )

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # tap.Options turns a usage error into exit(2) with twistd's wording;
        # run_check does its own.
        usage.Options.parseOptions(self, options)

    def postOptions(self) -> None:
        # tap.Options builds the whole service here; the check only needs the values.
        pass


class _Report:
    """Collects the report: information on C{out}, warnings and problems on C{err}."""

    def __init__(self, out: TextIO, err: TextIO, now: datetime.datetime) -> None:
        self.out = out
        self.err = err
        self.now = now
        self.problems = 0
        self.warnings = 0

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def warning(self, text: str) -> None:
        self.warnings += 1
        self.out.flush()
        self.err.write(f"WARNING: {text}\n")
        self.err.flush()

    def problem(self, text: str) -> None:
        self.problems += 1
        self.out.flush()
        self.err.write(f"ERROR: {text}\n")
        self.err.flush()

    def validity(self, cert: x509.Certificate) -> str:
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if end < self.now:
            left = f"expired {_in_days(self.now, end)}"
        elif start > self.now:
            left = f"not valid yet, starts {_in_days(self.now, start)}"
        else:
            left = f"{_days_between(self.now, end)} days left"
        return f"valid {_utc(start)} to {_utc(end)}: {left}"


def _names(cert: x509.Certificate) -> list[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    names: list[str] = []
    for general in sans:
        if isinstance(general, x509.DNSName):
            names.append(f"DNS:{general.value}")
        elif isinstance(general, x509.IPAddress):
            names.append(f"IP:{general.value}")
        elif isinstance(general, x509.UniformResourceIdentifier):
            names.append(f"URI:{general.value}")
        elif isinstance(general, x509.RFC822Name):
            names.append(f"email:{general.value}")
        else:
            names.append(type(general).__name__)
    return names


def _server_purpose_ok(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return True
    return (
        ExtendedKeyUsageOID.SERVER_AUTH in eku
        or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm
        return False
    return True


def _check_endpoint(report: _Report, option: str, description: str) -> None:
    """Parse an endpoint description as the daemon will (without listening)."""
    if description.startswith("systemd:"):
        report.line(f"{option} {description}: socket activation, checked when systemd starts it")
        return
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        report.problem(f"{option} {description}: not a valid endpoint description ({e})")
        return
    report.line(f"{option} {description}: OK")


def _check_identity(report: _Report, config: Config) -> certs.ServerIdentity | None:
    try:
        identity = certs.load_server_identity(config)
    except MtlsProxyError as e:
        report.problem(str(e))
        return None
    cert = identity.cert
    if config.keystore is not None:
        report.line(f"server keystore {config.keystore}: OK, key matches certificate")
    else:
        report.line(f"server certificate {config.cert}: OK")
        report.line(f"server key {config.key}: OK, matches the certificate")
    report.line(f"  subject {_subject(cert.subject)}")
    names = _names(cert)
    report.line(f"  names {', '.join(names) if names else '(no subjectAltName)'}")
    report.line(f"  issuer {_subject(cert.issuer)}")
    report.line(f"  {report.validity(cert)}")
    if cert.not_valid_after_utc < report.now:
        report.problem(
            f"server certificate {_subject(cert.subject)} expired on "
            f"{_utc(cert.not_valid_after_utc)}; clients will refuse it"
        )
    elif cert.not_valid_before_utc > report.now:
        report.problem(
            f"server certificate {_subject(cert.subject)} is not valid before "
            f"{_utc(cert.not_valid_before_utc)}; clients will refuse it"
        )
    if not names:
        report.warning(
            f"server certificate {_subject(cert.subject)} has no subjectAltName; "
            "clients that check host names (curl, browsers, Python) will refuse it"
        )
    if not _server_purpose_ok(cert):
        report.warning(
            f"server certificate {_subject(cert.subject)} does not allow serverAuth "
            "(extendedKeyUsage); clients will refuse it"
        )
    if not identity.chain:
        report.line("  chain: none (the certificate is sent alone)")
    below = cert
    for number, extra in enumerate(identity.chain, start=1):
        report.line(f"  chain #{number} {_subject(extra.subject)}: {report.validity(extra)}")
        if not _issued_by(below, extra):
            report.warning(
                f"chain #{number} {_subject(extra.subject)} did not issue "
                f"{_subject(below.subject)}; the chain is incomplete or out of order"
            )
        if extra.not_valid_after_utc < report.now:
            report.problem(
                f"chain certificate {_subject(extra.subject)} expired on "
                f"{_utc(extra.not_valid_after_utc)}; clients will refuse the server"
            )
        below = extra
    return identity


def _check_cas(report: _Report, config: Config) -> tuple[x509.Certificate, ...] | None:
    try:
        cas = certs.load_client_cas(config)
    except MtlsProxyError as e:
        report.problem(str(e))
        return None
    source = f"truststore {config.truststore}" if config.truststore else f"CA file {config.ca}"
    report.line(f"client {source}: OK, {len(cas)} CA certificate{'s' if len(cas) != 1 else ''}")
    expired = [c for c in cas if c.not_valid_after_utc < report.now]
    for ca in cas:
        report.line(f"  CA {_subject(ca.subject)}: {report.validity(ca)}")
    if expired and len(expired) == len(cas):
        report.problem("every client CA has expired; no client certificate can be verified")
    else:
        for ca in expired:
            report.warning(
                f"CA certificate {_subject(ca.subject)} has expired; clients it issued are refused"
            )
    return cas


def _check_crls(
    report: _Report, config: Config, cas: Sequence[x509.Certificate] | None
) -> tuple[x509.CertificateRevocationList, ...] | None:
    loaded: list[x509.CertificateRevocationList] = []
    ok = True
    for path in config.crl:
        try:
            crls = certs.load_crls([path])
        except MtlsProxyError as e:
            report.problem(str(e))
            ok = False
            continue
        report.line(f"CRL file {path}: OK, {len(crls)} CRL{'s' if len(crls) != 1 else ''}")
        for crl in crls:
            issuer = _subject(crl.issuer)
            next_update = crl.next_update_utc
            when = (
                f"next update {_utc(next_update)} ({_in_days(report.now, next_update)})"
                if next_update is not None
                else "no next update"
            )
            report.line(f"  issuer {issuer}: {when}, {len(crl)} revoked")
            if next_update is not None and next_update < report.now:
                report.problem(
                    f"CRL {path} from {issuer} is past its next update ({_utc(next_update)}); "
                    "every client it covers is refused (CRL expired)"
                )
            if cas is not None:
                signers = [ca for ca in cas if ca.subject == crl.issuer]
                if not signers:
                    report.warning(
                        f"CRL {path} was issued by {issuer}, which is not a client CA; "
                        "it has no effect"
                    )
                elif not any(crl.is_signature_valid(ca.public_key()) for ca in signers):  # type: ignore[arg-type]
                    report.problem(
                        f"CRL {path}: signature does not verify with the CA {issuer}; "
                        "every client of that CA is refused"
                    )
        loaded.extend(crls)
    if ok and loaded and cas is not None:
        covered = {crl.issuer for crl in loaded}
        for ca in cas:
            if ca.subject not in covered:
                report.warning(
                    f"no CRL from CA {_subject(ca.subject)}: with --crl given, client "
                    "certificates it issues directly are refused (unable to get CRL)"
                )
    return tuple(loaded) if ok else None


def check_config(config: Config, report: _Report) -> None:
    """Check every part of C{config}, reporting as it goes."""
    if config.config_file is not None:
        report.line(f"config {config.config_file}: OK")
    _check_endpoint(report, "listen", config.listen)
    report.line(f"backend {config.backend.url}")
    if config.metrics is not None:
        _check_endpoint(report, "metrics", config.metrics)
    identity = _check_identity(report, config)
    cas = _check_cas(report, config)
    crls = _check_crls(report, config, cas)
    if identity is None or cas is None or crls is None:
        return
    try:
        tls.build_context(config, identity, cas, crls)
    except MtlsProxyError as e:
        report.problem(str(e))
        return
    auth = "required" if config.client_auth == "required" else "optional"
    report.line(f"TLS: OK (TLS {config.min_tls} or later, client certificates {auth})")
    # What has already ended was reported above, as a problem or a warning of its own.
    upcoming = [e for e in expiries(Material(identity, cas, crls)) if e.when >= report.now]
    for line in warnings_for(upcoming, report.now):
        report.warning(line)


def run_check(
    argv: Sequence[str],
    out: TextIO | None = None,
    err: TextIO | None = None,
    now: datetime.datetime | None = None,
) -> int:
    """
    Run C{mtlsproxy check ARGS}; return the exit status.

    @param argv: the arguments after C{check}.
    @param now: the time to judge validity against (tests).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    options = CheckOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        err.write(f"{PROG}: {e} (see mtlsproxy check --help)\n")
        return 2
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    report = _Report(out, err, now or datetime.datetime.now(datetime.UTC))
    try:
        config_file = Path(options["config"]) if options["config"] else None
        config = build_config(options.given(), config_file)
    except (ConfigError, CertificateLoadError) as e:
        report.problem(str(e))
    except MtlsProxyError as e:  # pragma: no cover - build_config raises ConfigError only
        report.problem(str(e))
    else:
        check_config(config, report)
    if report.problems:
        count = report.problems
        report.line(f"{count} problem{'s' if count != 1 else ''} found")
        return 1
    suffix = f" ({report.warnings} warning{'s' if report.warnings != 1 else ''})"
    report.line("configuration OK" + (suffix if report.warnings else ""))
    return 0
