"""
The client side of mutual TLS, for Twisted programs that talk to mtlsproxy.

Assembled by hand, a mutual-TLS client goes wrong silently: the easy mistakes
are trusting every server, checking the chain but not the host name,
or forgetting the client certificate so that the proxy hangs up without an
HTTP answer.  These functions build the one correct configuration:

  - the server is verified against the given CA (or the platform's trust
    store if none is given) I{and} its name is checked with service-identity,
    through L{twisted.internet.ssl.optionsForClientTLS};
  - the client certificate comes from PEM files (C{cert}/C{key}) or a PKCS#12
    keystore (C{keystore}/C{keystore_password}), as C{mtlsproxy pki init}
    writes them;
  - the CA comes from a PEM file (C{ca}) or a PKCS#12 truststore
    (C{truststore}/C{truststore_password}).

Example (treq is optional: C{pip install treq}, or use L{make_agent})::

    from pathlib import Path
    from twisted.internet import defer, task
    from mtlsproxy.client import make_treq_client

    async def main(reactor):
        pki = Path("pki")
        http = make_treq_client(reactor, cert=pki / "client-cert.pem",
                                key=pki / "client-key.pem", ca=pki / "ca-cert.pem")
        response = await http.get("https://localhost:8443/")
        print(response.code, await response.text())

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))

The reactor is always an argument: a library must not pick the global reactor
for its caller (tests run their own, applications may choose another).
Files are read once, when the options or agent are made; a problem with them
raises L{ClientCertificateError} naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import OpenSSL
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.client import Agent, HostnameCachingHTTPSPolicy, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from .errors import MtlsProxyError

if TYPE_CHECKING:
    from treq.client import HTTPClient

__all__ = [
    "ClientCertificateError",
    "ClientCertificatePolicy",
    "ClientTLSMaterial",
    "client_tls_options",
    "load_tls_material",
    "make_agent",
    "make_treq_client",
]


class ClientCertificateError(MtlsProxyError):
    """
    A client certificate, key, keystore, CA or truststore file cannot be used.

    @ivar path: the file.
    """

    def __init__(self, path: Path, problem: str) -> None:
        self.path = path
        super().__init__(f"{path}: {problem}")


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ClientCertificateError(path, "no such file") from None
    except IsADirectoryError:
        raise ClientCertificateError(path, "is a directory") from None
    except OSError as e:
        raise ClientCertificateError(path, f"cannot read: {e.strerror}") from None


def _pem_certificates(path: Path) -> list[x509.Certificate]:
    data = _read(path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ClientCertificateError(path, "no PEM certificate in it")
    return certs


def _load_pkcs12(path: Path, password: bytes | None) -> pkcs12.PKCS12KeyAndCertificates:
    data = _read(path)
    try:
        return pkcs12.load_pkcs12(data, password)
    except ValueError:
        hint = "no password given" if password is None else "wrong password"
        raise ClientCertificateError(path, f"not a PKCS#12 file, or {hint}") from None


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _check_key_matches(path: Path, cert: x509.Certificate, key: Any) -> None:
    if _public_der(key.public_key()) != _public_der(cert.public_key()):
        raise ClientCertificateError(path, "the private key does not match the certificate")


def _pyopenssl_version() -> tuple[int, int]:
    major, minor, *_ = OpenSSL.__version__.split(".")
    return int(major), int(minor)


#: pyOpenSSL 24.3 takes cryptography keys and certificates in Context.use_*
#: and deprecates its own X509/PKey there; Twisted's PrivateCertificate still
#: hands over the old types, which warns on every connection.
_PYOPENSSL_TAKES_CRYPTOGRAPHY = _pyopenssl_version() >= (24, 3)


@dataclass(frozen=True)
class ClientTLSMaterial:
    """
    Everything read from files, ready to make options for any host name.

    @ivar trust_root: the CAs that may sign the server's certificate (an
        C{IOpenSSLTrustRoot}), or C{None} for the platform's trust store.
    @ivar certificate: the client certificate to present, or C{None}.
    @ivar private_key: its private key (checked to match), or C{None}.
    @ivar chain: intermediate certificates sent after the client's own
        (self-signed roots are left out: the server has them or must not
        trust them).
    """

    trust_root: Any
    certificate: x509.Certificate | None = None
    private_key: Any = field(default=None, repr=False)
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def client_certificate(self) -> ssl.PrivateCertificate | None:
        """The client certificate and key as Twisted's L{ssl.PrivateCertificate}."""
        if self.certificate is None:
            return None
        return ssl.PrivateCertificate.fromCertificateAndKeyPair(
            ssl.Certificate(crypto.X509.from_cryptography(self.certificate)),
            ssl.KeyPair(crypto.PKey.from_cryptography_key(self.private_key)),
        )

    def options_for(self, hostname: str) -> IOpenSSLClientConnectionCreator:
        """Options verifying that the server's certificate is valid for C{hostname}."""
        if self.certificate is None:
            return ssl.optionsForClientTLS(hostname, trustRoot=self.trust_root)
        if not _PYOPENSSL_TAKES_CRYPTOGRAPHY:  # pragma: no cover - pyOpenSSL < 24.3
            old_extra: dict[str, Any] = {}
            if self.chain:
                old_extra["extraCertChain"] = [crypto.X509.from_cryptography(c) for c in self.chain]
            return ssl.optionsForClientTLS(
                hostname,
                trustRoot=self.trust_root,
                clientCertificate=self.client_certificate,
                extraCertificateOptions=old_extra,
            )
        # The same as clientCertificate=, with the types current pyOpenSSL wants.
        extra: dict[str, Any] = {"privateKey": self.private_key, "certificate": self.certificate}
        if self.chain:
            extra["extraCertChain"] = list(self.chain)
        return ssl.optionsForClientTLS(
            hostname, trustRoot=self.trust_root, extraCertificateOptions=extra
        )


