"""
Who may reach what, against the running daemon (docs/identity.md, "Access
control" and "Revocation"):

  - C{--allow-cn}, C{--allow-ou}, C{--allow-san}: matching clients are
    forwarded, the others get a short 403, a log line
    C{refused PEER: not allowed: ...}, and nothing reaches the backend;
  - C{[[rule]]} tables from a TOML C{--config}: the longest prefix decides on
    the normalised path, every spelling of C{/admin} is C{/admin}, ambiguous
    targets get 400, and the backend receives the normalised target;
  - without per-path rules the target is forwarded byte for byte;
  - CRLs (a revoked intermediate, a CRL past its next-update) and
    C{--verify-depth} refuse clients at the handshake with the documented reason.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
import uuid
from collections.abc import Iterator, Sequence

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from .extra_certs import NOW, A, Extra, cn, extra_for, name
from .harness import Backend, ClientCert, HttpResponse, Pki, Proxy, ProxyLauncher

pytestmark = pytest.mark.e2e

TLS_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]
JSON = (("Accept", "application/json"),)
LISTENER = "the listener rule"


@pytest.fixture(scope="module")
def extra(pki: Pki) -> Extra:
    return extra_for(pki)


def fetch(
    proxy: Proxy,
    client: ClientCert | str | None,
    target: str,
    headers: Sequence[tuple[str, str]] = JSON,
    method: str = "GET",
) -> tuple[HttpResponse, str]:
    """
    One request on a fresh TLS connection, the target sent exactly as given
    (Python's ssl: no client-side normalisation); the response and the peer
    address the proxy logs.  C{Accept: application/json} makes the example
    app echo the request for any path.
    """
    with proxy.tls(client) as conn:
        return conn.request(method, target, list(headers)), conn.peer


def assert_forwarded(
    proxy: Proxy, client: ClientCert | str | None, target: str, arrives_as: str | None = None
) -> HttpResponse:
    """The request reaches the backend, which sees C{arrives_as} (default: C{target})."""
    response, _ = fetch(proxy, client, target)
    assert response.status == 200, (target, response.status, response.body[:300])
    echo = response.echo()
    assert echo.target == (target if arrives_as is None else arrives_as), (target, echo.target)
    return response


def refusal_pattern(peer: str, who: str, where: str) -> str:
    return (
        rf"(?m)refused {re.escape(peer)}: not allowed: {re.escape(who)} matches no "
        rf"allow-cn, allow-ou or allow-san of {re.escape(where)}$"
    )


def assert_not_allowed(
    proxy: Proxy, client: ClientCert | str | None, target: str, who: str, where: str = LISTENER
) -> None:
    """
    403 with a short body, and the documented log line naming this
    connection, the client (C{CN alice}) and the deciding rule.
    """
    response, peer = fetch(proxy, client, target)
    assert response.status == 403, (target, response.status, response.body[:300])
    assert 0 < len(response.body) <= 100, response.body
    assert b"not allowed" in response.body, response.body
    proxy.wait_for_log(refusal_pattern(peer, who, where))


def request_lines(targets: Sequence[str]) -> list[str]:
    return [f"GET {t} HTTP/1.1" for t in targets]


# -- listener-wide allow options ---------------------------------------------------


def test_allow_cn_admits_exactly_that_cn(start_proxy, backend, extra):
    """
    --allow-cn alice: alice is forwarded with her CN; bob, "Alice" (the
    comparison is case-sensitive), "alice " (no trimming) and a certificate
    without CN get 403 and a "not allowed" log line, and the backend's request
    log holds only alice's request.
    """
    proxy = start_proxy("--allow-cn", "alice")
    alice = extra.client("alice")
    echo = assert_forwarded(proxy, alice, "/ok").echo()
    assert echo.values("X-Client-Cert-CN") == ["alice"]
    assert_not_allowed(proxy, extra.client("bob"), "/bob", "CN bob")
    assert_not_allowed(proxy, extra.client("Alice"), "/upper", "CN Alice")
    assert_not_allowed(proxy, extra.client("alice-blank", "alice "), "/blank", "CN alice%20")
    no_cn = extra.client(
        "no-cn-only-o", name(A(NameOID.ORGANIZATION_NAME, "Example Corp"))
    )
    assert_not_allowed(proxy, no_cn, "/no-cn", "a client certificate without CN")
    assert backend.requests() == request_lines(["/ok"])


def test_allow_ou_admits_any_matching_ou(start_proxy, backend, extra):
    """
    --allow-ou platform: a certificate with OUs "eng" and "platform" is
    forwarded (any OU may match); OU "Platform" and no OU at all get 403.
    """
    proxy = start_proxy("--allow-ou", "platform")
    both = extra.client(
        "ou-eng-platform",
        name(A(NameOID.ORGANIZATIONAL_UNIT_NAME, "eng"),
             A(NameOID.ORGANIZATIONAL_UNIT_NAME, "platform"), cn("ou-member")),
    )
    assert_forwarded(proxy, both, "/member")
    upper = extra.client(
        "ou-upper", name(A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Platform"), cn("ou-upper"))
    )
    assert_not_allowed(proxy, upper, "/upper", "CN ou-upper")
    assert_not_allowed(proxy, extra.client("ou-none"), "/none", "CN ou-none")
    assert backend.requests() == request_lines(["/member"])


def dns_client(extra: Extra, label: str, *names: str) -> ClientCert:
    return extra.client(label, sans=[x509.DNSName(n) for n in names])


def test_allow_san_dns_wildcard_is_one_whole_label(start_proxy, backend, extra):
    """
    --allow-san DNS:*.example.com admits api.example.com (and API.Example.COM:
    DNS names compare case-insensitively), but not example.com, not
    a.b.example.com, not an IDN label (xn--...), not a look-alike suffix, and
    not a certificate whose DNS name is itself a wildcard.
    """
    proxy = start_proxy("--allow-san", "DNS:*.example.com")
    assert_forwarded(proxy, dns_client(extra, "dns-api", "api.example.com"), "/api")
    assert_forwarded(proxy, dns_client(extra, "dns-api-upper", "API.Example.COM"), "/upper")
    refused = {
        "dns-apex": "example.com",
        "dns-two-labels": "a.b.example.com",
        "dns-idn": "xn--bcher-kva.example.com",
        "dns-suffix": "api.example.com.evil.test",
        "dns-lookalike": "apiexample.com",
        "dns-wildcard-cert": "*.example.com",
    }
    for label, dns in refused.items():
        assert_not_allowed(proxy, dns_client(extra, label, dns), f"/{label}", f"CN {label}")
    assert backend.requests() == request_lines(["/api", "/upper"])


def test_allow_san_uri_is_exact(start_proxy, backend, extra):
    """
    --allow-san URI:spiffe://example.com/ns/prod/sa/alice admits exactly that
    URI: a longer one, one with a trailing slash and one with the host in
    upper case get 403.
    """
    uri = "spiffe://example.com/ns/prod/sa/alice"
    proxy = start_proxy("--allow-san", f"URI:{uri}")

    def uri_client(label: str, value: str) -> ClientCert:
        return extra.client(label, sans=[x509.UniformResourceIdentifier(value)])

    assert_forwarded(proxy, uri_client("uri-alice", uri), "/spiffe")
    for label, value in {
        "uri-longer": uri + "2",
        "uri-slash": uri + "/",
        "uri-upper-host": "spiffe://EXAMPLE.com/ns/prod/sa/alice",
    }.items():
        assert_not_allowed(proxy, uri_client(label, value), f"/{label}", f"CN {label}")
    assert backend.requests() == request_lines(["/spiffe"])


def test_allow_san_email_local_part_exact_domain_any_case(start_proxy, backend, extra):
    """
    --allow-san email:alice@example.com admits alice@example.com and
    alice@EXAMPLE.COM (the domain is case-insensitive); Alice@example.com (the
    local part is exact) and bob@example.com get 403.
    """
    proxy = start_proxy("--allow-san", "email:alice@example.com")

    def mail_client(label: str, value: str) -> ClientCert:
        return extra.client(label, sans=[x509.RFC822Name(value)])

    assert_forwarded(proxy, mail_client("mail-alice", "alice@example.com"), "/mail")
    assert_forwarded(proxy, mail_client("mail-domain-upper", "alice@EXAMPLE.COM"), "/domain")
    assert_not_allowed(proxy, mail_client("mail-local-upper", "Alice@example.com"), "/local",
                       "CN mail-local-upper")
    assert_not_allowed(proxy, mail_client("mail-bob", "bob@example.com"), "/bob", "CN mail-bob")
    assert backend.requests() == request_lines(["/mail", "/domain"])


def test_allow_san_ip_network(start_proxy, backend, extra):
    """--allow-san IP:192.0.2.0/24 admits an IP SAN inside the network, not one outside."""
    proxy = start_proxy("--allow-san", "IP:192.0.2.0/24")

    def ip_client(label: str, value: str) -> ClientCert:
        return extra.client(label, sans=[x509.IPAddress(ipaddress.ip_address(value))])

    assert_forwarded(proxy, ip_client("ip-inside", "192.0.2.7"), "/inside")
    assert_not_allowed(proxy, ip_client("ip-outside", "198.51.100.7"), "/outside",
                       "CN ip-outside")
    assert backend.requests() == request_lines(["/inside"])


def test_any_one_allow_entry_admits(start_proxy, backend, extra):
    """
    With --allow-cn, --allow-ou and --allow-san together, a client matching any
    one of them is forwarded; a client matching none gets 403.
    """
    proxy = start_proxy(
        "--allow-cn", "carol", "--allow-ou", "sre", "--allow-san", "DNS:*.example.com"
    )
    assert_forwarded(proxy, extra.client("carol"), "/by-cn")
    sre = extra.client("ou-sre", name(A(NameOID.ORGANIZATIONAL_UNIT_NAME, "sre"), cn("ou-sre")))
    assert_forwarded(proxy, sre, "/by-ou")
    assert_forwarded(proxy, dns_client(extra, "dns-api", "api.example.com"), "/by-san")
    assert_not_allowed(proxy, extra.client("bob"), "/nobody", "CN bob")
    assert backend.requests() == request_lines(["/by-cn", "/by-ou", "/by-san"])


# -- per-path rules from a TOML file -------------------------------------------------

RULES_TOML = """\
allow-cn = ["alice", "admin"]

[[rule]]
path = "/admin"
allow-cn = ["admin"]

[[rule]]
path = "/admin/audit"
allow-cn = ["auditor"]

[[rule]]
path = "/open"
"""


@pytest.fixture(scope="module")
def rules_stack(
    pki: Pki, extra: Extra, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Backend, Proxy]]:
    """
    One backend and one proxy started with C{--config} holding RULES_TOML,
    for the tests that each look at single requests.  A traceback in the
    proxy's log fails the module, as with the harness's own fixtures.
    """
    workdir = tmp_path_factory.mktemp("rules")
    config = extra.write("rules.toml", RULES_TOML)
    app = Backend.start(workdir / "backend")
    launch = ProxyLauncher(pki, workdir / "proxy", app.url)
    try:
        yield app, launch.start("--config", str(config))
    finally:
        problems = launch.stop_all()
        app.stop()
    if problems:
        pytest.fail("traceback in the proxy log:\n" + "\n\n".join(problems), pytrace=False)


def assert_nothing_reached_backend(backend: Backend, proxy: Proxy, seen_before: int) -> None:
    """
    Nothing arrived at the backend since C{seen_before} requests: an admitted
    sentinel request, sent after the refusal was answered, is the only new line.
    """
    sentinel = f"/sentinel-{uuid.uuid4().hex}"
    response, _ = fetch(proxy, "admin", sentinel)
    assert response.status == 200, response.body[:300]
    assert backend.requests()[seen_before:] == request_lines([sentinel])


@pytest.mark.parametrize(
    "target",
    [
        "/",
        "/public",
        "/public/x?y=1",
        "/administrator",
        "/admin-panel",
        "/adminx/y",
        "/ADMIN",
        "/Admin/x",
        "/s?q=/../admin",
    ],
)
def test_listener_rule_decides_outside_the_rule_prefix(rules_stack, extra, target):
    """
    alice (allowed by the listener-wide allow-cn) reaches every path that no
    [[rule]] covers, and the backend sees the target she sent: /administrator
    and /admin-panel are not under /admin (whole segments), /ADMIN is a
    different path (comparison is case-sensitive, as docs/identity.md says
    under "Not covered"), and a query is not part of the path.
    """
    _, proxy = rules_stack
    alice = extra.client("alice")
    assert_forwarded(proxy, alice, target)


ADMIN_SPELLINGS = [
    "/admin",
    "/admin/",
    "/admin/x",
    "/admin/x/y?z=1",
    "/x/../admin",
    "/x/../admin/x",
    "//admin",
    "///admin//x",
    "/./admin",
    "/admin/./x",
    "/%61dmin",
    "/%61%64%6D%69%6E/x",
    "/%2E%2E/admin",
    "/%2e/admin",
    "/../../admin",
    "/a/b/../../admin/x",
    "/admin;jsessionid=1/x",
    "/admin%3Bx",
    "/admin/audit/../x",
    "http://localhost/admin/x",
    "/admin;/x",
    "/admin./x",
    "/admin%2e",
    "/admin%20/x",
    "/admin.;x/y",
]


@pytest.mark.parametrize("target", ADMIN_SPELLINGS)
def test_every_spelling_of_admin_is_refused_for_alice(rules_stack, extra, target):
    """
    alice gets 403 on /admin, /admin/, /admin/x and on every spelling that
    normalises to a path under /admin (dot segments, empty segments,
    percent-encoded unreserved characters, path parameters, absolute-form),
    logged as refused by rule /admin; nothing reaches the backend.  Names
    that only some backends read as "admin" (admin;, admin. and admin%20,
    which servlet containers and Windows trim) are decided by the /admin
    rule too, besides the listener rule that admits alice.
    """
    backend, proxy = rules_stack
    before = len(backend.requests())
    assert_not_allowed(proxy, extra.client("alice"), target, "CN alice", "rule /admin")
    assert_nothing_reached_backend(backend, proxy, before)


AMBIGUOUS = [
    "/%2Fadmin",
    "/admin%2Fx",
    "/admin%2fx",
    "/x/..;/admin",
    "/x/%2E%2E;/admin",
    "/.;x/admin",
    "/admin/..;/x",
    "/admin%5Cx",
    "/admin\\x",
    "/admin%00",
    "/adm%zzin",
    "/admin%4",
    "/admin#x",
    "/;x/admin",
    "/;/admin",
    "/admin/;/audit",
    "/admin/;x/audit",
    "/%3Bx/admin",
    "/x/..%3B/admin",
    "/..;/admin",
    "/admin/.;/x",
    "/x/.../admin",
    "/x/..%20/admin",
]


@pytest.mark.parametrize("client_kind", ["alice", "admin"])
@pytest.mark.parametrize("target", AMBIGUOUS)
def test_ambiguous_targets_get_400(rules_stack, extra, target, client_kind):
    """
    Targets that backends disagree about (an encoded slash, "..;" and ".;"
    also encoded, a segment with parameters but no name, ";x", which Tomcat
    drops so that /;x/admin is /admin and /admin/;/audit is /admin/audit,
    "...", "..%20" that Windows trims to nothing, a backslash raw or
    encoded, %00, an invalid escape, "#") are refused with 400, even for
    admin, who may reach /admin: this is not a permission question, nothing
    can be checked for them.  Nothing reaches the
    backend, and the access log records the 400 for this connection.
    """
    backend, proxy = rules_stack
    before = len(backend.requests())
    response, peer = fetch(proxy, extra.client(client_kind), target)
    assert response.status == 400, (target, response.status, response.body[:300])
    assert len(response.body) <= 200, response.body
    proxy.wait_for_log(rf'{re.escape(peer)} {client_kind} "GET \S+ HTTP/1\.1" 400 ')
    assert_nothing_reached_backend(backend, proxy, before)


@pytest.mark.parametrize(
    ("target", "arrives_as"),
    [
        ("/admin/x", "/admin/x"),
        ("/admin/", "/admin/"),
        ("/admin/x?y=1&z=%20", "/admin/x?y=1&z=%20"),
        ("/echo/../admin/x", "/admin/x"),
        ("//admin//x", "/admin/x"),
        ("/%61dmin/./x", "/admin/x"),
        ("/../../admin/x", "/admin/x"),
        ("/admin/x/..", "/admin/"),
        ("/s/../admin?q=/../x&r=%2F", "/admin?q=/../x&r=%2F"),
        ("/admin/caf%c3%a9", "/admin/caf%C3%A9"),
        ("/admin/%7Euser", "/admin/~user"),
        ("/admin;jsessionid=1/x", "/admin;jsessionid=1/x"),
    ],
)
def test_admin_reaches_admin_and_backend_gets_the_normalised_target(
    rules_stack, extra, target, arrives_as
):
    """
    admin may reach /admin; the backend receives the normalised target, the
    very path the rule was checked against (dot and empty segments resolved,
    unreserved escapes decoded, other escapes in upper case, raw non-ASCII
    bytes escaped, the query untouched), and a target that is already
    normal arrives byte for byte.
    """
    _, proxy = rules_stack
    assert_forwarded(proxy, extra.client("admin"), target, arrives_as)


def test_raw_non_ascii_target_gets_400_as_documented(rules_stack, extra):
    """
    docs/identity.md, "Path normalisation": raw non-ASCII bytes in a request
    target are not HTTP (RFC 9112 3.2); the parser answers 400 and nothing
    reaches the backend, while the percent-encoded spelling is forwarded.
    """
    backend, proxy = rules_stack
    raw = "/admin/caf\u00e9".encode().decode("latin-1")  # sent as the bytes C3 A9
    before = len(backend.requests())
    response, _ = fetch(proxy, extra.client("admin"), raw)
    assert response.status == 400
    assert len(backend.requests()) == before
    assert_forwarded(proxy, extra.client("admin"), "/admin/caf%c3%a9", "/admin/caf%C3%A9")


def test_absolute_form_is_forwarded_in_origin_form(rules_stack, extra):
    """
    An absolute-form request (http://backend.test/admin/x?y=1) reaches the
    backend as /admin/x?y=1, with the authority as its Host (RFC 9112 3.2).
    """
    _, proxy = rules_stack
    response, _ = fetch(proxy, extra.client("admin"), "http://backend.test/admin/x?y=1")
    echo = response.echo()
    assert echo.target == "/admin/x?y=1"
    assert echo.values("Host") == ["backend.test"]


def test_longest_prefix_decides_and_replaces_the_listener_rule(rules_stack, extra):
    """
    The longest matching [[rule]] decides alone: /admin/audit admits only
    auditor (not admin, although /admin admits admin), /admin/auditing is
    under /admin, and /open (a rule without allow-*) admits bob, whom the
    listener rule refuses everywhere else.
    """
    backend, proxy = rules_stack
    before = len(backend.requests())
    admin, auditor, bob = (extra.client(n) for n in ("admin", "auditor", "bob"))
    assert_forwarded(proxy, auditor, "/admin/audit/log")
    assert_forwarded(proxy, admin, "/admin/auditing")
    assert_forwarded(proxy, bob, "/open/x")
    assert_forwarded(proxy, bob, "/open")
    assert_not_allowed(proxy, admin, "/admin/audit", "CN admin", "rule /admin/audit")
    assert_not_allowed(proxy, admin, "/admin/x/../audit/y", "CN admin", "rule /admin/audit")
    assert_not_allowed(proxy, auditor, "/admin/x", "CN auditor", "rule /admin")
    assert_not_allowed(proxy, auditor, "/", "CN auditor", LISTENER)
    assert_not_allowed(proxy, bob, "/", "CN bob", LISTENER)
    assert_not_allowed(proxy, bob, "/opener", "CN bob", LISTENER)
    # "open;x" and "open." are other names to most backends: the open rule
    # does not lend itself to them, the listener rule decides too.
    assert_not_allowed(proxy, bob, "/open;x/y", "CN bob", LISTENER)
    assert_not_allowed(proxy, bob, "/open./y", "CN bob", LISTENER)
    assert backend.requests()[before:] == request_lines(
        ["/admin/audit/log", "/admin/auditing", "/open/x", "/open"]
    )


@pytest.mark.parametrize("with_rules", [True, False], ids=["rules", "no-rules"])
def test_asterisk_form_is_for_options_only(rules_stack, start_proxy, backend, extra,
                                          with_rules):
    """
    RFC 9112 3.2.4: "GET *" (and any method but OPTIONS) gets 400, logged
    as refused, and nothing reaches the backend, with or without [[rule]]s;
    "OPTIONS *" is forwarded as it is.
    """
    client: ClientCert | str = "client"
    if with_rules:
        backend, proxy = rules_stack
        client = extra.client("admin")
    else:
        proxy = start_proxy()
    for method in ("GET", "POST", "DELETE"):
        response, peer = fetch(proxy, client, "*", method=method)
        assert response.status == 400, (method, response.status, response.body[:300])
        proxy.wait_for_log(
            rf"refused {re.escape(peer)}: asterisk-form target \(\*\) with a method other than "
            "OPTIONS"
        )
    response, _ = fetch(proxy, client, "*", method="OPTIONS")
    assert response.status != 400, response.body[:300]
    lines = backend.requests()
    assert "OPTIONS * HTTP/1.1" in lines
    assert not [line for line in lines if line.endswith(" * HTTP/1.1")
                and not line.startswith("OPTIONS ")], lines


@pytest.mark.parametrize("target", ["/x/../admin", "/./admin/x", "//admin", "/%61dmin"])
def test_curl_path_as_is_cannot_bypass_the_rule(rules_stack, extra, target):
    """
    curl --path-as-is sends dot segments and doubled slashes unchanged: alice
    still gets 403 and nothing reaches the backend.
    """
    backend, proxy = rules_stack
    before = len(backend.requests())
    result = proxy.curl(target, "--path-as-is", client=extra.client("alice"))
    assert result.status == 403, result.describe()
    proxy.wait_for_log(r"not allowed: CN alice matches no .* of rule /admin")
    assert_nothing_reached_backend(backend, proxy, before)


# -- allow-ou and allow-san in [[rule]] tables; anonymous clients ---------------------

OU_SAN_TOML = """\
[[rule]]
path = "/sre"
allow-ou = ["sre"]

[[rule]]
path = "/mesh"
allow-san = ["URI:spiffe://example.com/ns/prod/sa/auditor", "DNS:*.svc.example.com"]

[[rule]]
path = "/mesh/open"
"""


def test_rule_tables_with_allow_ou_and_allow_san(start_proxy, backend, extra):
    """
    [[rule]] tables with allow-ou and allow-san: under /sre only the sre OU,
    under /mesh only the SPIFFE URI or a *.svc.example.com DNS name; the
    open /mesh/open and the unrestricted rest admit anyone; refusals name
    the rule; nothing refused reaches the backend.
    """
    proxy = start_proxy("--config", str(extra.write("ou-san.toml", OU_SAN_TOML)))
    sre = extra.client("ou-sre", name(A(NameOID.ORGANIZATIONAL_UNIT_NAME, "sre"), cn("ou-sre")))
    auditor = extra.client(
        "uri-auditor",
        sans=[x509.UniformResourceIdentifier("spiffe://example.com/ns/prod/sa/auditor")],
    )
    svc = dns_client(extra, "dns-svc", "api.svc.example.com")
    bob = extra.client("bob")
    assert_forwarded(proxy, sre, "/sre/x")
    assert_forwarded(proxy, auditor, "/mesh/a")
    assert_forwarded(proxy, svc, "/mesh/b")
    assert_forwarded(proxy, bob, "/mesh/open/c")
    assert_forwarded(proxy, bob, "/elsewhere")
    assert_not_allowed(proxy, bob, "/sre", "CN bob", "rule /sre")
    assert_not_allowed(proxy, auditor, "/sre/x", "CN uri-auditor", "rule /sre")
    assert_not_allowed(proxy, sre, "/mesh/a", "CN ou-sre", "rule /mesh")
    assert_not_allowed(proxy, dns_client(extra, "dns-api", "api.example.com"), "/mesh/x",
                       "CN dns-api", "rule /mesh")
    assert backend.requests() == request_lines(
        ["/sre/x", "/mesh/a", "/mesh/b", "/mesh/open/c", "/elsewhere"]
    )


def test_anonymous_client_under_optional_client_auth(start_proxy, backend, extra):
    """
    --client-auth optional with the rules of RULES_TOML: a client without a
    certificate gets 403 wherever an allow-* restricts (rule /admin, and the
    listener rule), logged as "a client without a certificate"; on the
    open /open it is forwarded without any identity header.
    """
    proxy = start_proxy(
        "--config", str(extra.write("rules-optional.toml", RULES_TOML)),
        "--client-auth", "optional", "--forward-cert", "xfcc",
    )
    for target, where in (("/admin/x", "rule /admin"), ("/", LISTENER), ("/open;x", LISTENER)):
        assert_not_allowed(proxy, None, target, "a client without a certificate", where)
    response = assert_forwarded(proxy, None, "/open/x")
    names = [n.lower() for n, _ in response.echo().headers]
    assert not [n for n in names if n.startswith(("x-client-cert", "x-forwarded-client-cert",
                                                   "client-cert"))], names
    assert_forwarded(proxy, extra.client("alice"), "/alice")
    assert backend.requests() == request_lines(["/open/x", "/alice"])


# -- without per-path rules: byte for byte -------------------------------------------

RAW_TARGETS = [
    "/a%2Fb/../c?x=1&y=%20",
    "//x/./y/%7e?q=..",
    "/%2e%2E/z;p=1",
    "/caf%c3%a9/%41",
    "/x/..;/admin",
]


@pytest.mark.parametrize("options", [(), ("--allow-cn", "client")], ids=["open", "allow-cn"])
def test_without_rules_the_target_is_forwarded_byte_for_byte(start_proxy, options):
    """
    Without any [[rule]] (with or without listener-wide allow options) the
    path decides nothing, and the backend receives the client's target
    unchanged, escapes, dot segments, doubled slashes and query included.
    """
    proxy = start_proxy(*options)
    for target in RAW_TARGETS:
        response, _ = fetch(proxy, "client", target)
        assert response.echo().target == target


# -- who may connect at all: CRLs and verify depth -------------------------------------


def assert_refused_at_handshake(proxy: Proxy, client: ClientCert | str, reason: str) -> None:
    """Over TLS 1.2 and 1.3: no HTTP response, and `refused PEER: REASON` logged."""
    for version in TLS_VERSIONS:
        attempt = proxy.attempt(client, max_version=version)
        assert attempt.refused, (version, attempt)
        proxy.wait_for_log(rf"refused {re.escape(attempt.peer)}: {re.escape(reason)}")


def test_revoked_intermediate_cuts_off_its_clients(start_proxy, backend, pki, extra):
    """
    A CRL from the root listing an intermediate CA (and that intermediate's own,
    empty, CRL): clients it issued are refused at the handshake with
    "certificate revoked"; clients of another intermediate (with its CRL) and
    of the root itself are still forwarded.
    """
    revoked_ca = extra.intermediate("revoked")
    good_ca = extra.intermediate("good")
    proxy = start_proxy(
        "--crl", str(extra.crl("root-revoking", pki.ca, [revoked_ca.cert])),
        "--crl", str(extra.crl("revoked-empty", revoked_ca)),
        "--crl", str(extra.crl("good-empty", good_ca)),
    )
    assert_refused_at_handshake(
        proxy, extra.client("under-revoked", issuer=revoked_ca), "certificate revoked"
    )
    assert backend.requests() == []
    assert_forwarded(proxy, extra.client("under-good", issuer=good_ca), "/good")
    assert_forwarded(proxy, "client", "/root")
    assert backend.requests() == request_lines(["/good", "/root"])


def test_leaf_revoked_by_its_intermediates_crl(start_proxy, backend, pki, extra):
    """
    A client listed in the CRL of the intermediate that issued it is
    refused at the handshake with "certificate revoked"; its sibling under
    the same intermediate is forwarded, and nothing of the revoked one
    reaches the backend.
    """
    issuing = extra.intermediate("leaf-crl")
    revoked = extra.client("leaf-revoked", issuer=issuing)
    sibling = extra.client("leaf-sibling", issuer=issuing)
    proxy = start_proxy(
        "--crl", str(extra.crl("leaf-crl-root-empty", pki.ca)),
        "--crl", str(extra.crl("leaf-crl-issuing", issuing, [revoked.issued.cert])),
    )
    assert_refused_at_handshake(proxy, revoked, "certificate revoked")
    assert backend.requests() == []
    assert_forwarded(proxy, sibling, "/sibling")
    assert backend.requests() == request_lines(["/sibling"])


def test_intermediate_without_crl_is_refused(start_proxy, backend, pki, extra):
    """
    With CRLs checked for the whole chain, a client under an intermediate that
    has no CRL among the --crl files is refused: "unable to get CRL".
    """
    good_ca = extra.intermediate("good")
    proxy = start_proxy("--crl", str(extra.crl("root-empty", pki.ca)))
    assert_refused_at_handshake(
        proxy, extra.client("under-good", issuer=good_ca), "unable to get CRL"
    )
    assert backend.requests() == []
    assert_forwarded(proxy, "client", "/root")


def test_crl_past_next_update_refuses_everyone(start_proxy, backend, pki, extra):
    """
    A root CRL past its next-update (revoking nobody): the proxy fails closed,
    every client under that root, issued directly or through an intermediate
    with a current CRL, is refused at the handshake with "CRL expired";
    nothing reaches the backend.
    """
    good_ca = extra.intermediate("good")
    expired = extra.crl(
        "root-expired", pki.ca, [],
        last_update=NOW - datetime.timedelta(days=10),
        next_update=NOW - datetime.timedelta(days=1),
    )
    proxy = start_proxy("--crl", str(expired), "--crl", str(extra.crl("good-empty", good_ca)))
    assert_refused_at_handshake(proxy, "client", "CRL expired")
    assert_refused_at_handshake(proxy, extra.client("under-good", issuer=good_ca), "CRL expired")
    assert backend.requests() == []


def test_verify_depth_zero_admits_only_clients_of_a_trusted_ca(start_proxy, backend, extra):
    """
    --verify-depth 0: a client issued through an intermediate is refused at
    the handshake ("certificate chain too long"); a client issued by the root
    directly is forwarded.  --verify-depth 1 admits the chained client.
    """
    chained = extra.client("under-good", issuer=extra.intermediate("good"))
    proxy = start_proxy("--verify-depth", "0")
    assert_refused_at_handshake(proxy, chained, "certificate chain too long")
    assert backend.requests() == []
    assert_forwarded(proxy, "client", "/direct")
    deeper = start_proxy("--verify-depth", "1")
    assert_forwarded(deeper, chained, "/chained")
    assert backend.requests() == request_lines(["/direct", "/chained"])
