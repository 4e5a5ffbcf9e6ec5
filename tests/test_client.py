"""
mtlsproxy.client against a real in-process TLS server that requires client
certificates, with certificates made by ``mtlsproxy pki init``: the client
presents its certificate (PEM or PKCS#12), checks the server's name, and a
server without a valid client certificate refuses it.
"""

from __future__ import annotations

import io
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory
from twisted.web.client import HTTPConnectionPool, ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from mtlsproxy.cli import main
from mtlsproxy.client import (
    ClientCertificateError,
    client_tls_options,
    load_tls_material,
    make_agent,
    make_treq_client,
)

from . import certfactory


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, server (localhost/127.0.0.1/::1), client and keystores, plus a wrongly named server."""
    directory = tmp_path_factory.mktemp("client") / "pki"
    err = io.StringIO()
    assert main(["pki", "init", str(directory), "--p12"], out=io.StringIO(), err=err) == 0, err
    assert (
        main(["pki", "issue", str(directory), "--server", "wrong.example"], out=io.StringIO()) == 0
    )
    return directory


def password(path: Path) -> bytes:
    """The daemon's rule: the file's content without its trailing newline."""
    return path.read_bytes().rstrip(b"\r\n")


class EchoClientCN(Resource):
    """Answers every request with the common name of the client certificate it saw."""

    isLeaf = True

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def render_GET(self, request: Request) -> bytes:
        peer = cast(Any, request.channel.transport).getPeerCertificate()
        names = peer.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(names[0].value)
        self.seen.append(cn)
        return cn.encode("utf-8")


@implementer(IOpenSSLContextFactory)
class ServerContextFactory:
    """A pyOpenSSL context demanding a client certificate from the given CA, built by hand."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.use_certificate_chain_file(str(cert))
        context.use_privatekey_file(str(key))
        context.check_privatekey()
        context.load_verify_locations(str(ca))
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        self._context = context

    def getContext(self) -> SSL.Context:
        return self._context


@dataclass
class Server:
    port: Any
    url: bytes
    seen: list[str] = field(default_factory=list)


def reactor() -> Any:
    from twisted.internet import reactor as global_reactor

    return global_reactor


def start_server(pki_dir: Path, name: str = "server") -> Server:
    seen: list[str] = []
    factory = ServerContextFactory(
        pki_dir / f"{name}-cert.pem", pki_dir / f"{name}-key.pem", pki_dir / "ca-cert.pem"
    )
    port = reactor().listenSSL(0, Site(EchoClientCN(seen)), factory, interface="127.0.0.1")
    url = f"https://127.0.0.1:{port.getHost().port}/".encode("ascii")
    return Server(port, url, seen)


def failure_text(error: BaseException) -> str:
    """Everything the failures wrapped in a ResponseFailed/ResponseNeverReceived say."""
    reasons = getattr(error, "reasons", [])
    return " ".join(f"{r.type.__name__}: {r.value}" for r in reasons)


@pytest.fixture
def pool() -> Generator[HTTPConnectionPool, None, None]:
    """A non-persistent pool, so no connection outlives its test."""
    pool = HTTPConnectionPool(reactor(), persistent=False)
    yield pool
    pytest_twisted.blockon(pool.closeCachedConnections())


@pytest_twisted.inlineCallbacks
def test_pem_client_certificate_is_accepted(pki_dir: Path, pool: HTTPConnectionPool) -> Any:
    """With client-cert.pem/client-key.pem the request succeeds and the server sees CN=client."""
    server = start_server(pki_dir)
    try:
        agent = make_agent(
            reactor(),
            cert=pki_dir / "client-cert.pem",
            key=pki_dir / "client-key.pem",
            ca=pki_dir / "ca-cert.pem",
            pool=pool,
        )
        response = yield agent.request(b"GET", server.url)
        body = yield treq.content(response)
    finally:
        yield server.port.stopListening()
    assert response.code == 200
    assert body == b"client"
    assert server.seen == ["client"]


