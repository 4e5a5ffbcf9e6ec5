"""
Request target -> normalised path -> rule -> decision, without a reactor.

The bypass tests are the point: every spelling of /admin that a backend
could read as /admin is either refused with 400 or decided by the /admin rule.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mtlsproxy.identity import ClientIdentity
from mtlsproxy.policy import (
    AllowRule,
    Decision,
    Policy,
    SanPattern,
    asterisk_form_allowed,
    normalise_path,
    normalise_rule_path,
    parse_san_pattern,
    parse_target,
)


def who(
    cn: str | None = "alice", ous: tuple[str, ...] = (), sans: tuple[str, ...] = ()
) -> ClientIdentity:
    return ClientIdentity(cn=cn, ous=ous, sans=sans)


# -- normalisation --------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"/", "/"),
        (b"/admin", "/admin"),
        (b"/admin/", "/admin/"),
        (b"/admin/../admin", "/admin"),
        (b"//admin", "/admin"),
        (b"/x//admin///y", "/x/admin/y"),
        (b"/./admin", "/admin"),
        (b"/x/../admin", "/admin"),
        (b"/../../admin", "/admin"),
        (b"/%61dmin", "/admin"),
        (b"/%2e%2e/admin", "/admin"),
        (b"/x/%2E%2E/admin", "/admin"),
        (b"/x/.%2e/admin", "/admin"),
        (b"/a/b/..", "/a/"),
        (b"/a/b/.", "/a/b/"),
        (b"/a..b/c", "/a..b/c"),
        (b"/wiki/U.S./x", "/wiki/U.S./x"),
        (b"/a%20b%20/c", "/a%20b%20/c"),
        (b"/admin;/x", "/admin;/x"),
        (b"/admin;a;b/x;y", "/admin;a;b/x;y"),
        (b"/%7Euser", "/~user"),
        (b"/caf%c3%a9", "/caf%C3%A9"),
        (b"/caf\xc3\xa9", "/caf%C3%A9"),
        (b"/a%20b", "/a%20b"),
        (b"/a%25b", "/a%25b"),
        (b"/admin;jsessionid=1", "/admin;jsessionid=1"),
        (b"/search?q=/../admin", "/search"),
        (b"http://example.com/admin/../x?y", "/x"),
        (b"HTTPS://example.com", "/"),
        (b"*", "*"),
    ],
)
def test_normalised_paths(raw: bytes, path: str) -> None:
    """RFC 3986 normalisation plus merged slashes; the query is not part of the path."""
    assert normalise_path(raw) == path


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"admin",
        b"example.com:443",
        b"ftp://example.com/x",
        b"http://user@example.com/x",
        b"http:///x",
        b"/%2Fadmin",
        b"/%2fadmin",
        b"/x%2F..%2Fadmin",
        b"/%5Cadmin",
        b"/x\\..\\admin",
        b"/admin%00.html",
        b"/admin\x00",
        b"/a b",
        b"/a\tb",
        b"/a\r\nb",
        b"/a\x7f",
        b"/%zzadmin",
        b"/admin%4",
        b"/admin%",
        b"/x/..;/admin",
        b"/x/.;x/admin",
        b"/x/%2e%2e;/admin",
        b"/..;/admin",
        b"/admin/..;/x",
        b"/admin/.;/x",
        b"/x/..%3B/admin",
        b"/x/%2e%2e%3b/admin",
        b"/;x/admin",
        b"/;/admin",
        b"/;",
        b"/;x",
        b"/admin/;/audit",
        b"/admin/;x/audit",
        b"/admin/;jsessionid=1",
        b"/%3Bx/admin",
        b"/%3badmin",
        b"/...",
        b"/x/.../admin",
        b"/x/%2e%2e%2e/admin",
        b"/%20/admin",
        b"/x/..%20/admin",
        b"/x/.%20./admin",
        b"/x/..%20;y/admin",
        b"/admin#frag",
    ],
)
def test_refused_targets(raw: bytes) -> None:
    """
    Encoded slash or backslash, NUL, controls, bad escapes, odd forms, and
    segments whose name before parameters is empty or only dots and spaces
    (Tomcat reads /;x/admin as /admin and /x/..;/admin as /admin; Windows
    trims "..." and "%20" to nothing): 400.
    """
    assert parse_target(raw) is None
    assert normalise_path(raw) is None


def test_forwarded_target_is_the_checked_one() -> None:
    """The backend gets the normalised path and the client's query, byte for byte."""
    target = parse_target(b"/x/../admin/%7e?a=%2F..&b=\xff")
    assert target is not None
    assert target.path == "/admin/~"
    assert target.forward == b"/admin/~?a=%2F..&b=\xff"
    assert target.authority is None


