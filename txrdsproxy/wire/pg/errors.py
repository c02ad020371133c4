"""Every error a PostgreSQL client can get from the proxy itself (see docs/errors.md).

Texts follow the RDS Proxy user guide where it documents one.  Each constant or function returns
an encoded ErrorResponse with severity FATAL (the connection ends); `as_error` re-encodes one as
a plain ERROR for errors the session survives (a borrow timeout).
"""

from txrdsproxy.wire.pg.messages import error_response, parse_error_fields

PROTOCOL_VERSION = error_response(
    "0A000", "Feature not supported: RDS Proxy supports only version 3.0 of the PostgreSQL messaging protocol.")
REPLICATION = error_response(
    "0A000", "Feature not supported: RDS Proxy currently doesn't support streaming replication mode.")
MISSING_USER = error_response(
    "28000", "A user name is missing from the connection startup packet. Provide a user name for this connection.")
BORROW_TIMEOUT = error_response("53300", "Timed-out waiting to acquire database connection.")
AUTH_TIMEOUT = error_response("08006", "Authentication timed out.")
# RequireTLS and a StartupMessage in plaintext (PostgreSQL uses 28000 for a pg_hba "no encryption"
# refusal, which is the same situation).
REQUIRES_TLS = error_response("28000", "This RDS Proxy requires TLS connections.")
# IAMAuth REQUIRED (auth/iam.py).
IAM_REQUIRES_TLS = error_response("28000", "IAM authentication is allowed only with SSL connections.")
IAM_TOO_MANY = error_response("53300", "The IAM authentication failed because of too many competing requests.")


def iam_failed_user(user):
    """The token is malformed, wrongly signed, expired or names another user, host or port."""
    return error_response(
        "28P01", f"IAM authentication failed for user {user}. Check the IAM token for this user and try again.")


def iam_failed_role(role):
    """The token is valid but its principal's policies do not allow rds-db:connect as *role*."""
    return error_response(
        "28000",
        f"The IAM authentication failed for the role {role}. Check the IAM token for this role and try again.")


SHUTTING_DOWN = error_response("57P01", "The proxy is shutting down.")
# Draining (SIGTERM, DeleteDBProxy): what the server itself says when it is shut down.
ADMIN_SHUTDOWN = error_response("57P01", "terminating connection due to administrator command")
UNKNOWN = error_response("XX000", "Unknown error.")
# A pinned session whose database connection is on a target that is no longer the writer.
WRITER_CHANGED = error_response(
    "08006", "The proxy ended this session: it was pinned to a database connection on the former "
    "writer, and the writer changed (failover or switchover). Reconnect to continue on the new writer.")



def replay_failed(why):
    """A pinned session moved off a former writer, and making its state again on the new
    writer failed (proxy/pin_move.py): the session ends."""
    return error_response(
        "08006", "The proxy ended this session: it was pinned to a database connection on the former "
        f"writer, and replaying its session state on the new writer failed ({why}). Reconnect to "
        "continue on the new writer.")


def lost_during_request(why):
    """The database connection broke while a request waited for its answer (the session goes
    on; whether the request took effect is unknown)."""
    return error_response("08006", f"The database connection was lost during the request ({why});"
                                   " its outcome is unknown.")


def unsupported_option(name):
    return error_response("0A000", f"Feature not supported: RDS Proxy currently doesn't support the option {name}.")


def no_credentials(role):
    return error_response(
        "28000",
        f"This RDS proxy has no credentials for the role {role}. Check the credentials for this role and try again.")


def wrong_password(role):
    return error_response("28P01", f"The password that was provided for the role {role} is wrong.")


def too_many_clients(limit):
    return error_response("53300", f"The maximum number of client connections to the proxy exceeded {limit}.")


def connection_rate(limit):
    limit = int(limit) if float(limit).is_integer() else limit
    return error_response("53300", f"Rate of connection to proxy exceeded {limit}.")


def protocol_violation(detail):
    return error_response("08P01", "Invalid message from the client: protocol violation.", detail=detail)


def request_error(fields):
    """A database's error at connection time, wrapped as RDS Proxy does."""
    text = fields.get("M", "unknown error").rstrip(".")
    return error_response(fields.get("C", "XX000"), f"Request returned an error: {text}.")


def as_error(encoded):
    """The same error with severity ERROR, for a session that continues."""
    fields = parse_error_fields(encoded[5:])
    return error_response(fields.get("C", "XX000"), fields.get("M", ""), severity="ERROR")