@pytest_twisted.inlineCallbacks
def test_pkcs12_keystore_and_truststore_are_accepted(
    pki_dir: Path, pool: HTTPConnectionPool
) -> Any:
    """With client-keystore.p12 and client-truststore.p12 (and their .pass files) it works too."""
    server = start_server(pki_dir)
    try:
        agent = make_agent(
            reactor(),
            keystore=pki_dir / "client-keystore.p12",
            keystore_password=password(pki_dir / "client-keystore.pass"),
            truststore=pki_dir / "client-truststore.p12",
            truststore_password=password(pki_dir / "client-truststore.pass"),
            pool=pool,
        )
        response = yield agent.request(b"GET", server.url)
        body = yield treq.content(response)
    finally:
        yield server.port.stopListening()
    assert (response.code, body) == (200, b"client")
    assert server.seen == ["client"]


@pytest_twisted.inlineCallbacks
def test_treq_client_with_fixed_hostname(pki_dir: Path, pool: HTTPConnectionPool) -> Any:
    """
    make_treq_client works like requests; with hostname= the certificate is
    checked for that name (localhost) although the URL has an address.
    """
    server = start_server(pki_dir)
    try:
        client = make_treq_client(
            reactor(),
            "localhost",
            keystore=pki_dir / "client-keystore.p12",
            keystore_password=password(pki_dir / "client-keystore.pass"),
            ca=pki_dir / "ca-cert.pem",
            pool=pool,
        )
        response = yield client.get(server.url.decode("ascii"))
        text = yield response.text()
    finally:
        yield server.port.stopListening()
    assert text == "client"


@pytest_twisted.inlineCallbacks
def test_server_with_the_wrong_name_is_refused(pki_dir: Path, pool: HTTPConnectionPool) -> Any:
    """
    A server whose certificate (from the right CA) is for wrong.example is
    refused when the client expects 127.0.0.1: no request reaches it.
    """
    server = start_server(pki_dir, "wrong.example")
    try:
        agent = make_agent(
            reactor(),
            cert=pki_dir / "client-cert.pem",
            key=pki_dir / "client-key.pem",
            ca=pki_dir / "ca-cert.pem",
            pool=pool,
        )
        with pytest.raises((ResponseNeverReceived, ResponseFailed)) as caught:
            yield agent.request(b"GET", server.url)
    finally:
        yield server.port.stopListening()
    assert "VerificationError" in failure_text(caught.value)
    assert server.seen == []


@pytest_twisted.inlineCallbacks
def test_server_from_another_ca_is_refused(
    pki_dir: Path, tmp_path: Path, pool: HTTPConnectionPool
) -> Any:
    """A server certificate for the right name but from an unknown CA fails verification."""
    other = certfactory.make_ca("Other CA")
    certfactory.make_server(other).write(tmp_path, "server")
    (tmp_path / "ca-cert.pem").write_bytes(certfactory.pem(other.cert))
    server = start_server(tmp_path)
    try:
        agent = make_agent(
            reactor(),
            cert=pki_dir / "client-cert.pem",
            key=pki_dir / "client-key.pem",
            ca=pki_dir / "ca-cert.pem",
            pool=pool,
        )
        with pytest.raises((ResponseNeverReceived, ResponseFailed)) as caught:
            yield agent.request(b"GET", server.url)
    finally:
        yield server.port.stopListening()
    assert "certificate verify failed" in failure_text(caught.value)
    assert server.seen == []


@pytest_twisted.inlineCallbacks
def test_client_without_certificate_is_refused(pki_dir: Path, pool: HTTPConnectionPool) -> Any:
    """A client that presents no certificate gets a TLS error, never an HTTP answer."""
    server = start_server(pki_dir)
    try:
        agent = make_agent(reactor(), ca=pki_dir / "ca-cert.pem", pool=pool)
        with pytest.raises((ResponseNeverReceived, ResponseFailed)) as caught:
            yield agent.request(b"GET", server.url)
    finally:
        yield server.port.stopListening()
    assert "SSL" in failure_text(caught.value) or "Error" in failure_text(caught.value)
    assert server.seen == []


