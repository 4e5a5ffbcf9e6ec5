"""
Tests for L{mtlsproxy.tls}: real TLS handshakes between an in-memory client
and the server context, carried by Twisted's TLS protocol over
L{twisted.test.iosim} fake transports (no sockets, no reactor, no sleeps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import SSL
from OpenSSL._util import lib as _openssl  # only for SSL_session_reused, see reused()
from OpenSSL.crypto import X509
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtlsproxy import tls
from mtlsproxy.certs import ServerIdentity
from mtlsproxy.config import Backend, Config
from mtlsproxy.errors import CertificateLoadError
from tests.certfactory import (
    Issued,
    days_ago,
    days_ahead,
    make_ca,
    make_client,
    make_crl,
    make_intermediate,
    make_server,
    pem,
)

TLS12 = SSL.TLS1_2_VERSION
TLS13 = SSL.TLS1_3_VERSION
BOTH_VERSIONS = pytest.mark.parametrize("version", [TLS12, TLS13], ids=["TLS1.2", "TLS1.3"])


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """The application side of one end: what happened, and the TLS connection."""

    def __init__(self) -> None:
        self.handshake_done = False
        self.lost: Failure | None = None
        self.connection: SSL.Connection | None = None

    def connectionMade(self) -> None:
        # Kept here because Twisted drops its reference once the connection is lost.
        self.connection = self.transport.getHandle()  # type: ignore[union-attr]

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason

    @property
    def peer(self) -> x509.Certificate | None:
        assert self.connection is not None
        return self.connection.get_peer_certificate(as_cryptography=True)


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    """A hand-built pyOpenSSL client: its own certificate, session and ALPN offer."""

    def __init__(
        self,
        context: SSL.Context,
        session: SSL.Session | None = None,
        alpn: Sequence[bytes] = (),
    ) -> None:
        self.context = context
        self.session = session
        self.alpn = list(alpn)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        if self.session is not None:
            connection.set_session(self.session)
        if self.alpn:
            connection.set_alpn_protos(self.alpn)
        return connection


@dataclass
class Handshake:
    server: Recorder
    client: Recorder
    pump: IOPump

    @property
    def reason(self) -> str:
        """What the server would log for this connection."""
        return tls.refusal_reason(self.server.connection, self.server.lost)


def connect(
    server: IOpenSSLServerConnectionCreator, client: ClientCreator, greet: bool = True
) -> Handshake:
    """Connect a client to the server creator in memory and pump until quiet."""
    server_app, client_app = Recorder(), Recorder()
    clock = Clock()
    server_tls = TLSMemoryBIOFactory(server, False, Factory.forProtocol(lambda: server_app), clock)
    client_tls = TLSMemoryBIOFactory(client, True, Factory.forProtocol(lambda: client_app), clock)
    _, _, pump = connectedServerAndClient(
        lambda: server_tls.buildProtocol(None),
        lambda: client_tls.buildProtocol(None),
        greet=greet,
        clock=clock,
    )
    return Handshake(server_app, client_app, pump)


def client_context(
    client: Issued | None, server_ca: Issued, max_version: int | None = None
) -> SSL.Context:
    """A client that verifies the server and presents C{client} (and its chain), if any."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    if client is not None:
        context.use_certificate(client.cert)
        for extra in client.chain:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(client.key)
    store = context.get_cert_store()
    assert store is not None
    store.add_cert(X509.from_cryptography(server_ca.cert))
    context.set_verify(SSL.VERIFY_PEER)
    return context


def reused(connection: SSL.Connection | None) -> bool:
    """Whether OpenSSL resumed a session; pyOpenSSL has no public API for it."""
    assert connection is not None
    return bool(_openssl.SSL_session_reused(connection._ssl))


