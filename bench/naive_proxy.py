#!/usr/bin/env python3
"""
The baseline bench/run.py calls "twisted-naive": what a Twisted user would write by hand
instead of mtlsproxy. twisted.web's ReverseProxyResource, served by twisted.web's Site over
TLS with a client certificate required (Twisted's own CertificateOptions, built with
PrivateCertificate.options(ca)), plus the identity header, taken from the peer certificate.

    python bench/naive_proxy.py --port 8443 --backend-port 8080 \
        --cert server-cert.pem --key server-key.pem --ca ca-cert.pem

It logs like a twistd app (one access line per request, on stdout).
docs/design.md explains why mtlsproxy does not use this (the whole request body is read
before forwarding, a new HTTP/1.0 backend connection per request, no HTTP/1.0 keep-alive).
"""

from __future__ import annotations

import argparse
import sys
from urllib.parse import quote

from twisted.internet import reactor, ssl
from twisted.python import log
from twisted.web import proxy, server


class IdentityProxy(proxy.ReverseProxyResource):
    """ReverseProxyResource that also tells the backend who the client is."""

    def getChild(self, path: bytes, request: server.Request) -> IdentityProxy:  # noqa: N802
        return IdentityProxy(self.host, self.port,
                             self.path + b"/" + quote(path, safe=b"").encode("utf-8"),
                             self.reactor)

    def render(self, request: server.Request) -> object:
        cert = request.channel.transport.getPeerCertificate()  # type: ignore[union-attr]
        cn = cert.get_subject().commonName if cert is not None else None
        for name in list(request.requestHeaders.getAllRawHeaders()):
            if name[0].lower().startswith(b"x-client-cert"):
                request.requestHeaders.removeHeader(name[0])
        if cn:
            request.requestHeaders.setRawHeaders(b"X-Client-Cert-CN", [cn.encode("utf-8")])
        return super().render(request)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend-port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ca", required=True)
    args = parser.parse_args()
    with open(args.cert, "rb") as c, open(args.key, "rb") as k, open(args.ca, "rb") as a:
        identity = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
        ca = ssl.Certificate.loadPEM(a.read())
    options = identity.options(ca)  # verify=True, requireCertificate=True, caCerts=[ca]
    log.startLogging(sys.stdout)
    site = server.Site(IdentityProxy("127.0.0.1", args.backend_port, b""))
    reactor.listenSSL(args.port, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
