"""Property test of the MySQL pin move's capture and replay (wire/mysql/replay.py) against the
real MariaDB: an "old" session sets hostile user variables (names with backticks, quotes,
backslashes; binary values with NUL, 0x5C and 0x27 bytes; strings in several character sets and
collations; integers at the edges; decimals; NULL) and session variables, under a random
sql_mode (ANSI_QUOTES, NO_BACKSLASH_ESCAPES change quoting); the proxy's capture reads it there,
its replay SET runs on a fresh connection (whose sql_mode is already the session's: the harder
case for quoting), the proxy's check must pass, and what each side holds, read back without the
proxy's code, must be equal.""" 

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer

try:
    from mysql_raw import RawMySQL
except ImportError:
    from tests.integration.mysql_raw import RawMySQL

from txrdsproxy.proxy.mysql_backend import DatabaseError
from txrdsproxy.wire.mysql.replay import ReplayLog, USER_QUERY, value_query

USER = "app_native"
NAMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)
STRINGS = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
TEXT_COLLATIONS = [("utf8mb4", "utf8mb4_bin"), ("utf8mb4", "utf8mb4_general_ci"), ("gbk", "gbk_chinese_ci"),
                   ("latin1", "latin1_swedish_ci")]


def _encodable(pair):
    (charset, _), text = pair
    try:
        text.encode({"utf8mb4": "utf-8"}.get(charset, charset))
    except UnicodeEncodeError:
        return False
    return True


VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-10**12, max_value=10**12),
    st.binary(max_size=16),  # NUL, 0x5C, 0x27, 0x60, invalid UTF-8
    st.tuples(st.sampled_from(TEXT_COLLATIONS), STRINGS).filter(_encodable),
)
SQL_MODES = st.sampled_from(["", "ANSI_QUOTES", "NO_BACKSLASH_ESCAPES", "ANSI_QUOTES,NO_BACKSLASH_ESCAPES"])
SYSTEM = st.dictionaries(st.sampled_from(["div_precision_increment", "sql_select_limit", "max_join_size",
                                          "group_concat_max_len", "optimizer_search_depth"]),
                         st.integers(min_value=4, max_value=60), max_size=3)


def _literal(value):
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return f"X'{value.hex()}'"
    if not isinstance(value, tuple):
        return format(value, "f")  # a DECIMAL literal (never an exponent: that is a DOUBLE)
    (charset, collation), text = value
    data = text.encode({"utf8mb4": "utf-8"}.get(charset, charset))
    return f"_{charset} X'{data.hex()}' COLLATE {collation}"


class Conn:
    """The backend's `query` over a RawMySQL (same row decoding: the proxy's own reader)."""

    def __init__(self, raw):
        self.raw = raw

    def query(self, sql):
        return defer.succeed(self.raw.query(sql))


def _result(d):
    out = []
    d.addBoth(out.append)
    value = out[0]
    if hasattr(value, "raiseException"):
        value.raiseException()
    return value


def _held(raw, names):
    """What a session holds, read without the proxy's code: each user variable's hex, collation,
    type; the session values of *names*."""
    rows = raw.query("SELECT HEX(VARIABLE_NAME), VARIABLE_TYPE, CHARACTER_SET_NAME FROM"
                     " information_schema.USER_VARIABLES ORDER BY VARIABLE_NAME LIMIT 1000")
    out = {}
    for hexed, vtype, charset in rows:
        quoted = "@`" + bytes.fromhex(hexed).decode().replace("`", "``") + "`"
        out[hexed] = (vtype, charset, raw.query(f"SELECT HEX({quoted}), COLLATION({quoted})")[0])
    for name in sorted(names):
        out[name] = raw.query(f"SELECT HEX(@@session.{name})")[0]
    return out


@pytest.fixture(scope="module")
def connect(mariadb_server):
    password = mariadb_server.users[USER]
    return lambda: RawMySQL(mariadb_server.host, mariadb_server.port, USER, password, database="appdb")


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(users=st.dictionaries(NAMES, VALUES, min_size=1, max_size=5), system=SYSTEM, sql_mode=SQL_MODES)
@example(users={c: 1 for c in "abcdef"}, system={"sql_select_limit": 4, "div_precision_increment": 7,
                                                 "group_concat_max_len": 9, "optimizer_search_depth": 5},
         sql_mode="")  # more variables than the session's sql_select_limit lets a SELECT return
@example(users={c: 1 for c in "abcdef"}, system={"sql_select_limit": 4}, sql_mode="")
def test_what_the_replay_sets_is_what_the_old_session_held(connect, users, system, sql_mode):
    old, new = connect(), connect()
    try:
        sets = [f"@`{n.replace('`', '``')}` = {_literal(v)}" for n, v in users.items()]
        sets += [f"SESSION {n} = {v}" for n, v in system.items()]
        old.query("SET " + ", ".join(sets))
        old.query(f"SET SESSION sql_mode = '{sql_mode}'")
        log = ReplayLog(65536)
        log.names.update(system)
        try:
            system_rows = old.query(log.system_query())
        except DatabaseError as e:  # a small max_join_size refuses the capture: not moved (fail closed)
            assert e.err.code == 1104 and "max_join_size" in system, e
            return
        user_rows = old.query(USER_QUERY)
        query = value_query(user_rows)
        plan = log.plan(system_rows, user_rows, old.query(query) if query else [])  # ASCII names: moves
        names = set(system) | {"sql_mode"}
        new.query(f"SET SESSION sql_mode = '{sql_mode}'")  # the proxy's sync (tracked), before: harder
        if plan.replay_sql is not None:
            new.query(plan.replay_sql)
        plan.check(new.query(log.system_query()), *_rows(new))  # (NotMovable: the move would fail)
        assert _held(new, names) == _held(old, names)
    finally:
        old.close()
        new.close()


def _rows(raw):
    user_rows = raw.query(USER_QUERY)
    query = value_query(user_rows)
    return user_rows, (raw.query(query) if query else [])
