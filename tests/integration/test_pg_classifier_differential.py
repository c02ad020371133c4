"""Differential test of the PostgreSQL pinning classifier against a real PostgreSQL 15.

Hypothesis generates SQL texts: statements that change session state (SET, set_config,
UPDATE pg_settings, temp tables, PREPARE, advisory locks, LISTEN, WITH HOLD cursors, sequence
functions, DO, CALL, SET ROLE, EXPLAIN ANALYZE ...) and harmless ones, in random lexical
disguises (keyword case, comments ended by \\n or \\r, nested comments, quoted, U& and
schema-qualified names, statements hidden in strings, comments and dollar quotes, strings
ending in a backslash, several statements in one Query).  Each text runs as one simple Query on
a real connection; the session's state is fingerprinted before and after.  Whenever the state
changed, the classifier must have pinned: a harmless text may pin (that costs only
multiplexing), a state change that does not pin is a leak to the next session on the pool.

The CI run is quick and repeatable (derandomized, bounded examples).  ``make fuzz`` sets
TXRDSPROXY_FUZZ_EXAMPLES and runs it with random seeds and many more examples.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psycopg  # test extras: a missing driver must fail, not skip

from txrdsproxy.wire.pg import pinning

FUZZ_EXAMPLES = int(os.environ.get("TXRDSPROXY_FUZZ_EXAMPLES", "2000")) if os.environ.get("TXRDSPROXY_FUZZ") else 0
EXAMPLES = FUZZ_EXAMPLES or 120
SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=not FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

SETUP = """
CREATE SEQUENCE IF NOT EXISTS fz_seq;
CREATE TABLE IF NOT EXISTS fz_t (id int, v text);
CREATE SCHEMA IF NOT EXISTS fz_a;
CREATE OR REPLACE FUNCTION fz_seqstate() RETURNS text LANGUAGE plpgsql AS $f$
DECLARE c text; l text;
BEGIN
  BEGIN c := pg_catalog.currval('public.fz_seq')::text; EXCEPTION WHEN others THEN c := '-'; END;
  BEGIN l := pg_catalog.lastval()::text; EXCEPTION WHEN others THEN l := '-'; END;
  RETURN c || '/' || l;
END $f$;
CREATE OR REPLACE PROCEDURE fz_proc() LANGUAGE plpgsql AS $p$
BEGIN PERFORM pg_catalog.set_config('work_mem', '11MB', false); END $p$;
"""

# Everything a session can leave behind that the next borrower of the connection could see.
FINGERPRINT = """
SELECT
 (SELECT pg_catalog.array_agg(name || '=' || setting ORDER BY name)
    FROM pg_catalog.pg_settings WHERE source = 'session'),
 pg_catalog.current_setting('role'), current_user, session_user,
 (SELECT pg_catalog.array_agg(relname::text ORDER BY relname)
    FROM pg_catalog.pg_class WHERE relnamespace = pg_catalog.pg_my_temp_schema()),
 (SELECT pg_catalog.array_agg(proname::text ORDER BY proname)
    FROM pg_catalog.pg_proc WHERE pronamespace = pg_catalog.pg_my_temp_schema()),
 (SELECT pg_catalog.array_agg(name ORDER BY name) FROM pg_catalog.pg_prepared_statements),
 (SELECT pg_catalog.array_agg(name ORDER BY name) FROM pg_catalog.pg_cursors),
 (SELECT pg_catalog.array_agg(objid::text || mode ORDER BY objid, mode)
    FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()),
 (SELECT pg_catalog.array_agg(c ORDER BY c) FROM pg_catalog.pg_listening_channels() c),
 public.fz_seqstate()
