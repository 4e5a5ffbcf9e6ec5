"""
Pure: who may reach which path.  Request target -> normalised path -> the
rule with the longest matching prefix -> L{Decision}.

Two things make a path rule worth having, and both live here:

  - The path that is checked is the path the backend acts on.  The request
    target is normalised (RFC 3986 section 6.2.2 plus merged slashes), targets
    that backends disagree about (C{%2F}, backslashes, NUL, C{..;}, C{/;x/})
    are refused outright, and the normalised target is what is forwarded, so
    no spelling of C{/admin} reaches the backend unchecked.  Where backends
    still read one path differently (C{/admin;x} is C{/admin} to a servlet
    container and C{admin;x} to most others; C{/admin.} is C{/admin} to
    Windows), every reading is checked and every deciding rule must admit.
  - A DNS name in C{allow-san} matches with service-identity's RFC 6125
    rules, not a hand-written glob.

docs/identity.md documents the rules for operators.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from service_identity.exceptions import CertificateError
from service_identity.hazmat import DNS_ID, DNSPattern

from .identity import ClientIdentity, encode_header_value

# -- request targets ------------------------------------------------------

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
#: Decoded bytes that end the check: a backend may read them as a separator
#: (C{/}, and C{\\} on Windows) or a string end (NUL), the proxy cannot know.
_FORBIDDEN_DECODED = frozenset(b"/\\\x00")
_ABSOLUTE = re.compile(rb"^(?i:https?)://([^/?]*)")


@dataclass(frozen=True)
class Target:
    """
    A request target the proxy accepts.

    @ivar path: the normalised path the policy decides on; C{*} for
        C{OPTIONS *}.
    @ivar forward: the request target to send to the backend: the normalised
        path and the query exactly as the client sent it (origin-form, also
        for an absolute-form request, as RFC 9112 section 3.2.1 asks of a
        gateway).  Equal to the client's target for every ordinary request.
    @ivar authority: the C{host[:port]} of an absolute-form target, which per
        RFC 9112 section 3.2.2 takes the place of the C{Host} header; C{None}
        for the usual origin-form.
    """

    path: str
    forward: bytes
    authority: bytes | None = None


def _normalise_segment(raw: bytes) -> str | None:
    """
    One path segment with RFC 3986 syntax normalisation: C{%XX} of an
    unreserved character decoded, other escapes upper-cased, bytes outside
    ASCII escaped.  C{None} for an invalid escape or a forbidden byte.
    """
    out = bytearray()
    i = 0
    n = len(raw)
    while i < n:
        b = raw[i]
        if b == 0x25:  # "%"
            if i + 2 >= n:
                return None
            h1, h2 = raw[i + 1], raw[i + 2]
            if h1 not in _HEX or h2 not in _HEX:
                return None
            value = int(raw[i + 1 : i + 3], 16)
            if value in _FORBIDDEN_DECODED:
                return None
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%%%02X" % value
            i += 3
            continue
        if b >= 0x80:
            out += b"%%%02X" % b
        else:
            out.append(b)
        i += 1
    return out.decode("ascii")


def _param_name(segment: str) -> str:
    """
    A normalised segment without its path parameters: what a servlet
    container (Tomcat, Jetty, Spring) routes on.  They cut at a raw C{;};
    a C{%3B} counts too, for frameworks that decode before they cut.
    """
    end = len(segment)
    for mark in (";", "%3B"):
        found = segment.find(mark)
        if found >= 0:
            end = min(end, found)
    return segment[:end]


def _windows_name(segment: str) -> str:
    """A segment as Windows (IIS, a Windows file server) reads it: trailing dots and spaces go."""
    while True:
        if segment.endswith("."):
            segment = segment[:-1]
        elif segment.endswith("%20"):
            segment = segment[:-3]
        else:
            return segment


def _ambiguous_segment(segment: str) -> bool:
    """
    A segment that is not empty, C{.} or C{..} but that some backend reads as an
    empty, C{.} or C{..} segment: its name before any parameters is empty or
    only dots and spaces.  C{;x} (Tomcat drops it and merges the slashes
    around it: C{/;x/admin} is C{/admin}), C{..;x} and C{%2e%2e;} (C{..} to
    Tomcat), C{..%3Bx}, C{...} and C{%20} (Windows trims them to nothing).
    """
    return segment not in ("", ".", "..") and _windows_name(_param_name(segment)) == ""


def asterisk_form_allowed(method: bytes, raw_target: bytes) -> bool:
    """
    RFC 9112 section 3.2.4: the asterisk-form target C{*} is only for a
    server-wide C{OPTIONS}; C{GET *} means nothing a backend should be asked.
    """
    return raw_target != b"*" or method == b"OPTIONS"


def parse_target(raw_target: bytes) -> Target | None:
    """
    Check and normalise a request target; C{None} means answer C{400}.

    Accepted: origin-form (C{/path?query}), absolute-form with C{http} or
    C{https}, and C{*} (see L{asterisk_form_allowed} for its method).
    Refused: any other form (C{CONNECT}'s authority-form, other schemes),
    control characters, spaces, C{#}, a backslash, an invalid C{%} escape, an
    encoded C{/} (C{%2F}), C{\\} (C{%5C}) or NUL (C{%00}), and a segment
    whose name before its parameters is empty or only dots and spaces
    (C{;x}, C{..;x}, C{.;x}, C{...}, C{%20}; see L{_ambiguous_segment}).

    The path is then normalised: unreserved escapes decoded (C{%61} is C{a},
    C{%2E} is C{.}), other escapes in upper case, raw non-ASCII bytes
    escaped, empty segments dropped (C{//a} is C{/a}), and C{.} and C{..}
    resolved (C{/a/../b} is C{/b}; C{..} above the root stays at the root).
    A trailing slash is kept: C{/a/} and C{/a} are different resources.
    """
    if raw_target == b"*":
        return Target(path="*", forward=b"*")
    if not raw_target or any(b <= 0x20 or b == 0x7F for b in raw_target):
        return None
    if b"#" in raw_target or b"\\" in raw_target:
        return None
    authority: bytes | None = None
    rest = raw_target
    match = _ABSOLUTE.match(raw_target)
    if match is not None:
        authority = match.group(1)
        if not authority or b"@" in authority:
            return None
        rest = raw_target[match.end() :]
        if not rest.startswith(b"/"):
            rest = b"/" + rest
    if not rest.startswith(b"/"):
        return None
    raw_path, question, query = rest.partition(b"?")

    raw_segments = raw_path.split(b"/")[1:]
    stack: list[str] = []
    trailing = False
    for raw_segment in raw_segments:
        segment = _normalise_segment(raw_segment)
        if segment is None or _ambiguous_segment(segment):
            return None
        trailing = segment in ("", ".", "..")
        if segment == "..":
            if stack:
                stack.pop()
        elif segment not in ("", "."):
            stack.append(segment)
    path = "/" + "/".join(stack)
    if trailing and stack:
        path += "/"
    forward = path.encode("ascii") + question + query
    return Target(path=path, forward=forward, authority=authority)


def normalise_path(raw_target: bytes) -> str | None:
    """The normalised path of a request target, or C{None} for a target refused with 400."""
    target = parse_target(raw_target)
    return None if target is None else target.path


def normalise_rule_path(value: str) -> str:
    """
    A C{[[rule]]} path in the one form the policy compares: normalised like
    a request path, without a trailing slash (C{/admin/} covers C{/admin}
    too: a rule that C{/admin} escapes would be a hole).

    @raise ValueError: for a path that does not start with C{/}, has a query
        or C{;}, or is not already normalised (C{/a/../b}, C{//a}): a rule
        should say plainly what it protects.
    """
    if not value.startswith("/"):
        raise ValueError('must start with "/"')
    if "?" in value or "#" in value or ";" in value:
        raise ValueError(f"{value!r} must be a plain path, without ?, # or ;")
    raw = value.encode("utf-8", "surrogatepass")
    target = parse_target(raw)
    if target is None:
        raise ValueError(
            f"{value!r} is not a valid path (%2F, %00, \\, spaces and segments of only dots "
            "are refused)"
        )
    normal = target.path.rstrip("/") or "/"
    given = _normalise_segment(raw)
    if given is None or given.rstrip("/") != normal.rstrip("/"):
        raise ValueError(f"{value!r} is not in normal form; write {normal!r}")
    return normal


def _segments(path: str) -> tuple[str, ...]:
    if path == "*":
        return ()
    return tuple(s for s in path.split("/") if s)


def readings(path: str) -> tuple[tuple[str, ...], ...]:
    """
    The segments of a normalised path as the backends in use read it,
    without repeats, the plain reading first: as written (most frameworks:
    C{admin;x} is a name of its own), without path parameters (servlet
    containers: C{admin;x} is C{admin}), with trailing dots and spaces
    trimmed (Windows: C{admin.} is C{admin}), and both.  L{parse_target}
    has refused every segment that one of them would empty, so each reading
    has as many segments as the path.
    """
    plain = _segments(path)
    servlet = tuple(_param_name(s) for s in plain)
    found: list[tuple[str, ...]] = []
    for reading in (plain, servlet, tuple(map(_windows_name, plain)),
                    tuple(map(_windows_name, servlet))):
        if reading not in found:
            found.append(reading)
    return tuple(found)


# -- SAN patterns ---------------------------------------------------------

SAN_KINDS = ("DNS", "URI", "email", "IP")
_DNS_PATTERN_CHARS = re.compile(r"^[a-z0-9_.*-]+$")


@dataclass(frozen=True)
class SanPattern:
    """
    One C{allow-san} entry.

    @ivar text: as the operator wrote it, for messages.
    @ivar kind: C{DNS}, C{URI}, C{email} or C{IP}.
    @ivar value: what follows the C{kind:} prefix.
    """

    text: str
    kind: str
    value: str
    _dns: DNSPattern | None = field(default=None, compare=False, repr=False)
    _network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = field(
        default=None, compare=False, repr=False
    )

    def matches(self, san: str) -> bool:
        """Whether a typed SAN of the certificate (C{DNS:a.example.com}) matches."""
        kind, _, value = san.partition(":")
        if kind != self.kind:
            return False
        if self._dns is not None:
            return _dns_matches(self._dns, value)
        if self._network is not None:
            try:
                return ipaddress.ip_address(value) in self._network
            except ValueError:
                return False
        if kind == "email":
            return _email_key(value) == _email_key(self.value)
        return value == self.value


def _email_key(address: str) -> tuple[str, str]:
    """Local part exact, domain case-insensitive (RFC 5321 section 2.4)."""
    local, at, domain = address.rpartition("@")
    if not at:
        return (address, "")
    return (local, domain.lower())


def _dns_matches(pattern: DNSPattern, name: str) -> bool:
    """
    service-identity's RFC 6125 matching, with the certificate's DNS name as
    the reference identity.  A name that is not a plain ASCII host name (with
    a C{*}, spaces, controls, non-ASCII, surrounding blanks that
    service-identity would strip) matches nothing.
    """
    if not name or not name.isascii() or name != name.strip():
        return False
    try:
        return bool(DNS_ID(name).verify(pattern))
    except (ValueError, TypeError, UnicodeError, CertificateError):
        return False


def parse_san_pattern(text: str) -> SanPattern:
    """
    Check an C{allow-san} value.

    C{DNS:} takes a host name or a wildcard C{*.example.com} (the whole
    left-most label, at least two labels after it), matched case-insensitively;
    C{IP:} an address or a CIDR network; C{URI:} and C{email:} match exactly
    (the domain of an e-mail address case-insensitively).

    @raise ValueError: saying what is wrong with C{text}.
    """
    kind, colon, value = text.partition(":")
    if not colon or kind not in SAN_KINDS:
        raise ValueError(f"{text!r} must start with DNS:, URI:, email: or IP:")
    if not value or value != value.strip():
        raise ValueError(f"{text!r} has an empty or blank-padded value")
    if kind == "DNS":
        lowered = value.lower()
        if not lowered.isascii() or not _DNS_PATTERN_CHARS.match(lowered):
            raise ValueError(f"{text!r} is not a DNS name (use the xn-- form for IDNs)")
        if "*" in lowered and not lowered.startswith("*."):
            raise ValueError(
                f"{text!r}: a wildcard must be the whole left-most label (*.example.com)"
            )
        try:
            pattern = DNSPattern.from_bytes(lowered.encode("ascii"))
        except CertificateError as e:
            raise ValueError(f"{text!r}: {e}") from None
        return SanPattern(text, kind, value, _dns=pattern)
    if kind == "IP":
        try:
            network = ipaddress.ip_network(value, strict=True)
        except ValueError as e:
            raise ValueError(f"{text!r} is not an IP address or network: {e}") from None
        return SanPattern(text, kind, value, _network=network)
    return SanPattern(text, kind, value)


# -- rules and decisions --------------------------------------------------


@dataclass(frozen=True)
class AllowRule:
    """
    Who may pass: a client matching any one entry.

    @ivar path: the normalised path prefix this rule covers, or C{None} for
        the listener-wide rule (the top-level C{allow-*} options).
    @ivar cn: subject CNs allowed (exact, case-sensitive).
    @ivar ou: subject OUs allowed (any of the client's OUs may match).
    @ivar san: subjectAltName patterns allowed.
    """

    path: str | None = None
    cn: frozenset[str] = frozenset()
    ou: frozenset[str] = frozenset()
    san: tuple[SanPattern, ...] = ()

    @classmethod
    def build(
        cls,
        path: str | None = None,
        allow_cn: Iterable[str] = (),
        allow_ou: Iterable[str] = (),
        allow_san: Iterable[str] = (),
    ) -> AllowRule:
        """
        A rule from configuration values.

        @raise ValueError: for a bad path or SAN pattern (see
            L{normalise_rule_path} and L{parse_san_pattern}).
        """
        return cls(
            path=None if path is None else normalise_rule_path(path),
            cn=frozenset(allow_cn),
            ou=frozenset(allow_ou),
            san=tuple(parse_san_pattern(s) for s in allow_san),
        )

    @property
    def restricts(self) -> bool:
        """A rule without entries admits every client the TLS layer accepted."""
        return bool(self.cn or self.ou or self.san)

    @property
    def where(self) -> str:
        return "the listener rule" if self.path is None else f"rule {self.path}"

    def match(self, identity: ClientIdentity | None) -> str | None:
        """The entry that admits C{identity} (for the log), or C{None}."""
        if identity is None:
            return None
        if identity.cn is not None and identity.cn in self.cn:
            return "allow-cn " + encode_header_value(identity.cn).decode("ascii")
        for ou in identity.ous:
            if ou in self.ou:
                return "allow-ou " + encode_header_value(ou).decode("ascii")
        for pattern in self.san:
            for san in identity.sans:
                if pattern.matches(san):
                    return "allow-san " + encode_header_value(pattern.text).decode("ascii")
        return None


@dataclass(frozen=True)
class Decision:
    """
    The policy's answer for one request.

    @ivar allowed: forward, or answer C{403}.
    @ivar reason: one line for the log, printable ASCII (certificate text is
        percent-encoded); starts with C{not allowed} when refused.
    @ivar rule_path: the prefix of the deciding C{[[rule]]} (when refused, the
        one that refused; when several readings decide, the most specific),
        or C{""} for the listener-wide rule.
    """

    allowed: bool
    reason: str
    rule_path: str


def _specificity(rule: AllowRule) -> int:
    """Segments in a rule's path; the listener rule is below every path rule."""
    return -1 if rule.path is None else len(_segments(rule.path))


def _describe(identity: ClientIdentity | None) -> str:
    if identity is None:
        return "a client without a certificate"
    if identity.cn is None:
        return "a client certificate without CN"
    return "CN " + encode_header_value(identity.cn).decode("ascii")


@dataclass(frozen=True)
class Policy:
    """
    The listener-wide rule and the per-path rules.

    For a request, the C{[[rule]]} whose path is the longest prefix of the
    request path, compared on whole segments, decides: it replaces the
    listener rule below its prefix, whether it is narrower or wider.  Without
    a matching C{[[rule]]}, the listener rule decides.  A rule without any
    C{allow-*} entry admits every client the handshake accepted, including
    one without a certificate under C{--client-auth optional}; a rule with
    entries never admits such a client.

    A path that backends read in more than one way (see L{readings}) is
    decided by the rule of every reading, and forwarded only if all of them
    admit the client: C{/admin;x} must pass both the C{/admin} rule (as a
    servlet container routes it) and the rule above it (as others do).
    """

    listener: AllowRule = AllowRule()
    rules: tuple[AllowRule, ...] = ()

    def __post_init__(self) -> None:
        paths = [r.path for r in self.rules]
        if None in paths:
            raise ValueError("per-path rules need a path")
        if len(set(paths)) != len(paths):
            raise ValueError("two rules for the same path")
        ordered = sorted(self.rules, key=lambda r: len(_segments(r.path or "/")), reverse=True)
        object.__setattr__(self, "rules", tuple(ordered))

    @property
    def restricts(self) -> bool:
        """Whether any request could be refused at all."""
        return self.listener.restricts or any(r.restricts for r in self.rules)

    def _rule_for_segments(self, segments: tuple[str, ...]) -> AllowRule:
        for rule in self.rules:
            prefix = _segments(rule.path or "/")
            if segments[: len(prefix)] == prefix:
                return rule
        return self.listener

    def rules_for(self, path: str) -> tuple[AllowRule, ...]:
        """Every rule that decides for a normalised path: one per reading, without repeats."""
        found: list[AllowRule] = []
        for segments in readings(path):
            rule = self._rule_for_segments(segments)
            if rule not in found:
                found.append(rule)
        return tuple(found)

    def rule_for(self, path: str) -> AllowRule:
        """The most specific of L{rules_for}: the rule that protects this path."""
        return max(self.rules_for(path), key=_specificity)

    def decide(self, identity: ClientIdentity | None, path: str) -> Decision:
        """
        Forward or refuse a request.

        @param identity: the verified client, C{None} for one without a
            certificate (C{--client-auth optional}).
        @param path: the path from L{parse_target}, never the raw target.
        """
        admitted: list[tuple[AllowRule, str]] = []
        for rule in self.rules_for(path):
            if not rule.restricts:
                admitted.append((rule, f"{rule.where} admits every verified client"))
                continue
            entry = rule.match(identity)
            if entry is None:
                return Decision(
                    False,
                    f"not allowed: {_describe(identity)} matches no allow-cn, allow-ou or "
                    f"allow-san of {rule.where}",
                    rule.path or "",
                )
            admitted.append((rule, f"{rule.where}: {entry}"))
        deciding = max((rule for rule, _ in admitted), key=_specificity)
        return Decision(True, "; ".join(reason for _, reason in admitted), deciding.path or "")