def test_ordinary_targets_are_forwarded_unchanged() -> None:
    """For what browsers and curl send, the forwarded target is the client's own."""
    for raw in (b"/", b"/index.html", b"/api/v1/items?id=3&sort=-name", b"/a%20b/%C3%A9"):
        target = parse_target(raw)
        assert target is not None and target.forward == raw


def test_absolute_form_is_forwarded_in_origin_form_with_its_authority() -> None:
    """RFC 9112: a gateway sends origin-form; the authority replaces Host."""
    target = parse_target(b"http://app.example:8443/a?b")
    assert target is not None
    assert (target.forward, target.authority) == (b"/a?b", b"app.example:8443")


_PATH_BYTES = st.lists(
    st.sampled_from(
        [b"a", b"admin", b"public", b".", b"..", b"%2e", b"%2E%2e", b"", b"%61", b"x;y", b"%41",
         b"%zz", b"%2F", b"\xc3\xa9", b"~", b"%7E", b"..;", b"%", b"a%20b", b";x", b";",
         b"admin;", b"admin;x", b"public;x", b"%3B", b"%3Bx", b"admin%3Bx", b"..%3B",
         b"%2e%2e;", b".;", b"admin.", b"admin%2e", b"admin%20", b"admin.%20", b"public.",
         b"...", b"%20", b".%20", b"*"]
    ),
    max_size=8,
).map(lambda parts: b"/" + b"/".join(parts))


@given(st.one_of(_PATH_BYTES, st.binary(max_size=30).map(lambda b: b"/" + b)))
def test_normalised_paths_are_canonical(raw: bytes) -> None:
    """
    Whatever the target: refused, or a path that starts with /, is printable
    ASCII, has no empty, . or .. segment, and normalises to itself (so what is
    forwarded is exactly what was checked).
    """
    target = parse_target(raw)
    if target is None:
        return
    path = target.path
    assert path.startswith("/") and "//" not in path
    assert all(0x21 <= ord(c) < 0x7F for c in path)
    assert not any(seg in (".", "..") for seg in path.split("/"))
    again = parse_target(target.forward)
    assert again is not None and again.path == path and again.forward == target.forward


# What backends make of a raw path: models of the readings the policy must cover.


def _resolve(segments: list[str]) -> list[str]:
    """Merge empty segments, resolve . and .. (above the root stays at the root)."""
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg not in ("", "."):
            out.append(seg)
    return out


def _raw_path(raw: bytes) -> str:
    return raw.partition(b"?")[0].decode("latin-1")


def tomcat_view(raw: bytes) -> list[str]:
    """
    Tomcat (CoyoteAdapter): cut C{;params} off every raw segment, then
    percent-decode, then normalise: C{/;x/admin} is C{/admin}, C{..;} is C{..}.
    """
    cut = [seg.split(";", 1)[0] for seg in _raw_path(raw).split("/")]
    return _resolve(unquote("/".join(cut)).split("/"))


def decode_first_view(raw: bytes) -> list[str]:
    """A framework that decodes first, then drops C{;params}: C{%3B} cuts too."""
    return _resolve([seg.split(";", 1)[0] for seg in unquote(_raw_path(raw)).split("/")])


def plain_view(raw: bytes) -> list[str]:
    """Most frameworks (WSGI, Go, Node): decode and resolve; C{admin;x} is a name of its own."""
    return _resolve(unquote(_raw_path(raw)).split("/"))


def _windows_trim(seg: str) -> str:
    return seg if seg in (".", "..") else seg.rstrip(". ")


def windows_view(raw: bytes) -> list[str]:
    """IIS and Windows file servers: trailing dots and spaces of each name are trimmed."""
    return _resolve([_windows_trim(seg) for seg in unquote(_raw_path(raw)).split("/")])


