"""The HTTP/1.1 halves of the proxy: the client-facing server, the backend pool, and the forwarding between them."""