def load_tls_material(
    *,
    cert: Path | None = None,
    key: Path | None = None,
    keystore: Path | None = None,
    keystore_password: bytes | None = None,
    ca: Path | None = None,
    truststore: Path | None = None,
    truststore_password: bytes | None = None,
) -> ClientTLSMaterial:
    """
    Read the client certificate and the trusted CAs once.

    @raise ValueError: contradictory arguments (C{cert} without C{key},
        C{cert} together with C{keystore}, C{ca} together with C{truststore}):
        a programming error, not a file problem.
    @raise ClientCertificateError: a file is missing, unreadable, has the
        wrong password, or its key does not match its certificate.
    """
    if (cert is None) != (key is None):
        raise ValueError("cert and key must be given together")
    if cert is not None and keystore is not None:
        raise ValueError("give either cert/key or keystore, not both")
    if ca is not None and truststore is not None:
        raise ValueError("give either ca or truststore, not both")

    leaf: x509.Certificate | None = None
    private_key: Any = None
    chain: Sequence[x509.Certificate] = ()
    if cert is not None and key is not None:
        leaf, *chain = _pem_certificates(cert)
        key_data = _read(key)
        try:
            private_key = serialization.load_pem_private_key(key_data, password=None)
        except TypeError:
            raise ClientCertificateError(key, "the private key is encrypted") from None
        except ValueError:
            raise ClientCertificateError(key, "not a PEM private key") from None
        _check_key_matches(key, leaf, private_key)
    elif keystore is not None:
        loaded = _load_pkcs12(keystore, keystore_password)
        if loaded.key is None or loaded.cert is None:
            raise ClientCertificateError(keystore, "holds no private key with a certificate")
        leaf, private_key = loaded.cert.certificate, loaded.key
        chain = [c.certificate for c in loaded.additional_certs]
        _check_key_matches(keystore, leaf, private_key)

    trust_root: Any = None
    trusted: list[x509.Certificate] = []
    if ca is not None:
        trusted = _pem_certificates(ca)
    elif truststore is not None:
        loaded = _load_pkcs12(truststore, truststore_password)
        trusted = [c.certificate for c in loaded.additional_certs]
        if loaded.cert is not None:
            trusted.append(loaded.cert.certificate)
        if not trusted:
            raise ClientCertificateError(truststore, "holds no certificates")
    if trusted:
        trust_root = ssl.trustRootFromCertificates(
            [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in trusted]
        )
    return ClientTLSMaterial(
        trust_root, leaf, private_key, tuple(c for c in chain if not _self_signed(c))
    )


