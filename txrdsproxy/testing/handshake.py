"""A TLS handshake between two pyOpenSSL contexts in memory (no sockets): what the TLS tests
need to find out whether a client and a server context agree, and on what."""

from OpenSSL import SSL

__all__ = ["memory_handshake"]


def memory_handshake(server_ctx, client_ctx, rounds=20):
    """Run the handshake, moving bytes between the two memory BIOs, -> the cipher's name.
    Raises SSL.Error when OpenSSL refuses it (as a real peer would see), AssertionError when it
    has not finished after *rounds* exchanges."""
    server, client = SSL.Connection(server_ctx, None), SSL.Connection(client_ctx, None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(rounds):
        for a, b in ((client, server), (server, client)):
            try:
                a.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        try:
            client.do_handshake()
            server.do_handshake()
            return client.get_cipher_name()
        except SSL.WantReadError:
            continue
    raise AssertionError("no handshake")