@dataclass
class PKI:
    """Certificates and files for one test: client CA, server CA and the server."""

    client_ca: Issued
    server_ca: Issued
    server: Issued
    directory: Path

    def write_ca(self, *cas: Issued, name: str = "ca.pem") -> Path:
        path = self.directory / name
        path.write_bytes(pem(*(ca.cert for ca in cas)))
        return path

    def config(self, **options: object) -> Config:
        cert, key = self.server.write(self.directory, "server")
        options.setdefault("ca", self.write_ca(self.client_ca))
        return Config(
            backend=Backend("http://127.0.0.1:8080", "127.0.0.1", 8080),
            cert=cert,
            key=key,
            **options,  # type: ignore[arg-type]
        )

    def creator(self, **options: object) -> tls.ReloadableServerCreator:
        return tls.ReloadableServerCreator(tls.context_from_config(self.config(**options)))

    def handshake(
        self,
        client: Issued | None,
        max_version: int | None = None,
        creator: tls.ReloadableServerCreator | None = None,
        **options: object,
    ) -> Handshake:
        creator = creator or self.creator(**options)
        return connect(creator, ClientCreator(client_context(client, self.server_ca, max_version)))


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    server_ca = make_ca("Server CA")
    return PKI(make_ca("Client CA"), server_ca, make_server(server_ca), tmp_path)


def assert_refused(handshake: Handshake, reason: str) -> None:
    """The server refused the handshake and would log C{reason} (a prefix)."""
    assert not handshake.server.handshake_done
    assert handshake.server.lost is not None
    assert handshake.client.lost is not None
    assert handshake.reason.startswith(reason), handshake.reason


# --- who gets in -----------------------------------------------------------------


@BOTH_VERSIONS
def test_valid_client(pki: PKI, version: int) -> None:
    """A client certificate from the configured CA completes the handshake; the
    server sees its subject."""
    result = pki.handshake(make_client(pki.client_ca, "alice"), version)
    assert result.server.handshake_done and result.client.handshake_done
    assert result.server.lost is None
    assert result.server.peer is not None
    assert result.server.peer.subject.rfc4514_string() == "CN=alice"
    assert result.server.connection is not None
    assert result.server.connection.get_protocol_version() == version


@BOTH_VERSIONS
def test_no_certificate_required(pki: PKI, version: int) -> None:
    """With client_auth=required a client without a certificate is refused:
    "certificate required"."""
    result = pki.handshake(None, version)
    assert_refused(result, "certificate required")
    assert result.reason == "certificate required"


def test_no_certificate_required_client_view() -> None:
    """A TLS 1.3 client is told "certificate required" by the alert (TLS 1.2 gets
    only a generic handshake failure alert)."""
    error = SSL.Error([("SSL routines", "", "tlsv13 alert certificate required")])
    assert tls.refusal_reason(None, error) == "certificate required"


@BOTH_VERSIONS
def test_no_certificate_optional(pki: PKI, version: int) -> None:
    """With client_auth=optional a client without a certificate gets in, with no
    peer certificate."""
    result = pki.handshake(None, version, client_auth="optional")
    assert result.server.handshake_done
    assert result.server.lost is None
    assert result.server.peer is None


@BOTH_VERSIONS
def test_bad_certificate_optional(pki: PKI, version: int) -> None:
    """client_auth=optional does not mean "any certificate": a presented certificate
    from an unknown CA is still refused."""
    result = pki.handshake(
        make_client(make_ca("Rogue CA"), "rogue"), version, client_auth="optional"
    )
    assert_refused(result, "unknown CA")


@BOTH_VERSIONS
def test_unknown_ca(pki: PKI, version: int) -> None:
    """A client certificate from another CA is refused: "unknown CA", with depth
    and subject."""
    result = pki.handshake(make_client(make_ca("Rogue CA"), "rogue"), version)
    assert_refused(result, "unknown CA")
    assert result.reason == "unknown CA (depth 0, subject CN=rogue)"
    assert result.server.connection is not None
    failure = tls.verify_failure(result.server.connection)
    assert failure == tls.VerifyFailure(
        SSL.X509VerificationCodes.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY, 0, "CN=rogue"
    )
    assert tls.refusal_reason(None, result.client.lost) == "unknown CA"


def test_self_signed_client(pki: PKI) -> None:
    """A self-signed client certificate is refused as "unknown CA"."""
    assert_refused(
        pki.handshake(make_ca("Me Myself")), "unknown CA (depth 0, subject CN=Me Myself)"
    )