def client_tls_options(
    hostname: str,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    keystore: Path | None = None,
    keystore_password: bytes | None = None,
    ca: Path | None = None,
    truststore: Path | None = None,
    truststore_password: bytes | None = None,
) -> IOpenSSLClientConnectionCreator:
    """
    TLS options for one connection to C{hostname}, for endpoints and C{connectSSL}.

    The server must present a certificate signed by C{ca} (PEM) or a CA in
    C{truststore} (PKCS#12) -- the platform's trust store if neither is
    given -- that is valid for C{hostname} (a DNS name or an IP address,
    checked by service-identity).  The client presents C{cert}/C{key} (PEM)
    or the key entry of C{keystore} (PKCS#12), if given.

    @raise ClientCertificateError: see L{load_tls_material}.
    """
    return load_tls_material(
        cert=cert,
        key=key,
        keystore=keystore,
        keystore_password=keystore_password,
        ca=ca,
        truststore=truststore,
        truststore_password=truststore_password,
    ).options_for(hostname)


@implementer(IPolicyForHTTPS)
class ClientCertificatePolicy:
    """
    An L{IPolicyForHTTPS} like L{BrowserLikePolicyForHTTPS}, but presenting a
    client certificate and trusting the given CAs.

    By default the name checked is the host of each request's URL, as a
    browser does.  With C{hostname}, that name is checked for every
    connection instead: for reaching a server by an address or an alias that
    its certificate does not name (C{curl --connect-to}).
    """

    def __init__(self, material: ClientTLSMaterial, hostname: str | None = None) -> None:
        self._material = material
        self._hostname = hostname

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """Options for one network location; Agent calls this for every new connection."""
        if self._hostname is not None:
            return self._material.options_for(self._hostname)
        # An IPv6 literal arrives from the URL with its brackets.
        return self._material.options_for(hostname.decode("ascii").strip("[]"))


def make_agent(
    reactor: Any,
    hostname: str | None = None,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    keystore: Path | None = None,
    keystore_password: bytes | None = None,
    ca: Path | None = None,
    truststore: Path | None = None,
    truststore_password: bytes | None = None,
    pool: HTTPConnectionPool | None = None,
    connect_timeout: float | None = None,
) -> Agent:
    """
    A L{twisted.web.client.Agent} whose HTTPS requests present the client
    certificate and verify the server as L{client_tls_options} does.

    @param reactor: the reactor to use (never defaulted to the global one).
    @param hostname: the name to verify on every connection; by default the
        host of each request's URL.
    @param pool: a connection pool (for persistent connections); by default
        Agent's own non-persistent pool.
    @param connect_timeout: seconds to wait for the TCP connection.
    @raise ClientCertificateError: see L{load_tls_material}.
    """
    material = load_tls_material(
        cert=cert,
        key=key,
        keystore=keystore,
        keystore_password=keystore_password,
        ca=ca,
        truststore=truststore,
        truststore_password=truststore_password,
    )
    # Creating a context for every connection is costly; cache per host name.
    policy = HostnameCachingHTTPSPolicy(ClientCertificatePolicy(material, hostname))
    return Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=pool)


def make_treq_client(reactor: Any, hostname: str | None = None, **options: Any) -> HTTPClient:
    """
    A L{treq.client.HTTPClient} over L{make_agent}, for C{requests}-like code;
    C{options} are L{make_agent}'s keyword arguments, passed on unchanged.

    treq is optional (the C{test} extra); it is imported only here.
    """
    from treq.client import HTTPClient

    return HTTPClient(make_agent(reactor, hostname, **options))