@pytest_twisted.inlineCallbacks
def test_intermediate_in_the_client_pem_is_sent(tmp_path: Path, pool: HTTPConnectionPool) -> Any:
    """
    A client certificate from an intermediate CA works when its PEM file
    carries the intermediate: the client sends it, the server trusts only the root.
    """
    root = certfactory.make_ca("Root CA")
    intermediate = certfactory.make_intermediate(root)
    certfactory.make_server(root).write(tmp_path, "server")
    (tmp_path / "ca-cert.pem").write_bytes(certfactory.pem(root.cert))
    client_cert, client_key = certfactory.make_client(intermediate, "carol").write(
        tmp_path, "carol"
    )
    server = start_server(tmp_path)
    try:
        agent = make_agent(
            reactor(), cert=client_cert, key=client_key, ca=tmp_path / "ca-cert.pem", pool=pool
        )
        response = yield agent.request(b"GET", server.url)
        body = yield treq.content(response)
    finally:
        yield server.port.stopListening()
    assert body == b"carol"


def test_client_tls_options_provides_the_interface(pki_dir: Path) -> None:
    """client_tls_options returns a connection creator usable with endpoints and connectSSL."""
    options = client_tls_options(
        "localhost",
        cert=pki_dir / "client-cert.pem",
        key=pki_dir / "client-key.pem",
        ca=pki_dir / "ca-cert.pem",
    )
    assert IOpenSSLClientConnectionCreator.providedBy(options)


def test_file_problems_name_the_file(pki_dir: Path, tmp_path: Path) -> None:
    """Missing files, bad passwords, mismatched keys: ClientCertificateError naming the file."""
    with pytest.raises(ClientCertificateError, match="no such file"):
        load_tls_material(ca=tmp_path / "missing.pem")
    with pytest.raises(ClientCertificateError, match="wrong password") as caught:
        load_tls_material(keystore=pki_dir / "client-keystore.p12", keystore_password=b"nope")
    assert caught.value.path == pki_dir / "client-keystore.p12"
    with pytest.raises(ClientCertificateError, match="does not match"):
        load_tls_material(cert=pki_dir / "client-cert.pem", key=pki_dir / "server-key.pem")
    with pytest.raises(ClientCertificateError, match="no PEM certificate"):
        load_tls_material(ca=pki_dir / "client-key.pem")


def test_contradictory_arguments_are_programming_errors(pki_dir: Path) -> None:
    """cert without key, or both PEM and PKCS#12 for the same thing, raise ValueError."""
    with pytest.raises(ValueError, match="together"):
        load_tls_material(cert=pki_dir / "client-cert.pem")
    with pytest.raises(ValueError, match="not both"):
        load_tls_material(
            cert=pki_dir / "client-cert.pem",
            key=pki_dir / "client-key.pem",
            keystore=pki_dir / "client-keystore.p12",
        )
    with pytest.raises(ValueError, match="not both"):
        load_tls_material(ca=pki_dir / "ca-cert.pem", truststore=pki_dir / "client-truststore.p12")


def test_keystore_chain_leaves_out_the_root(pki_dir: Path) -> None:
    """The keystore's CA is a self-signed root, so it is not sent as an extra chain certificate."""
    material = load_tls_material(
        keystore=pki_dir / "client-keystore.p12",
        keystore_password=password(pki_dir / "client-keystore.pass"),
    )
    assert material.certificate is not None
    assert isinstance(material.client_certificate, ssl.PrivateCertificate)
    assert material.chain == ()
    assert material.trust_root is None  # platform trust when no CA is given