@BOTH_VERSIONS
def test_expired(pki: PKI, version: int) -> None:
    """An expired client certificate is refused: "certificate expired"."""
    client = make_client(pki.client_ca, "old", not_before=days_ago(30), not_after=days_ago(1))
    result = pki.handshake(client, version)
    assert_refused(result, "certificate expired (depth 0, subject CN=old)")


@BOTH_VERSIONS
def test_not_yet_valid(pki: PKI, version: int) -> None:
    """A client certificate from the future is refused: "certificate not yet valid"."""
    client = make_client(pki.client_ca, "new", not_before=days_ahead(1), not_after=days_ahead(9))
    assert_refused(pki.handshake(client, version), "certificate not yet valid")


@BOTH_VERSIONS
def test_server_auth_only_eku(pki: PKI, version: int) -> None:
    """A certificate whose extendedKeyUsage is only serverAuth cannot authenticate a
    client (Envoy CVE-2022-21657): "unsuitable certificate purpose"."""
    client = make_client(pki.client_ca, "server-ish", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    result = pki.handshake(client, version)
    assert_refused(result, "unsuitable certificate purpose (depth 0, subject CN=server-ish)")


def test_no_eku(pki: PKI) -> None:
    """A client certificate without extendedKeyUsage is accepted (as OpenSSL and
    nginx do)."""
    result = pki.handshake(make_client(pki.client_ca, "plain", eku=None))
    assert result.server.handshake_done
    assert result.server.peer is not None


@BOTH_VERSIONS
def test_intermediate_ca(pki: PKI, version: int) -> None:
    """A client presenting leaf + intermediate is accepted when only the root is
    trusted."""
    intermediate = make_intermediate(pki.client_ca, "Issuing CA")
    client = make_client(intermediate, "via-intermediate")
    assert client.chain == (intermediate.cert,)
    result = pki.handshake(client, version)
    assert result.server.handshake_done
    assert result.server.peer is not None
    assert result.server.peer.subject.rfc4514_string() == "CN=via-intermediate"


def test_intermediate_not_sent(pki: PKI) -> None:
    """A leaf from an intermediate, sent without the intermediate, is "unknown CA"."""
    client = make_client(make_intermediate(pki.client_ca), "lonely")
    client.chain = ()
    assert_refused(pki.handshake(client), "unknown CA (depth 0, subject CN=lonely)")


@BOTH_VERSIONS
def test_revoked(pki: PKI, version: int) -> None:
    """A client certificate listed in a configured CRL is refused: "certificate
    revoked"; one not listed gets in."""
    good = make_client(pki.client_ca, "good")
    bad = make_client(pki.client_ca, "bad")
    crl = pki.directory / "clients.crl"
    crl.write_bytes(make_crl(pki.client_ca, [bad.cert]).public_bytes(serialization.Encoding.PEM))
    creator = pki.creator(crl=(crl,))
    assert pki.handshake(good, version, creator=creator).server.handshake_done
    assert_refused(
        pki.handshake(bad, version, creator=creator),
        "certificate revoked (depth 0, subject CN=bad)",
    )


def test_crl_missing_for_issuer(pki: PKI) -> None:
    """With CRLs configured, a client whose issuer has no CRL is refused ("unable to
    get CRL"): revocation checking fails closed."""
    crl = pki.directory / "root.crl"
    crl.write_bytes(make_crl(pki.client_ca, []).public_bytes(serialization.Encoding.PEM))
    client = make_client(make_intermediate(pki.client_ca), "no-crl")
    assert_refused(pki.handshake(client, crl=(crl,)), "unable to get CRL (depth 0")


def test_crl_expired(pki: PKI) -> None:
    """A CRL past its nextUpdate refuses everyone: "CRL expired"."""
    crl = pki.directory / "old.crl"
    stale = make_crl(pki.client_ca, [], next_update_days=-0.01)
    crl.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    assert_refused(pki.handshake(make_client(pki.client_ca), crl=(crl,)), "CRL expired")


@BOTH_VERSIONS
def test_ca_names_sent(pki: PKI, version: int) -> None:
    """The CertificateRequest names every configured CA, so clients can pick a
    certificate."""
    other = make_ca("Other Client CA")
    ca = pki.write_ca(pki.client_ca, other, name="two.pem")
    result = pki.handshake(make_client(pki.client_ca), version, ca=ca)
    assert result.client.connection is not None
    names = result.client.connection.get_client_ca_list(as_cryptography=True)
    assert names == [pki.client_ca.cert.subject, other.cert.subject]


def test_min_tls_13(pki: PKI) -> None:
    """min_tls=1.3 refuses a client that speaks at most TLS 1.2."""
    result = pki.handshake(make_client(pki.client_ca), TLS12, min_tls="1.3")
    assert_refused(result, "TLS handshake failed: unsupported protocol")
    assert pki.handshake(make_client(pki.client_ca), TLS13, min_tls="1.3").server.handshake_done


def test_min_tls_12_refuses_tls11(pki: PKI) -> None:
    """The default minimum (TLS 1.2) refuses an older client."""
    context = client_context(make_client(pki.client_ca), pki.server_ca)
    context.set_min_proto_version(SSL.TLS1_1_VERSION)
    context.set_max_proto_version(SSL.TLS1_1_VERSION)
    context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    result = connect(pki.creator(), ClientCreator(context))
    assert_refused(result, "TLS handshake failed:")


# --- ALPN ------------------------------------------------------------------------


@BOTH_VERSIONS
def test_alpn_picks_http11(pki: PKI, version: int) -> None:
    """A client offering [h2, http/1.1] (as curl does) gets http/1.1."""
    context = client_context(make_client(pki.client_ca), pki.server_ca, version)
    result = connect(pki.creator(), ClientCreator(context, alpn=[b"h2", b"http/1.1"]))
    assert result.server.handshake_done and result.client.handshake_done
    assert result.client.connection is not None
    assert result.client.connection.get_alpn_proto_negotiated() == b"http/1.1"


@BOTH_VERSIONS
def test_alpn_h2_only(pki: PKI, version: int) -> None:
    """A client offering only h2 still completes the handshake, without ALPN (no
    fatal alert)."""
    context = client_context(make_client(pki.client_ca), pki.server_ca, version)
    result = connect(pki.creator(), ClientCreator(context, alpn=[b"h2"]))
    assert result.server.handshake_done and result.client.handshake_done
    assert result.server.lost is None and result.client.lost is None
    assert result.client.connection is not None
    assert result.client.connection.get_alpn_proto_negotiated() == b""


# --- session resumption ----------------------------------------------------------


@BOTH_VERSIONS
def test_session_resumption(pki: PKI, version: int) -> None:
    """A client resumes its session (TLS 1.2 session id, TLS 1.3 ticket), and the
    server still knows the client certificate on the resumed connection."""
    creator = pki.creator()
    context = client_context(make_client(pki.client_ca, "returning"), pki.server_ca, version)
    first = connect(creator, ClientCreator(context))
    assert first.server.handshake_done and not reused(first.server.connection)
    assert first.client.connection is not None
    session = first.client.connection.get_session()
    assert session is not None

    second = connect(creator, ClientCreator(context, session=session))
    assert second.server.handshake_done
    assert reused(second.server.connection) and reused(second.client.connection)
    assert second.server.peer is not None
    assert second.server.peer.subject.rfc4514_string() == "CN=returning"


def test_no_resumption_across_swap(pki: PKI) -> None:
    """After a reload swaps in a new context, old sessions are not resumed: the
    client is verified again under the new trust material."""
    creator = pki.creator()
    context = client_context(make_client(pki.client_ca), pki.server_ca, TLS12)
    first = connect(creator, ClientCreator(context))
    assert first.client.connection is not None
    session = first.client.connection.get_session()
    assert session is not None
    creator.swap(tls.context_from_config(pki.config()))
    second = connect(creator, ClientCreator(context, session=session))
    assert second.server.handshake_done
    assert not reused(second.server.connection)


@BOTH_VERSIONS
def test_session_ticket_keys_rotate(pki: PKI, version: int) -> None:
    """
    Every TICKET_KEY_LIFETIME the running service takes a fresh context (and
    with it a fresh ticket key) from the material in memory: sessions from
    before are not resumed, sessions from after are.
    """
    from twisted.internet.testing import MemoryReactorClock

    from mtlsproxy.service import make_service

    reactor = MemoryReactorClock()
    service = make_service(pki.config(), reactor)
    service.startService()
    context = client_context(make_client(pki.client_ca, "returning"), pki.server_ca, version)
    # Kept alive: OpenSSL drops a cached TLS 1.2 session whose connection is
    # freed without close_notify, which would pass for a rotation.
    handshakes: list[Handshake] = []

    def new_session() -> SSL.Session:
        handshake = connect(service.creator, ClientCreator(context))
        handshakes.append(handshake)
        assert handshake.server.handshake_done and handshake.client.connection is not None
        session = handshake.client.connection.get_session()
        assert session is not None
        return session

    def resumes(session: SSL.Session) -> bool:
        handshake = connect(service.creator, ClientCreator(context, session=session))
        handshakes.append(handshake)
        assert handshake.server.handshake_done
        return reused(handshake.server.connection)

    try:
        before = new_session()
        assert resumes(before)
        first_context = service.creator.context
        reactor.advance(tls.TICKET_KEY_LIFETIME - 1)
        assert service.creator.context is first_context
        reactor.advance(1)
        assert service.creator.context is not first_context
        assert not resumes(before)
        assert resumes(new_session())
    finally:
        service.stopService()


def test_session_id_context_follows_trust() -> None:
    """The session id context changes with the CAs, the CRLs and client_auth, and
    fits OpenSSL's 32-byte limit."""
    one, two = make_ca("One"), make_ca("Two")
    crl = make_crl(one, [])
    base = tls.session_id_context([one.cert], [], "required")
    assert base.startswith(b"mtlsproxy-") and len(base) <= 32
    assert base == tls.session_id_context([one.cert], [], "required")
    others = {
        tls.session_id_context([one.cert, two.cert], [], "required"),
        tls.session_id_context([one.cert], [crl], "required"),
        tls.session_id_context([one.cert], [], "optional"),
    }
    assert base not in others and len(others) == 3


# --- reloading -------------------------------------------------------------------


def test_creator_provides_interface(pki: PKI) -> None:
    """The creator is what TLSMemoryBIOFactory expects of a server."""
    creator = pki.creator()
    assert verifyObject(IOpenSSLServerConnectionCreator, creator)


def test_swap(pki: PKI) -> None:
    """swap() changes the rules for new connections only; a connection opened
    before keeps the context it started with."""
    old_client = make_client(pki.client_ca, "old-ca-client")
    creator = pki.creator()
    old_context = creator.context
    # Opened (server connection created) but not yet handshaken.
    opened = connect(creator, ClientCreator(client_context(old_client, pki.server_ca)), greet=False)

    new_ca = make_ca("New Client CA")
    new_context = tls.context_from_config(pki.config(ca=pki.write_ca(new_ca, name="new.pem")))
    assert creator.swap(new_context) is old_context
    assert creator.context is new_context

    opened.pump.flush()
    assert opened.server.handshake_done
    assert opened.server.connection is not None
    assert opened.server.connection.get_context() is old_context

    assert_refused(pki.handshake(old_client, creator=creator), "unknown CA")
    assert pki.handshake(
        make_client(new_ca, "new-ca-client"), creator=creator
    ).server.handshake_done


# --- building the context --------------------------------------------------------


def test_context_from_config_errors(pki: PKI) -> None:
    """Loading problems surface as CertificateLoadError from context_from_config."""
    with pytest.raises(CertificateLoadError) as info:
        tls.context_from_config(pki.config(ca=pki.directory / "missing.pem"))
    assert info.value.option == "--ca"


def test_weak_server_key(pki: PKI) -> None:
    """A server key OpenSSL's security level refuses is a CertificateLoadError naming
    --cert, not a raw OpenSSL error."""
    weak = make_server(pki.server_ca, key_type="rsa1024")
    config = pki.config()
    with pytest.raises(CertificateLoadError) as info:
        tls.build_context(config, ServerIdentity(weak.key, weak.cert), [pki.client_ca.cert], [])
    assert info.value.option == "--cert"
    assert "OpenSSL refused it" in info.value.problem


def test_build_context_needs_a_ca(pki: PKI) -> None:
    """An empty CA list never becomes a context that trusts everyone."""
    with pytest.raises(CertificateLoadError):
        tls.build_context(pki.config(), ServerIdentity(pki.server.key, pki.server.cert), [], [])


def test_context_settings(pki: PKI) -> None:
    """Verification is required (or optional) as configured, with depth 10."""
    required = tls.context_from_config(pki.config())
    assert required.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    assert required.get_verify_depth() == tls.DEFAULT_VERIFY_DEPTH == 10
    assert required.get_session_cache_mode() == SSL.SESS_CACHE_SERVER
    # set_mode returns the context's whole mode: idle connections free their buffers
    assert required.set_mode(0) & SSL.MODE_RELEASE_BUFFERS
    optional = tls.context_from_config(pki.config(client_auth="optional"))
    assert optional.get_verify_mode() == SSL.VERIFY_PEER


def test_tls12_ciphers_forward_secret(pki: PKI) -> None:
    """Only ECDHE AEAD suites are offered for TLS 1.2."""
    connection = SSL.Connection(tls.context_from_config(pki.config()), None)
    tls12 = [name for name in connection.get_cipher_list() if not name.startswith("TLS_")]
    assert tls12 and all(name.startswith("ECDHE-") for name in tls12)
    assert all("GCM" in name or "CHACHA20" in name for name in tls12)


# --- refusal reasons -------------------------------------------------------------


def test_closed_during_handshake(pki: PKI) -> None:
    """A client that hangs up mid-handshake is logged as "connection closed during
    handshake"."""
    server_app = Recorder()
    factory = TLSMemoryBIOFactory(
        pki.creator(), False, Factory.forProtocol(lambda: server_app), Clock()
    )
    protocol = factory.buildProtocol(None)
    assert protocol is not None
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(b"\x16\x03\x01\x00\xff\x01")  # the start of a ClientHello
    protocol.connectionLost(Failure(ConnectionLost()))
    assert not server_app.handshake_done
    assert server_app.lost is not None
    assert tls.refusal_reason(server_app.connection, server_app.lost) == (
        "connection closed during handshake"
    )


@pytest.mark.parametrize(
    "error",
    [
        None,
        ConnectionDone(),
        Failure(ConnectionLost()),
        SSL.SysCallError(-1, "Unexpected EOF"),
        SSL.Error([]),
    ],
)
def test_reason_closed(error: BaseException | Failure | None) -> None:
    """EOF-like endings read "connection closed during handshake"."""
    assert tls.refusal_reason(None, error) == "connection closed during handshake"


def test_reason_other_ssl_error() -> None:
    """Any other OpenSSL error reads "TLS handshake failed: <reason>"."""
    error = SSL.Error([("SSL routines", "", "no shared cipher")])
    assert tls.refusal_reason(None, Failure(error)) == "TLS handshake failed: no shared cipher"
    assert tls.refusal_reason(None, ValueError("boom")) == "TLS handshake failed: boom"


def test_reason_unmapped_verify_error() -> None:
    """A verification error without plain words still says what it is, with its code."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_SERVER_METHOD), None)
    tls._failures[connection] = tls.VerifyFailure(
        SSL.X509VerificationCodes.ERR_INVALID_POLICY_EXTENSION, 1, "CN=odd"
    )
    reason = tls.refusal_reason(connection, None)
    code = SSL.X509VerificationCodes.ERR_INVALID_POLICY_EXTENSION
    assert reason == f"certificate verify failed (error {code}) (depth 1, subject CN=odd)"


def test_system_trust_store_ignored(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default verify paths (SSL_CERT_FILE / the system store) are never loaded:
    a client from a CA that is only there is refused as "unknown CA"."""
    system_ca = make_ca("System-Wide CA")
    system_file = pki.write_ca(system_ca, name="system.pem")
    monkeypatch.setenv("SSL_CERT_FILE", str(system_file))
    monkeypatch.setenv("SSL_CERT_DIR", str(pki.directory))
    assert_refused(pki.handshake(make_client(system_ca, "outsider")), "unknown CA")
