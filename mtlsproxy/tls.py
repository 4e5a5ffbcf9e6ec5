"""
Configuration -> the OpenSSL server context that enforces mutual TLS.

Everything about who may connect is decided here, by OpenSSL, during the
handshake: only the configured CAs are trusted (never the system store), the
client certificate's purpose must allow client authentication, CRLs are
checked when given, and a refused handshake leaves behind the first
verification failure so that L{refusal_reason} can log it in plain words.

L{ReloadableServerCreator} lets a reload swap in a new context for new
connections while connections already open keep the one they started with.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import SSL
from OpenSSL._util import lib as _openssl
from OpenSSL.crypto import X509, X509StoreFlags
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

from . import certs
from .config import Config
from .errors import CertificateLoadError

#: TLS 1.2 suites: forward secret, AEAD only (Mozilla "intermediate", no DHE).
TLS12_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

#: Signature algorithms, both for the server's own signature and those asked
#: of client certificates in the CertificateRequest: OpenSSL's defaults less
#: SHA-1, SHA-224 and DSA, which no certificate made this decade needs.
SIGALGS = b":".join(
    [
        b"ECDSA+SHA256", b"ECDSA+SHA384", b"ECDSA+SHA512", b"ed25519", b"ed448",
        b"rsa_pss_pss_sha256", b"rsa_pss_pss_sha384", b"rsa_pss_pss_sha512",
        b"rsa_pss_rsae_sha256", b"rsa_pss_rsae_sha384", b"rsa_pss_rsae_sha512",
        b"RSA+SHA256", b"RSA+SHA384", b"RSA+SHA512",
    ]
)

DEFAULT_VERIFY_DEPTH = 10
#: seconds a TLS session (id or ticket) may be resumed
SESSION_LIFETIME = 300
#: seconds between new session ticket keys (a new context: see
#: ProxyService.rotate_session_keys); Go's crypto/tls rotates daily, nginx
#: only on reload.  An hour bounds what a leaked key decrypts to an hour of
#: sessions, and costs a full handshake to clients whose session is older
#: than the rotation.
TICKET_KEY_LIFETIME = 3600
#: SSL_MODE_NO_AUTO_CHAIN from OpenSSL's ssl.h, which pyOpenSSL does not name
_SSL_MODE_NO_AUTO_CHAIN = 0x8

#: The only application protocol the proxy speaks.
HTTP11 = b"http/1.1"

_V = SSL.X509VerificationCodes

#: X509_V_ERR_* -> the words operators grep for.
_VERIFY_REASONS: dict[int, str] = {
    _V.ERR_UNABLE_TO_GET_ISSUER_CERT: "unknown CA",
    _V.ERR_DEPTH_ZERO_SELF_SIGNED_CERT: "unknown CA",
    _V.ERR_SELF_SIGNED_CERT_IN_CHAIN: "unknown CA",
    _V.ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "unknown CA",
    _V.ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE: "unknown CA",
    _V.ERR_CERT_UNTRUSTED: "unknown CA",
    _V.ERR_CERT_SIGNATURE_FAILURE: "certificate signature invalid",
    _V.ERR_CERT_HAS_EXPIRED: "certificate expired",
    _V.ERR_CERT_NOT_YET_VALID: "certificate not yet valid",
    _V.ERR_CERT_REVOKED: "certificate revoked",
    _V.ERR_INVALID_PURPOSE: "unsuitable certificate purpose",
    _V.ERR_CRL_HAS_EXPIRED: "CRL expired",
    _V.ERR_CRL_NOT_YET_VALID: "CRL not yet valid",
    _V.ERR_UNABLE_TO_GET_CRL: "unable to get CRL",
    _V.ERR_CRL_SIGNATURE_FAILURE: "CRL signature invalid",
    _V.ERR_CERT_CHAIN_TOO_LONG: "certificate chain too long",
    _V.ERR_INVALID_CA: "invalid CA certificate",
    _V.ERR_PATH_LENGTH_EXCEEDED: "invalid CA certificate",
    _V.ERR_INVALID_NON_CA: "invalid CA certificate",
    _V.ERR_KEYUSAGE_NO_CERTSIGN: "invalid CA certificate",
    # X509_V_ERR_EE_KEY_TOO_SMALL, _CA_KEY_TOO_SMALL, _CA_MD_TOO_WEAK: refused
    # by OpenSSL's security level (e.g. RSA-1024, SHA-1 signatures).
    66: "certificate key too small",
    67: "CA certificate key too small",
    68: "CA certificate signature too weak",
}

#: OpenSSL error-queue reason text (lower case, substring) -> operator words.
#: The server sees its own reason; a client sees the alert the server sent.
_SSL_REASONS: tuple[tuple[str, str], ...] = (
    ("peer did not return a certificate", "certificate required"),
    ("alert certificate required", "certificate required"),
    ("alert unknown ca", "unknown CA"),
    ("alert certificate expired", "certificate expired"),
    ("alert certificate revoked", "certificate revoked"),
    ("alert unsupported certificate", "unsuitable certificate purpose"),
)


@dataclass(frozen=True)
class VerifyFailure:
    """
    The first certificate check OpenSSL failed on one connection.

    @ivar errno: the C{X509_V_ERR_*} code.
    @ivar depth: 0 for the client's own certificate, 1 for its issuer, ...
    @ivar subject: the failing certificate's subject, RFC 4514.
    """

    errno: int
    depth: int
    subject: str


# Keyed weakly by connection: the record lives exactly as long as the
# connection, whatever the application protocol does with it.
_failures: weakref.WeakKeyDictionary[SSL.Connection, VerifyFailure] = weakref.WeakKeyDictionary()


def verify_failure(connection: SSL.Connection) -> VerifyFailure | None:
    """The first certificate verification failure recorded for C{connection}."""
    return _failures.get(connection)


def _verify_callback(
    connection: SSL.Connection, cert: X509, errno: int, depth: int, ok: int
) -> bool:
    """
    Record the first failure and return OpenSSL's own verdict unchanged.

    The callback is for reporting only: turning a failure into success here is
    how a proxy ends up accepting any certificate.
    """
    if not ok and connection not in _failures:
        subject = cert.to_cryptography().subject.rfc4514_string()
        _failures[connection] = VerifyFailure(errno, depth, subject)
    return bool(ok)


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> bytes | object:
    """
    Choose http/1.1 when offered; otherwise carry on without ALPN rather than
    fail, since a client that offers only h2 may still fall back to HTTP/1.1.
    """
    return HTTP11 if HTTP11 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def session_id_context(
    cas: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    client_auth: str,
) -> bytes:
    """
    The session id context: a digest of everything that decides whether a
    client is trusted, so that a session verified under old trust material is
    never resumed under new trust material.  At most 32 bytes, as OpenSSL allows.
    """
    digest = hashlib.sha256(client_auth.encode("ascii"))
    for cert in cas:
        digest.update(cert.public_bytes(Encoding.DER))
    for crl in crls:
        digest.update(crl.public_bytes(Encoding.DER))
    return b"mtlsproxy-" + digest.hexdigest()[:16].encode("ascii")


def build_context(
    config: Config,
    identity: certs.ServerIdentity,
    cas: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    verify_depth: int = DEFAULT_VERIFY_DEPTH,
) -> SSL.Context:
    """
    Build the server context from already loaded material.

    @raise CertificateLoadError: if OpenSSL refuses the server certificate or
        key (for example a key too small for OpenSSL's security level).
    """
    if not cas:
        # certs.load_client_cas already refuses this; never trust everyone.
        raise CertificateLoadError("--ca", "(none)", "no CA certificate to trust")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION if config.min_tls == "1.3" else SSL.TLS1_2_VERSION)
    options = SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE
    options |= getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    ctx.set_options(options)
    ctx.set_cipher_list(TLS12_CIPHERS)
    # pyOpenSSL has no call for this; cryptography's binding has the function.
    if not _openssl.SSL_CTX_set1_sigalgs_list(ctx._context, SIGALGS):  # type: ignore[attr-defined]
        raise RuntimeError("OpenSSL refused SIGALGS")  # pragma: no cover - a constant list

    option = "--keystore" if config.keystore is not None else "--cert"
    path = str(config.keystore if config.keystore is not None else config.cert)
    try:
        ctx.use_certificate(identity.cert)
        for extra in identity.chain:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(identity.key)
        ctx.check_privatekey()
    except SSL.Error as e:
        raise CertificateLoadError(option, path, f"OpenSSL refused it: {_short(e)}") from None

    # The context's own store starts empty; set_default_verify_paths is never
    # called, so the system trust store plays no part.
    store = ctx.get_cert_store()
    if store is None:  # pragma: no cover - OpenSSL always gives a context a store
        raise CertificateLoadError(option, path, "OpenSSL gave the context no certificate store")
    for ca in cas:
        store.add_cert(X509.from_cryptography(ca))
        ctx.add_client_ca(ca)
    if crls:
        for crl in crls:
            store.add_crl(crl)
        # The leaf and every intermediate are checked: a revoked intermediate
        # must not keep signing clients in (each CA then needs its CRL).
        store.set_flags(X509StoreFlags.CRL_CHECK | X509StoreFlags.CRL_CHECK_ALL)

    mode = SSL.VERIFY_PEER
    if config.client_auth == "required":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    ctx.set_verify(mode, _verify_callback)
    ctx.set_verify_depth(verify_depth)

    ctx.set_session_id(session_id_context(cas, crls, config.client_auth))
    ctx.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    # A resumed session skips certificate verification, so it must not
    # outlive the certificate by long: 5 minutes, as nginx's default
    # ssl_session_timeout (OpenSSL's own is 2 hours). The proxy also refuses
    # a resumed session whose certificate has expired since.
    ctx.set_timeout(SESSION_LIFETIME)
    # Send exactly the chain configured: OpenSSL would otherwise complete
    # the server's chain from the store of *client* CAs.  And free a
    # connection's 34 KiB of record buffers while it is idle, as nginx does:
    # 1,000 idle connections took 62 MiB without, 35 MiB with, and the
    # keep-alive path showed no cost within the noise (docs/performance.md).
    ctx.set_mode(_SSL_MODE_NO_AUTO_CHAIN | SSL.MODE_RELEASE_BUFFERS)
    ctx.set_alpn_select_callback(_select_alpn)  # type: ignore[arg-type]
    return ctx


@dataclass(frozen=True)
class Material:
    """Everything a server context is built from, loaded and checked."""

    identity: certs.ServerIdentity
    cas: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]

    def digest(self) -> bytes:
        """
        Equal for equal material: a reload that finds the same certificates,
        key, CAs and CRLs keeps the running context, and with it the session
        cache and ticket keys, so clients go on resuming their sessions.
        """
        h = hashlib.sha256()
        for cert in (self.identity.cert, *self.identity.chain, *self.cas):
            h.update(cert.public_bytes(Encoding.DER))
        h.update(self.identity.key.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        ))
        for crl in self.crls:
            h.update(crl.public_bytes(Encoding.DER))
        return h.digest()


def load_material(config: Config) -> Material:
    """
    Load every file the configuration names: what start-up, reload and
    C{mtlsproxy check} read, once, before building anything from it.

    @raise CertificateLoadError: naming the option and file that is wrong.
    """
    return Material(
        certs.load_server_identity(config),
        certs.load_client_cas(config),
        certs.load_crls(config.crl),
    )


def context_from_material(config: Config, material: Material) -> SSL.Context:
    """The server context for C{config} from already loaded material."""
    return build_context(
        config, material.identity, material.cas, material.crls, verify_depth=config.verify_depth
    )


def context_from_config(config: Config) -> SSL.Context:
    """
    Load every file the configuration names and build the server context.

    @raise CertificateLoadError: naming the option and file that is wrong.
    """
    return context_from_material(config, load_material(config))


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerCreator:
    """
    Make each new server connection from the current context.

    A connection keeps the context it was made with, so L{swap} affects only
    connections accepted afterwards; open ones finish under the old rules.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    @property
    def context(self) -> SSL.Context:
        """The context new connections get."""
        return self._context

    def swap(self, context: SSL.Context) -> SSL.Context:
        """Use C{context} for new connections; return the previous one."""
        previous, self._context = self._context, context
        return previous

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        """Twisted's hook: a fresh connection on the current context."""
        return SSL.Connection(self._context, None)


def _short(error: SSL.Error) -> str:
    """The reason strings of an OpenSSL error queue, without the noise."""
    queue = error.args[0] if error.args else None
    if isinstance(queue, list) and queue:
        reasons = [entry[-1] for entry in queue if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(str(r) for r in dict.fromkeys(reasons))
    if isinstance(error, SSL.SysCallError) and len(error.args) == 2:
        return str(error.args[1])
    return str(error) or type(error).__name__


def refusal_reason(connection: SSL.Connection | None, error: BaseException | Failure | None) -> str:
    """
    Why a handshake failed, beginning with the plain words operators grep for
    ("certificate required", "unknown CA", "certificate expired", ...).

    @param connection: the connection (C{transport.getHandle()}), whose
        recorded verification failure is the most precise explanation.
    @param error: what ended the connection: an C{SSL.Error}, a Twisted
        connection-closed error, or C{None}.
    """
    failure = verify_failure(connection) if connection is not None else None
    if failure is not None:
        words = _VERIFY_REASONS.get(
            failure.errno, f"certificate verify failed (error {failure.errno})"
        )
        return f"{words} (depth {failure.depth}, subject {failure.subject or '(empty)'})"
    if isinstance(error, Failure):
        error = error.value
    if error is None or isinstance(error, ConnectionClosed):
        return "connection closed during handshake"
    if isinstance(error, SSL.Error):
        short = _short(error)
        if (
            isinstance(error, SSL.SysCallError | SSL.ZeroReturnError)
            or not error.args
            or (isinstance(error.args[0], list) and not error.args[0])
        ):
            return "connection closed during handshake"
        lowered = short.lower()
        for needle, words in _SSL_REASONS:
            if needle in lowered:
                return words
        return f"TLS handshake failed: {short}"
    return f"TLS handshake failed: {error}"