def tomcat_on_windows_view(raw: bytes) -> list[str]:
    """Tomcat serving files from an NTFS directory: both."""
    cut = [seg.split(";", 1)[0] for seg in _raw_path(raw).split("/")]
    return _resolve([_windows_trim(seg) for seg in unquote("/".join(cut)).split("/")])


BACKENDS = [tomcat_view, decode_first_view, plain_view, windows_view, tomcat_on_windows_view]


@settings(max_examples=1500, deadline=None)
@given(_PATH_BYTES)
@example(b"/;x/admin")
@example(b"/%3Bx/admin")
@example(b"/x/..%3B/admin")
@example(b"/admin./x")
@example(b"/x/...%20/../admin")
def test_no_spelling_of_admin_escapes_the_admin_rule(raw: bytes) -> None:
    """
    If any modelled backend (Tomcat, decode-then-cut, plain, Windows) would
    land under /admin, the proxy either refuses the target or applies the
    /admin rule, so alice is refused.
    """
    policy = Policy(rules=(AllowRule.build("/admin", allow_cn=["root"]),))
    target = parse_target(raw)
    if target is None:
        return
    under_admin = [view.__name__ for view in BACKENDS if view(raw)[:1] == ["admin"]]
    if under_admin:
        assert policy.rule_for(target.path).path == "/admin", under_admin
        assert not policy.decide(who("alice"), target.path).allowed, under_admin


@settings(max_examples=1500, deadline=None)
@given(_PATH_BYTES)
@example(b"/public;x/secret")
@example(b"/public%3Bx")
@example(b"/public./x")
@example(b"/public/;x/../../secret")
def test_no_spelling_escapes_into_a_wider_rule(raw: bytes) -> None:
    """
    The other direction: /public is open, everything else is root's.  If any
    modelled backend would land outside /public, alice is refused: an open
    rule must not lend itself to /public;x/secret (a plain backend's
    "public;x") or /public./x read the other way round.
    """
    policy = Policy(
        listener=AllowRule.build(allow_cn=["root"]), rules=(AllowRule.build("/public"),)
    )
    target = parse_target(raw)
    if target is None:
        return
    outside = [view.__name__ for view in BACKENDS if view(raw)[:1] != ["public"]]
    if outside:
        assert not policy.decide(who("alice"), target.path).allowed, outside
    else:
        assert policy.decide(who("alice"), target.path).allowed


@pytest.mark.parametrize(
    ("raw", "view", "seen"),
    [
        (b"/;x/admin", tomcat_view, ["admin"]),
        (b"/admin/;/audit", tomcat_view, ["admin", "audit"]),
        (b"/x/..;/admin", tomcat_view, ["admin"]),
        (b"/x/%2e%2e;/admin", tomcat_view, ["admin"]),
        (b"/%3Bx/admin", tomcat_view, [";x", "admin"]),
        (b"/%3Bx/admin", decode_first_view, ["admin"]),
        (b"/admin;x/y", plain_view, ["admin;x", "y"]),
        (b"/admin%2e/y", windows_view, ["admin", "y"]),
        (b"/x/...%20/admin", windows_view, ["x", "admin"]),
        (b"/admin/..", windows_view, []),
        (b"/x/..%20/admin", windows_view, ["x", "admin"]),
    ],
)
def test_the_backend_models_are_what_the_property_tests_rely_on(
    raw: bytes, view: object, seen: list[str]
) -> None:
    """The models themselves: Tomcat cuts raw ;params before decoding, and so on."""
    assert callable(view) and view(raw) == seen


# -- rule paths -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "normal"),
    [("/admin", "/admin"), ("/admin/", "/admin"), ("/", "/"), ("/café", "/caf%C3%A9"),
     ("/api/v1", "/api/v1"), ("/%7Euser", "/~user")],
)
def test_rule_paths(value: str, normal: str) -> None:
    """Rule paths are kept normalised, without a trailing slash."""
    assert normalise_rule_path(value) == normal


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("admin", 'must start with "/"'),
        ("/a/../b", "not in normal form; write '/b'"),
        ("//admin", "not in normal form; write '/admin'"),
        ("/admin?x=1", "plain path"),
        ("/admin;x", "plain path"),
        ("/a%2Fb", "not a valid path"),
        ("/a b", "not a valid path"),
        ("/a/...", "segments of only dots"),
    ],
)
def test_bad_rule_paths(value: str, message: str) -> None:
    """A rule path must say plainly what it protects."""
    with pytest.raises(ValueError, match=re.escape(message)):
        normalise_rule_path(value)


