"""ERR payloads the proxy itself sends to MySQL clients.

Texts and numbers follow the RDS Proxy user guide ("Common Issues and
Solutions", MySQL table) wherever it documents them; docs/errors.md lists
them for users.  Each function returns an ERR *payload*; frame it with
``packets.encode_packet(payload, seq)``.

Compression: the proxy never advertises CLIENT_COMPRESS, so clients started
with ``--compress``/``-C`` (libmysql/libmariadb, Connector/J, PyMySQL) just
proceed uncompressed.  A non-conforming client that sets CLIENT_COMPRESS in
its HandshakeResponse anyway gets :func:`compression_not_supported`
(ER_NOT_SUPPORTED_YET) and is disconnected, rather than being answered in a
framing it would not understand.
"""

from txrdsproxy.wire.mysql.packets import err_packet

ER_CON_COUNT_ERROR = 1040
ER_ACCESS_DENIED_ERROR = 1045
ER_UNKNOWN_ERROR = 1105
ER_UNKNOWN_STMT_HANDLER = 1243
ER_WRONG_VALUE_FOR_VAR = 1231
ER_NOT_SUPPORTED_YET = 1235
ER_SECURE_TRANSPORT_REQUIRED = 3159
ER_PROXY_BORROW_TIMEOUT = 9501  # RDS Proxy's own number
CR_SERVER_LOST = 2013  # the number clients use for a connection lost mid-query


def access_denied(user, host="%", using_password=True):
    """1045 (28000): wrong password, unknown user or no secret for the user."""
    return err_packet(ER_ACCESS_DENIED_ERROR, "28000",
                      "Access denied for user '%s'@'%s' (using password: %s)"
                      % (user, host, "YES" if using_password else "NO"))


def iam_rate_limit():
    """1040 (HY000): more IAM authentications in progress than the proxy allows."""
    return err_packet(ER_CON_COUNT_ERROR, "HY000", "IAM authentication rate limit exceeded")


def iam_requires_tls(user, host="%"):
    """1045 (28000): an IAMAuth REQUIRED user logging in without TLS."""
    return err_packet(ER_ACCESS_DENIED_ERROR, "28000",
                      "Access denied for user '%s'@'%s': IAM authentication is allowed only "
                      "with SSL connections." % (user, host))


def too_many_connections(limit):
    """1040 (HY000): simultaneous client connections exceeded the limit."""
    return err_packet(ER_CON_COUNT_ERROR, "HY000",
                      "Number simultaneous connections exceeded (%s)" % limit)


def rate_limit(limit):
    """1040 (HY000): the rate of new client connections exceeded the limit."""
    return err_packet(ER_CON_COUNT_ERROR, "HY000",
                      "Connections rate limit exceeded (%s)" % limit)


def iam_rate_limit():
    """1040 (HY000): too many simultaneous IAM authentications."""
    return err_packet(ER_CON_COUNT_ERROR, "HY000", "IAM authentication rate limit exceeded")


def borrow_timeout():
    """9501 (HY000): no database connection within ConnectionBorrowTimeout."""
    return err_packet(ER_PROXY_BORROW_TIMEOUT, "HY000",
                      "Timed-out waiting to acquire database connection")


def bad_charset_client(value):
    """1231 (42000): ``SET character_set_client``/NAMES to ucs2, utf16, utf32..."""
    return err_packet(ER_WRONG_VALUE_FOR_VAR, "42000",
                      "Variable 'character_set_client' can't be set to the value of '%s'"
                      % value)


_STMT_COMMAND_NAMES = {0x17: "mysqld_stmt_execute", 0x1A: "mysqld_stmt_reset",
                       0x1C: "mysqld_stmt_fetch", 0xFA: "mysqld_stmt_bulk_execute"}


def unknown_statement(stmt_id, command):
    """1243 (HY000): COM_STMT_* naming a statement id this session did not prepare.  Same number,
    state and text as the server's own, so that drivers react the same way."""
    return err_packet(ER_UNKNOWN_STMT_HANDLER, "HY000",
                      "Unknown prepared statement handler (%d) given to %s"
                      % (stmt_id, _STMT_COMMAND_NAMES.get(command, "mysqld_stmt_execute")))


ER_NEED_REPREPARE = 1615
ER_MAX_PREPARED_STMT_COUNT_REACHED = 1461


def too_many_statements(limit):
    """1461 (42000), the server's own text: a multiplexed session holds *limit* prepared
    statements (the server's default max_prepared_stmt_count) and prepares one more."""
    return err_packet(ER_MAX_PREPARED_STMT_COUNT_REACHED, "42000",
                      "Can't create more than max_prepared_stmt_count statements (current value: %d)"
                      % limit)


def statement_context_changed():
    """1615 (HY000), the server's own error for a statement it cannot run as prepared: a
    multiplexed session's statement must be prepared again on another database connection, but
    the session changed its database, sql_mode or character set since it prepared it."""
    return err_packet(ER_NEED_REPREPARE, "HY000", "Prepared statement needs to be re-prepared")


def statement_types_unknown():
    """1615 (HY000): a multiplexed session's COM_STMT_EXECUTE relies on parameter types the
    proxy could not carry to the database connection serving it (bound by an execute too large
    to read whole, or by a COM_STMT_BULK_EXECUTE, on another connection)."""
    return err_packet(ER_NEED_REPREPARE, "HY000", "Prepared statement needs to be re-prepared")


def requires_tls():
    """3159 (HY000): RequireTLS is on and the client did not start TLS."""
    return err_packet(ER_SECURE_TRANSPORT_REQUIRED, "HY000",
                      "This RDS Proxy requires TLS connections.")


def unknown_error():
    """1105 (HY000): anything unexpected inside the proxy."""
    return err_packet(ER_UNKNOWN_ERROR, "HY000", "Unknown error")


def compression_not_supported():
    """1235 (42000): the client insisted on CLIENT_COMPRESS (see module doc)."""
    return err_packet(ER_NOT_SUPPORTED_YET, "42000",
                      "This RDS Proxy doesn't yet support 'compressed protocol'")


ER_SERVER_SHUTDOWN = 1053


def replay_failed(why):
    """1053 (08S01): a pinned session moved off a former writer, and setting its variables again
    on the new writer failed (proxy/pin_move.py): the session ends."""
    return err_packet(ER_SERVER_SHUTDOWN, "08S01",
                      "The proxy ended this session: it was pinned to a database connection on the "
                      f"former writer, and replaying its session state on the new writer failed ({why})."
                      " Reconnect to continue on the new writer.")


def writer_changed():
    """1053 (08S01): a pinned session whose database connection is on a former writer is ended
    (failover or switchover); 08S01 makes drivers treat it as a lost connection and reconnect."""
    return err_packet(ER_SERVER_SHUTDOWN, "08S01",
                      "The proxy ended this session: it was pinned to a database connection on the "
                      "former writer, and the writer changed (failover or switchover). Reconnect to "
                      "continue on the new writer.")


ER_NO_SUCH_THREAD = 1094


def unknown_thread(thread_id):
    """1094 (HY000), the server's own text: `KILL <id>` naming a session of another worker
    process (`Workers: N`) that this worker could not find there (ended, or the worker is
    restarting)."""
    return err_packet(ER_NO_SUCH_THREAD, "HY000", f"Unknown thread id: {thread_id}")


def lost_during_command():
    """2013 (HY000): the database connection broke while the command waited for its answer
    (the session goes on; whether the command took effect is unknown)."""
    return err_packet(CR_SERVER_LOST, "HY000", "Lost connection to the database during the command")
