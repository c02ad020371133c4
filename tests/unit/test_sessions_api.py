"""DescribeDBProxySessions: the model extension, the session shape, and literal masking."""

import botocore.parsers
import pytest

from tests.unit import test_pg_frontend as pg
from txrdsproxy.admin.querycodec import decode_params, encode_response, operation
from txrdsproxy.admin.sessions import describe_sessions
from txrdsproxy.sqlmask import MYSQL, POSTGRESQL, mask_literals


@pytest.mark.parametrize("sql, masked", [
    ("SET app.token = 's3cr''et'", "SET app.token = ?"),
    ("select $$secret$$, $t$secret$t$, E'a\\'secret', x1 from t2 where id = $1",
     "select ?, ?, ?, x1 from t2 where id = $1"),
    # A backslash in a standard string ends differently with standard_conforming_strings off:
    # everything from there on is masked.
    ("select 'a\\' , 'secret' from t", "select ?"),
    ("select 42, 3.5e2, .5, 0x1F -- secret\n", "select ?, ?, ?, ?"),
    ("select /* secret */ 1", "select ?"),
    ("select 'never closed secret", "select ?"),  # fails closed
    ('select "Secret Column" from t', 'select "Secret Column" from t'),
])
def test_postgresql_literals_are_masked(sql, masked):
    assert mask_literals(sql, POSTGRESQL) == masked


@pytest.mark.parametrize("sql, masked", [
    ("SET @x = \"secret\", @y = 'it''s secret'", "SET @x = ?, @y = ?"),
    ("SET @y = 'it\\'s', @z = 'secret'", "SET @y = ?"),  # NO_BACKSLASH_ESCAPES would differ
    ("SET @k = _utf8mb4'secret' # secret", "SET @k = ?"),
    ("SELECT `secret col` FROM t", "SELECT `secret col` FROM t"),
])
def test_mysql_literals_are_masked(sql, masked):
    assert mask_literals(sql, MYSQL) == masked


def test_masked_text_is_cut_to_the_limit():
    assert len(mask_literals("select " + "a, " * 500 + "1", limit=200)) == 200


def test_the_operation_is_in_the_model_botocore_loads():
    op = operation("DescribeDBProxySessions")
    assert op.input_shape.required_members == ["DBProxyName"]
    assert decode_params(op, {"DBProxyName": "p", "Pinned": "true"}) == {"DBProxyName": "p", "Pinned": True}


def _roundtrip(items):
    """Encode as the server does and parse as a botocore client does."""
    op = operation("DescribeDBProxySessions")
    xml = encode_response(op, {"DBProxySessions": items}, "req-1")
    parsed = botocore.parsers.QueryParser().parse(
        {"body": xml, "headers": {}, "status_code": 200}, op.output_shape)
    return parsed["DBProxySessions"]


def test_pinned_postgresql_session_with_reason_and_masked_statement():
    s = pg.Harness()
    s.login()
    s.send(pg.msg.query("SET work_mem = '64MB'; SELECT 'secret-literal'"))
    lease = s.pool.give()
    lease.conn.backend_id = 777
    s.frontend.ready_for_query(b"I")
    [pinned] = describe_sessions(s.ctx, pinned=True)
    assert pinned["PinReason"] == "set_variable"
    assert pinned["PinStatement"] == "SET work_mem = ?; SELECT ?"
    assert "secret" not in repr(pinned)
    assert pinned["State"] == "pinned" and pinned["UserName"] == pg.USER and pinned["DatabaseName"] == "app"
    assert pinned["DatabaseConnection"]["BackendId"] == 777
    assert pinned["DatabaseConnection"]["RdsResourceId"] == "db-1"
    assert describe_sessions(s.ctx, pinned=False) == []
    [parsed] = _roundtrip([pinned])
    assert parsed["PinStatement"] == pinned["PinStatement"]
    assert parsed["DatabaseConnection"]["InTransaction"] is False
    assert parsed["CreatedDate"].year >= 1970