# -- prefix matching ------------------------------------------------------


ADMIN = Policy(rules=(AllowRule.build("/admin", allow_cn=["root"]),))


@pytest.mark.parametrize(
    ("path", "rule"),
    [
        ("/admin", "/admin"),
        ("/admin/", "/admin"),
        ("/admin/users/1", "/admin"),
        ("/admin;jsessionid=1/x", "/admin"),
        ("/admin%3Bx", "/admin"),
        ("/admin;/x", "/admin"),
        ("/admin.", "/admin"),
        ("/admin%20/x", "/admin"),
        ("/admin..%20./x", "/admin"),
        ("/admin.;x/y", "/admin"),
        ("/administrator", None),
        ("/admins", None),
        ("/Admin", None),
        ("/x/admin", None),
        ("/", None),
        ("*", None),
    ],
)
def test_prefix_matches_whole_segments(path: str, rule: str | None) -> None:
    """/admin covers /admin and below (and /admin;params), not /administrator."""
    assert ADMIN.rule_for(path).path == rule


@pytest.mark.parametrize(
    ("path", "rules"),
    [
        ("/admin/x", ["/admin"]),
        ("/admin;x/y", [None, "/admin"]),
        ("/admin.", [None, "/admin"]),
        ("/admin%20", [None, "/admin"]),
        ("/admin.;x", [None, "/admin"]),
        ("/administrator;x", [None]),
        ("/x/admin;y", [None]),
    ],
)
def test_every_reading_names_its_rule(path: str, rules: list[str | None]) -> None:
    """
    A path with parameters, or a name ending in dots or spaces, is read two
    ways (as written, and as a servlet container or Windows reads it):
    both readings' rules decide.
    """
    assert [r.path for r in ADMIN.rules_for(path)] == rules


def test_every_deciding_rule_must_admit() -> None:
    """
    /admin;x is /admin to Tomcat and "admin;x" to a WSGI app: root (admitted
    only by the /admin rule) and alice (only by the listener rule) are both
    refused there, a client both rules admit passes, and the log names the
    rule that refused.
    """
    policy = Policy(
        listener=AllowRule.build(allow_cn=["alice", "both"]),
        rules=(AllowRule.build("/admin", allow_cn=["root", "both"]),),
    )
    refused_alice = policy.decide(who("alice"), "/admin;x/y")
    assert not refused_alice.allowed and refused_alice.rule_path == "/admin"
    assert refused_alice.reason.endswith("of rule /admin")
    refused_root = policy.decide(who("root"), "/admin;x/y")
    assert not refused_root.allowed and refused_root.rule_path == ""
    assert refused_root.reason.endswith("of the listener rule")
    allowed = policy.decide(who("both"), "/admin;x/y")
    assert allowed == Decision(
        True, "the listener rule: allow-cn both; rule /admin: allow-cn both", "/admin"
    )
    assert policy.decide(who("root"), "/admin/x").allowed
    assert not policy.decide(who("root"), "/admin./x").allowed
    assert not policy.decide(who("alice"), "/admin./x").allowed


def test_an_open_rule_does_not_open_what_a_plain_backend_reads_elsewhere() -> None:
    """/public;x/secret is "public;x" to most backends: the listener rule decides too."""
    policy = Policy(
        listener=AllowRule.build(allow_cn=["root"]), rules=(AllowRule.build("/public"),)
    )
    assert policy.decide(who("mallory"), "/public/x").allowed
    for path in ("/public;x/secret", "/public./secret", "/public%20/secret"):
        decision = policy.decide(who("mallory"), path)
        assert not decision.allowed and decision.reason.endswith("of the listener rule"), path
    assert policy.decide(who("root"), "/public;x/secret").allowed