"""

# -- lexical disguises ---------------------------------------------------------------------
# Strategies are built once here; the draw helpers below only draw from them (building
# strategies inside a draw costs more than running the example against the server).

SEPARATORS = [b" ", b"\n", b"\r", b"\t", b"\r\n", b"\x0c", b"  ", b"/* c */", b" /* a /* b */ c */ ",
              b" -- c\n", b" -- c\r", b"--\r", b"/**/"]
SEP = st.sampled_from(SEPARATORS)
OPT_SEP = st.sampled_from([b""] + SEPARATORS)
CASE = st.sampled_from([
    bytes.lower, bytes.upper, bytes.capitalize,
    lambda w: bytes(c - 32 if i % 2 and 97 <= c <= 122 else c for i, c in enumerate(w)),
])
SPELLING = st.sampled_from(["plain", "quoted", "unicode", "unicode+", "uescape"])
BOOL = st.booleans()
N = st.integers(1, 3)


def kw(draw, word):
    """``word`` (lower-case ASCII) in some letter case."""
    return draw(CASE)(word)


def ident(draw, name):
    """An identifier spelled any way PostgreSQL reads as ``name``: case, quotes, U&, UESCAPE."""
    how = draw(SPELLING)
    if how == "plain":
        return kw(draw, name)
    if how == "quoted":
        return b'"' + name + b'"'
    if how == "uescape":
        body = b"".join(b"!%04x" % c if c in b"aeost_" else bytes([c]) for c in name)
        return b'U&"' + body + b'"' + draw(SEP) + kw(draw, b"uescape") + draw(SEP) + b"'!'"
    fmt = b"\\+%06x" if how == "unicode+" else b"\\%04x"
    body = b"".join(fmt % c if c in b"aeost_" else bytes([c]) for c in name)
    return kw(draw, b"u") + b'&"' + body + b'"'


def func(draw, name):
    """A function name, maybe qualified by pg_catalog, with separators around the dot."""
    spelled = ident(draw, name)
    if draw(BOOL):
        return ident(draw, b"pg_catalog") + draw(OPT_SEP) + b"." + draw(OPT_SEP) + spelled
    return spelled


def words(draw, *parts):
    """Join parts with random separators: str parts are keywords (random case), bytes as is."""
    out = [kw(draw, p.encode()) if isinstance(p, str) else p for p in parts]
    return b"".join(x + draw(SEP) for x in out[:-1]) + out[-1]


def call(draw, name, args):
    return words(draw, "select", func(draw, name)) + draw(OPT_SEP) + b"(" + args + b")"


# -- statements that change session state ----------------------------------------------------

SETTING = st.sampled_from([(b"work_mem", b"'5MB'"), (b"search_path", b"fz_a"),
                           (b"search_path", b"fz_a, public"), (b"application_name", b"'fz'"),
                           (b"standard_conforming_strings", b"off"),
                           (b"statement_timeout", b"7000")])
IS_LOCAL = st.sampled_from([b"false", b"'off'", b"'f'", b"0::bool", b"true"])
TEMP_FORM = st.integers(0, 9)
ADVISORY = st.sampled_from([b"pg_advisory_lock", b"pg_try_advisory_lock",
                            b"pg_advisory_lock_shared", b"pg_try_advisory_lock_shared"])
MISC = st.integers(0, 10)
KIND = st.integers(0, 4)


def set_stmt(draw):
    name, value = draw(SETTING)
    head = ["set", "session"] if draw(BOOL) else ["set"]
    return words(draw, *head, ident(draw, name), draw(st.sampled_from(["=", "to"])), value)


def set_config_stmt(draw):
    name, value = draw(SETTING)
    value = value if value.startswith(b"'") else b"'" + value + b"'"
    return call(draw, b"set_config", b"'%s', %s, %s" % (name, value, draw(IS_LOCAL)))


def pg_settings_update(draw):
    target = ident(draw, b"pg_settings")
    if draw(BOOL):
        target = ident(draw, b"pg_catalog") + b"." + target
    return words(draw, "update", target, "set", "setting", "=", b"'6MB'", "where", "name", "=",
                 b"'work_mem'")


def temp_stmt(draw):
    t = b"fz_tmp%d" % draw(N)
    schema = ident(draw, b"pg_temp")
    return [
        lambda: words(draw, "create", "temp", "table", t, b"(i int)"),
        lambda: words(draw, "create", "temporary", "table", t, "as", "select", b"1", "as", "i"),
        lambda: words(draw, "create", "local", "temp", "view", t, "as", "select", b"1"),
        lambda: words(draw, "create", "temp", "sequence", t),
        lambda: words(draw, "create", "table", schema + b"." + t, b"(i int)"),
        lambda: words(draw, "create", "function", schema + b"." + t + b"()", "returns", "int",
                      "language", "sql", "as", b"'select 1'"),
        lambda: words(draw, "select", b"1", "as", "i", "into", "temp", t),
        lambda: words(draw, "select", b"1", "as", "i", "into", "local", "temporary", "table", t),
        lambda: words(draw, "explain", "analyze", "create", "temp", "table", t, "as", "select",
                      b"1"),
        lambda: words(draw, "explain", b"(analyze, costs off)", "create", "temp", "table", t,
                      "as", "select", b"1"),
    ][draw(TEMP_FORM)]()


def misc_state(draw):
    n = b"%d" % draw(N)
    return [
        lambda: words(draw, "prepare", b"fz_p" + n, "as", "select", n),
        lambda: words(draw, "listen", b"fz_chan" + n),
        lambda: words(draw, "declare", b"fz_cur" + n, "cursor", "with", "hold", "for", "select",
                      n),
        lambda: call(draw, draw(ADVISORY), n),
        lambda: call(draw, b"nextval", b"'fz_seq'"),
        lambda: call(draw, b"setval", b"'fz_seq', 5"),
        lambda: words(draw, "explain", "analyze", "select", func(draw, b"pg_advisory_lock"))
        + b"(" + n + b")",
        lambda: words(draw, "do", b"$fz$ BEGIN PERFORM set_config('work_mem', '8MB', false); "
                      b"END $fz$"),
        lambda: words(draw, "do", "language", "plpgsql",
                      b"'begin perform pg_advisory_lock(9); end'"),
        lambda: words(draw, "call", ident(draw, b"fz_proc") + b"()"),
        lambda: words(draw, "set", "role", "appdb_owner"),
    ][draw(MISC)]()


def state_change(draw):
    return [set_stmt, set_config_stmt, pg_settings_update, temp_stmt, misc_state][draw(KIND)](draw)


# -- harmless statements, and state changes hidden (or not quite hidden) ---------------------

HARMLESS = st.sampled_from([
    b"SELECT 1",
    b"select set_config('work_mem', '9MB', true)",
    b"SELECT pg_advisory_xact_lock(4)",
    b"NOTIFY fz_chan1, 'x'",
    b"SELECT setting FROM pg_settings WHERE name = 'work_mem'",
    b"BEGIN; SET LOCAL work_mem = '3MB'; COMMIT",
    b"BEGIN; DECLARE fz_c CURSOR FOR SELECT 1; COMMIT",
    b"EXPLAIN SELECT 1",
    b"UPDATE fz_t SET v = 'x' WHERE false",
    b"SELECT \"set\" FROM (SELECT 1 AS \"set\") s",
    b"SELECT temp FROM (SELECT 1 AS temp) s",
    b"SELECT pg_advisory_unlock_all()",
])
WRAP = st.sampled_from(["string", "estring", "dollar", "block", "line", "ident", "backslash",
                        "ebackslash", "continued"])


def hidden(draw):
    """A state change placed where it might or might not be code, depending on the lexer."""
    text = state_change(draw)
    wrap = draw(WRAP)
    if wrap == "string":
        return b"SELECT '" + text.replace(b"'", b"''") + b"'"
    if wrap == "estring":
        return b"SELECT E'" + text.replace(b"\\", b"\\\\").replace(b"'", b"\\'") + b"'"
    if wrap == "dollar":
        return b"SELECT $zz$" + text + b"$zz$"
    if wrap == "block":
        return b"SELECT 1 /* " + text.replace(b"*/", b"* /") + b" */"
    if wrap == "line":  # a \r or \n inside ``text`` ends the comment early
        return b"SELECT 1 -- " + text
    if wrap == "ident":
        return b'SELECT 1 AS "' + text.replace(b'"', b'""') + b'"'
    if wrap == "backslash":  # runs if strings are standard-conforming
        return b"SELECT 'a\\'; " + text + b"; SELECT '\\'"
    if wrap == "ebackslash":  # hidden unless standard_conforming_strings is off
        return b"SELECT 'x\\''; " + text + b"; --'"
    return b"SELECT E'a'\n'\\'; " + text + b"; --'"  # continued E'' string hides it


PART = st.integers(0, 5)
LEAD = st.sampled_from([b"", b"-- x\r", b"/* x */", b"\n"])
TAIL = st.sampled_from([b"", b";", b"; ", b";\r--"])
GLUE = st.sampled_from([b";", b"; ", b";\r", b" ;\n"])


@st.composite
def query_text(draw):
    parts = []
    for _ in range(draw(N)):
        which = draw(PART)
        parts.append(state_change(draw) if which < 3 else draw(HARMLESS) if which == 3
                     else hidden(draw))
    return draw(LEAD) + draw(GLUE).join(parts) + draw(TAIL)


# -- the test --------------------------------------------------------------------------------

class Session:
    """One real connection whose state is fingerprinted around each text."""

    def __init__(self, server, scs):
        self.server, self.scs = server, scs
        self.conn = None
        self.reconnect()
        self.baseline = self.fingerprint()

    def reset(self):
        """Back to the baseline state: DISCARD ALL (what the proxy runs), else a new connection."""
        self.fingerprint()  # ends an open transaction
        try:
            self.conn.execute("DISCARD ALL")
        except psycopg.Error:
            pass
        state = self.fingerprint()
        if state != self.baseline:
            self.reconnect()
            state = self.fingerprint()
        return state

    def reconnect(self):
        if self.conn is not None:
            self.conn.close()
        options = "-c statement_timeout=10000"
        if not self.scs:
            options += " -c standard_conforming_strings=off"
        self.conn = psycopg.connect(host=self.server.host, port=self.server.port,
                                    user="app_scram", password=self.server.users["app_scram"],
                                    dbname=self.server.app_db, autocommit=True,
                                    prepare_threshold=None, options=options)

    def fingerprint(self):
        if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self.conn.execute("ROLLBACK")
        return self.conn.execute(FINGERPRINT).fetchone()

    def run(self, sql):
        try:
            self.conn.execute(sql)
        except psycopg.Error:
            pass  # errors are fine: what counts is what the session was left with


@pytest.fixture(scope="module")
def prepared_db(pg_server):
    with psycopg.connect(host=pg_server.host, port=pg_server.port, user="app_scram",
                         password=pg_server.users["app_scram"], dbname=pg_server.app_db,
                         autocommit=True) as conn:
        conn.execute(SETUP)
    return pg_server


@pytest.mark.parametrize("scs", [True, False], ids=["scs_on", "scs_off"])
def test_every_state_change_pins(prepared_db, scs):
    session = Session(prepared_db, scs)
    seen = {"changed": 0, "unchanged": 0, "pinned_unchanged": 0}
    leaks = []

    state = {"now": session.fingerprint()}

    @SETTINGS
    @given(query_text())
    def check(sql):
        before = state["now"]
        session.run(sql)
        after = state["now"] = session.fingerprint()
        exact = pinning.classify_query(sql, standard_conforming_strings=scs)
        unknown = pinning.classify_query(sql)
        if after != before:
            seen["changed"] += 1
            state["now"] = session.reset()
            if exact is None or unknown is None:
                leaks.append((sql, before, after))
            assert exact is not None, "state changed without a pin: %r" % (sql,)
            assert unknown is not None, "state changed without a pin (scs unknown): %r" % (sql,)
        else:
            seen["unchanged"] += 1
            seen["pinned_unchanged"] += exact is not None

    try:
        check()
    finally:
        session.conn.close()
    assert not leaks
    # The generator must exercise both sides, or the property says nothing.
    assert seen["changed"] >= EXAMPLES // 5, seen
    assert seen["unchanged"] >= EXAMPLES // 10, seen


@pytest.mark.parametrize("sql", [
    b"-- comment\rSET search_path = fz_a",
    b"SELECT U&\"\\0073et_config\"('search_path', 'fz_a', false)",
    b"UPDATE pg_settings SET setting = 'fz_a' WHERE name = 'search_path'",
    b"EXPLAIN ANALYZE CREATE TEMP TABLE fz_leak AS SELECT 1",
    b"DO $$ BEGIN PERFORM set_config('search_path', 'fz_a', false); END $$",
])
def test_the_known_leaks_change_state_and_pin(prepared_db, sql):
    """The five leaks of issue 6: each really changes the session, and each now pins."""
    session = Session(prepared_db, True)
    try:
        before = session.fingerprint()
        session.conn.execute(sql)
        assert session.fingerprint() != before
    finally:
        session.conn.close()
    assert pinning.classify_query(sql, standard_conforming_strings=True) is not None
    assert pinning.classify_query(sql) is not None


def test_large_object_function_oids(prepared_db):
    """FunctionCall messages pass unpinned only for these OIDs: they must be the lo_* functions."""
    with psycopg.connect(host=prepared_db.host, port=prepared_db.port, user="app_scram",
                         password=prepared_db.users["app_scram"], dbname=prepared_db.app_db,
                         autocommit=True) as conn:
        rows = conn.execute("SELECT oid::int, proname::text FROM pg_proc WHERE oid = ANY(%s)",
                            [sorted(pinning.LARGE_OBJECT_FUNCTION_OIDS)]).fetchall()
    names = {oid: name for oid, name in rows}
    assert set(names) == set(pinning.LARGE_OBJECT_FUNCTION_OIDS)
    assert all(name.startswith("lo") for name in names.values()), names


KNOWN_LEAKS = [
    b"-- comment\rSET search_path = fz_a",
    b"SELECT U&\"\\0073et_config\"('search_path', 'fz_a', false)",
    b"UPDATE pg_settings SET setting = 'fz_a' WHERE name = 'search_path'",
    b"EXPLAIN ANALYZE CREATE TEMP TABLE fz_leak AS SELECT 1",
    b"DO $$ BEGIN PERFORM set_config('search_path', 'fz_a', false); END $$",
]


def test_known_leaks_stay_in_their_session_through_the_proxy(prepared_db, pg_proxy_factory):
    """End to end, one pooled connection: each leak pins its session, the connection is reset
    when that session ends, and the next session finds it as it was."""
    proxy = pg_proxy_factory(prepared_db, MaxConnectionsPercent=1, MaxIdleConnectionsPercent=1)

    def connect():
        return psycopg.connect(proxy.dsn(prepared_db), autocommit=True, prepare_threshold=None)

    with connect() as observer:
        baseline = observer.execute(FINGERPRINT).fetchone()
        for n, sql in enumerate(KNOWN_LEAKS, 1):
            with connect() as attacker:
                attacker.execute(sql)
            assert observer.execute(FINGERPRINT).fetchone() == baseline, sql
            assert sum(proxy.call(lambda: dict(proxy.ctx.pin_counts)).values()) == n, sql
