"""The HTTP/1.1 halves of the proxy: the client-facing server and the backend pool."""