@pytest.mark.parametrize(
    ("method", "target", "allowed"),
    [(b"OPTIONS", b"*", True), (b"GET", b"*", False), (b"POST", b"*", False),
     (b"options", b"*", False), (b"GET", b"/*", True), (b"GET", b"/", True)],
)
def test_asterisk_form_is_for_options_only(method: bytes, target: bytes, allowed: bool) -> None:
    """RFC 9112 3.2.4: "*" only with OPTIONS (methods are case-sensitive); "/*" is a path."""
    assert asterisk_form_allowed(method, target) is allowed


def test_longest_prefix_decides() -> None:
    """The most specific rule wins, whatever order the rules were written in."""
    policy = Policy(
        rules=(
            AllowRule.build("/api", allow_cn=["svc"]),
            AllowRule.build("/api/admin", allow_cn=["root"]),
            AllowRule.build("/", allow_cn=["anyone"]),
        )
    )
    assert policy.rule_for("/api/admin/x").path == "/api/admin"
    assert policy.rule_for("/api/adminx").path == "/api"
    assert policy.rule_for("/other").path == "/"
    assert policy.rule_for("*").path == "/"


def test_duplicate_rule_paths_are_refused() -> None:
    """Two rules for one path would make the answer depend on their order."""
    with pytest.raises(ValueError, match="same path"):
        Policy(rules=(AllowRule.build("/a"), AllowRule.build("/a/")))


# -- decisions ------------------------------------------------------------


def test_no_rules_admit_every_client() -> None:
    """Without any allow-*, every verified client passes, and one without a certificate too."""
    policy = Policy()
    assert not policy.restricts
    assert policy.decide(who("anyone"), "/admin").allowed
    assert policy.decide(None, "/").allowed


def test_listener_rule() -> None:
    """--allow-cn alone: only those CNs, everywhere."""
    policy = Policy(listener=AllowRule.build(allow_cn=["alice"]))
    allowed = Decision(True, "the listener rule: allow-cn alice", "")
    assert policy.decide(who("alice"), "/x") == allowed
    refused = policy.decide(who("bob"), "/x")
    assert not refused.allowed and refused.rule_path == ""
    assert refused.reason.startswith("not allowed: CN bob matches no allow-cn")


def test_path_rule_overrides_the_listener_rule_both_ways() -> None:
    """Under its prefix a [[rule]] alone decides: narrower for /admin, wider for /public."""
    policy = Policy(
        listener=AllowRule.build(allow_cn=["alice", "root"]),
        rules=(AllowRule.build("/admin", allow_cn=["root"]), AllowRule.build("/public")),
    )
    assert policy.decide(who("alice"), "/app").allowed
    assert not policy.decide(who("alice"), "/admin/x").allowed
    assert policy.decide(who("root"), "/admin/x").allowed
    assert policy.decide(who("mallory"), "/public/x").allowed
    assert not policy.decide(who("mallory"), "/app").allowed


def test_anonymous_client_matches_no_allow_entry() -> None:
    """Under --client-auth optional, a client without a certificate passes only open rules."""
    policy = Policy(rules=(AllowRule.build("/admin", allow_cn=["root"]),))
    assert policy.decide(None, "/").allowed
    refused = policy.decide(None, "/admin")
    assert not refused.allowed and refused.rule_path == "/admin"
    assert "without a certificate" in refused.reason


def test_only_the_last_cn_counts() -> None:
    """With several CNs, the one forwarded (the last) is the one checked."""
    policy = Policy(listener=AllowRule.build(allow_cn=["admin"]))
    # identity_from_certificate keeps the last CN; an earlier "admin" plays no part
    assert not policy.decide(who("alice"), "/").allowed


def test_cn_match_is_exact() -> None:
    """No case folding, no trimming: ' alice' and 'Alice' are not 'alice'."""
    policy = Policy(listener=AllowRule.build(allow_cn=["alice"]))
    for cn in (" alice", "Alice", "alice\x00", "alice\n"):
        assert not policy.decide(who(cn), "/").allowed
    assert not policy.decide(who(None), "/").allowed


def test_any_ou_may_match() -> None:
    """allow-ou admits a client with that OU among its OUs."""
    policy = Policy(listener=AllowRule.build(allow_ou=["admins"]))
    assert policy.decide(who("bob", ous=("eng", "admins")), "/").allowed
    assert not policy.decide(who("bob", ous=("eng",)), "/").allowed


