"""Sans-I/O MySQL/MariaDB wire layer (no Twisted, no sockets).

packets    framing (3-byte length, seq id, 16 MiB continuation), lenenc, OK/ERR/EOF
handshake  HandshakeV10, HandshakeResponse41, SSLRequest, auth switch / more data
auth       mysql_native_password, caching_sha2_password (+ exchanges), clear password
commands   ResponseTracker: where each server response ends, and the server status
pinning    classify_query(): PinReason | TrackedSet | None
errors     the proxy's own ERR payloads (RDS Proxy texts)
"""
