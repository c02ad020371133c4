"""The proxy's own MySQL errors: numbers, SQLSTATEs and RDS Proxy texts."""

import pytest

from txrdsproxy.wire.mysql import errors as E
from txrdsproxy.wire.mysql.packets import ERR, parse_err


@pytest.mark.parametrize("payload,expected", [
    (E.access_denied("app"), ERR(1045, "28000",
                                 "Access denied for user 'app'@'%' (using password: YES)")),
    (E.access_denied("u", "10.0.0.1", False), ERR(
        1045, "28000", "Access denied for user 'u'@'10.0.0.1' (using password: NO)")),
    (E.too_many_connections(100), ERR(1040, "HY000",
                                      "Number simultaneous connections exceeded (100)")),
    (E.rate_limit(5), ERR(1040, "HY000", "Connections rate limit exceeded (5)")),
    (E.iam_rate_limit(), ERR(1040, "HY000", "IAM authentication rate limit exceeded")),
    (E.borrow_timeout(), ERR(9501, "HY000", "Timed-out waiting to acquire database connection")),
    (E.bad_charset_client("ucs2"), ERR(
        1231, "42000", "Variable 'character_set_client' can't be set to the value of 'ucs2'")),
    (E.requires_tls(), ERR(3159, "HY000", "This RDS Proxy requires TLS connections.")),
    (E.unknown_error(), ERR(1105, "HY000", "Unknown error")),
    (E.compression_not_supported().__class__(E.compression_not_supported()),
     ERR(1235, "42000", "This RDS Proxy doesn't yet support 'compressed protocol'")),
])
def test_error_payloads(payload, expected):
    assert parse_err(payload) == expected


def test_wire_bytes():
    assert E.unknown_error() == b"\xff\x51\x04#HY000Unknown error"