@pytest.mark.parametrize(
    ("pattern", "san", "matches"),
    [
        ("DNS:api.example.com", "DNS:api.example.com", True),
        ("DNS:api.example.com", "DNS:API.Example.COM", True),
        ("DNS:*.example.com", "DNS:api.example.com", True),
        ("DNS:*.example.com", "DNS:a.b.example.com", False),
        ("DNS:*.example.com", "DNS:example.com", False),
        ("DNS:*.example.com", "DNS:*.example.com", False),
        ("DNS:*.example.com", "DNS:xn--bcher-kva.example.com", False),
        ("DNS:*.example.com", "DNS:api.example.com.", False),
        ("DNS:*.example.com", "DNS: api.example.com", False),
        ("DNS:*.example.com", "DNS:a\r\nb.example.com", False),
        ("DNS:*.example.com", "DNS:é.example.com", False),
        ("DNS:api.example.com", "URI:api.example.com", False),
        ("URI:spiffe://example.com/sa/web", "URI:spiffe://example.com/sa/web", True),
        ("URI:spiffe://example.com/sa/web", "URI:spiffe://example.com/sa/web2", False),
        ("URI:spiffe://example.com/a", "URI:SPIFFE://example.com/a", False),
        ("email:alice@example.com", "email:alice@EXAMPLE.com", True),
        ("email:alice@example.com", "email:Alice@example.com", False),
        ("IP:192.0.2.7", "IP:192.0.2.7", True),
        ("IP:192.0.2.0/24", "IP:192.0.2.200", True),
        ("IP:192.0.2.0/24", "IP:198.51.100.1", False),
        ("IP:2001:db8::/32", "IP:2001:db8::1", True),
        ("IP:192.0.2.7", "IP:not-an-ip", False),
    ],
)
def test_san_patterns(pattern: str, san: str, matches: bool) -> None:
    """DNS by service-identity's wildcard rules; IP by network; URI exact; e-mail domain folded."""
    assert parse_san_pattern(pattern).matches(san) is matches
    policy = Policy(listener=AllowRule.build(allow_san=[pattern]))
    assert policy.decide(who("x", sans=(san,)), "/").allowed is matches


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("alice", "must start with DNS:, URI:, email: or IP:"),
        ("dns:a.example", "must start with"),
        ("DNS:", "empty"),
        ("DNS: a.example", "blank"),
        ("DNS:*.com", "too few host components"),
        ("DNS:a*.example.com", "whole left-most label"),
        ("DNS:a.*.example.com", "whole left-most label"),
        ("DNS:bücher.example", "not a DNS name"),
        ("DNS:a b.example", "not a DNS name"),
        ("DNS:192.0.2.1", "Invalid DNS pattern"),
        ("IP:192.0.2.300", "not an IP address"),
        ("IP:192.0.2.1/24", "not an IP address"),
    ],
)
def test_bad_san_patterns(pattern: str, message: str) -> None:
    """A pattern that could never match, or would match by accident, is a start-up error."""
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_san_pattern(pattern)


def test_san_pattern_keeps_the_operators_text() -> None:
    """Messages and logs show the pattern as written."""
    pattern = parse_san_pattern("DNS:*.Example.com")
    assert isinstance(pattern, SanPattern) and pattern.text == "DNS:*.Example.com"
    assert pattern.matches("DNS:a.example.COM")


@given(st.text(), st.lists(st.text(), max_size=3), st.lists(st.text(), max_size=3))
def test_reasons_are_one_printable_line(cn: str, ous: list[str], sans: list[str]) -> None:
    """Whatever the certificate holds, the log reason is printable ASCII and names the refusal."""
    policy = Policy(
        listener=AllowRule.build(allow_cn=["root"]),
        rules=(AllowRule.build("/ou", allow_ou=ous or ["x"]),),
    )
    identity = who(cn, ous=tuple(ous), sans=tuple("DNS:" + s for s in sans))
    for path in ("/", "/ou/x"):
        decision = policy.decide(identity, path)
        assert all(0x20 <= ord(c) < 0x7F for c in decision.reason)
        assert decision.allowed or decision.reason.startswith("not allowed")
