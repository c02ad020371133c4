"""The soak's client sessions: each tags its own state with its own id and checks, on every
step, that what it sees is its own and nothing of anyone else's.

A *leak* is any sighting of another session's tag: a setting, a user variable, a temporary
table, a prepared statement, or a row a killed session never committed.  Every sighting is
recorded with its kind; the soak must end with none.

Sessions (one loop per thread, until `stop` is set):
- PgTagged:   psycopg; pins on purpose (SET, temp table, SQL PREPARE) and checks its own state
              survives across transactions; or stays unpinned and checks it sees no soak state
              at all; sometimes killed at a random point (mid-transaction, mid-query);
- MyTagged:   PyMySQL; the same with user variables, temporary tables, a tracked time_zone;
- PgHostile:  raw protocol: messages split at every byte, a message split across a transaction
              end (the issue's split-message attack), disguised SETs that must pin.
"""

import collections
import hashlib
import os
import random
import socket
import struct
import threading
import time

import psycopg
import pymysql

HOST = "127.0.0.1"


class Tally:
    """Thread-safe counters: transactions, errors by kind, leaks by kind, kills."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.errors = collections.Counter()
        self.leaks = collections.Counter()
        self.leak_examples = []

    def count(self, what, n=1):
        with self.lock:
            self.counts[what] += n

    def error(self, kind, exc):
        text = str(exc).strip().splitlines()[0][:90] if str(exc).strip() else ""
        with self.lock:
            self.errors[f"{kind}: {type(exc).__name__}: {text}"] += 1

    def leak(self, kind, detail):
        with self.lock:
            self.leaks[kind] += 1
            if len(self.leak_examples) < 20:
                self.leak_examples.append(f"{kind}: {detail}")


def leak_kind(kind, seen):
    """'pg setting' -> 'pg setting <- evil-cr' when a hostile session's disguise got through."""
    seen = str(seen)
    if seen.startswith("evil-"):
        return f"{kind} <- {seen.split('-h')[0] if seen.startswith('evil-straddle') else seen}"
    return f"{kind} <- another session"


def shutdown_socket(fileno):
    """Make the client vanish: RST-like abrupt end of the socket under a driver."""
    s = socket.socket(fileno=os.dup(fileno))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        s.close()


_ids = iter(range(1, 1 << 62))
_ids_lock = threading.Lock()


def new_tag(prefix):
    with _ids_lock:
        return f"{prefix}{next(_ids)}"


# -- PostgreSQL ---------------------------------------------------------------------------------------
class PgTagged:
    def __init__(self, port, user, password, db, tally, stop, seed):
        self.dsn = dict(host=HOST, port=port, user=user, password=password, dbname=db,
                        connect_timeout=30)
        self.tally, self.stop, self.rng = tally, stop, random.Random(seed)

    def run(self):
        while not self.stop.is_set():
            try:
                self.session()
            except (psycopg.Error, OSError) as e:
                self.tally.error("pg", e)
                time.sleep(0.05)

    def check_clean(self, cur, tag):
        """An unpinned session: it must see no soak state of anyone."""
        cur.execute("select current_setting('soak.tag', true)")
        seen = cur.fetchone()[0]
        if seen not in (None, ""):
            self.tally.leak(leak_kind("pg setting", seen), f"{tag} saw soak.tag={seen!r}")
        cur.execute("select string_agg(c.relname, ',') from pg_class c where c.relpersistence = 't'"
                    " and c.relname like 'soak_tmp%%' and pg_table_is_visible(c.oid)")
        seen = cur.fetchone()[0]
        if seen:
            self.tally.leak("pg temp table", f"{tag} saw {seen}")
        cur.execute("select string_agg(name, ',') from pg_prepared_statements where name like 'soak_%%'")
        seen = cur.fetchone()[0]
        if seen:
            self.tally.leak("pg prepared statement", f"{tag} saw {seen}")

    def session(self):
        tag = new_tag("p")
        pinned = self.rng.random() < 0.5
        prepare = 0 if self.rng.random() < 0.3 else None  # named protocol statements (tracked)
        with psycopg.connect(autocommit=True, prepare_threshold=prepare, **self.dsn) as conn:
            cur = conn.cursor()
            if pinned:
                cur.execute(f"set soak.tag = '{tag}'")
                cur.execute(f"create temp table soak_tmp_{tag} (t text)")
                cur.execute(f"insert into soak_tmp_{tag} values ('{tag}')")
                cur.execute(f"prepare soak_{tag} as select '{tag}'::text")
            steps = self.rng.randint(3, 12)
            kill_at = self.rng.randint(0, steps) if self.rng.random() < 0.2 else None
            for step in range(steps):
                if step == kill_at:
                    return self.vanish(conn, cur, tag)
                cur.execute("begin")
                cur.execute("select abalance from pgbench_accounts where aid = %s",
                            (self.rng.randint(1, 100000),))
                cur.fetchone()
                if pinned:
                    cur.execute("select current_setting('soak.tag', true)")
                    seen = cur.fetchone()[0]
                    if seen != tag:
                        self.tally.leak("pg setting", f"{tag} (pinned) saw {seen!r}")
                    cur.execute(f"select t from soak_tmp_{tag}")
                    if cur.fetchone()[0] != tag:
                        self.tally.leak("pg temp table", f"{tag} read another's row")
                    cur.execute(f"execute soak_{tag}")
                    if cur.fetchone()[0] != tag:
                        self.tally.leak("pg prepared statement", f"{tag} executed another's")
                else:
                    self.check_clean(cur, tag)
                cur.execute("commit")
                self.tally.count("pg session transactions")

    def vanish(self, conn, cur, tag):
        """Killed at a random point: mid-transaction (a row that must never be committed) or
        while a statement runs."""
        if self.rng.random() < 0.5:
            cur.execute("begin")
            cur.execute("insert into soak_killed values (%s)", (tag,))
            shutdown_socket(conn.fileno())
        else:
            fileno = conn.fileno()

            def later():
                time.sleep(self.rng.uniform(0.0, 0.05))
                shutdown_socket(fileno)

            killer = threading.Thread(target=later, daemon=True)
            killer.start()
            try:
                cur.execute(f"begin; insert into soak_killed values ('{tag}'); select pg_sleep(0.1)")
                cur.execute("rollback")
            except psycopg.Error:
                pass
            killer.join()  # before the close: the fd must not be reused by another connection yet
        self.tally.count("pg clients killed")
        try:
            conn.close()
        except psycopg.Error:
            pass


class PgHostile:
    """Raw-protocol sessions that try to break isolation; every attempt is followed by checks
    that their state stayed theirs (pinned) or never reached anyone (the PgTagged checkers)."""

    DISGUISED = [
        "--x\rset soak.tag = 'evil-cr'",
        "select set_config('soak.tag', 'evil-set-config', false)",
        "select \"set_config\"('soak.tag', 'evil-quoted', false)",
        "select pg_catalog.set_config('soak.tag', 'evil-qualified', false)",
        "SeT/**/soak.tag = 'evil-comment'",
        "do $$ begin perform set_config('soak.tag', 'evil-do', false); end $$",
        "update pg_settings set setting = 'evil-pg-settings' where name = 'soak.tag'",
    ]

    def __init__(self, port, user, password, db, tally, stop, seed):
        self.port, self.user, self.password, self.db = port, user, password, db
        self.tally, self.stop, self.rng = tally, stop, random.Random(seed)

    def run(self):
        while not self.stop.is_set():
            try:
                self.session()
            except (OSError, AssertionError, struct.error) as e:
                self.tally.error("pg hostile", e)
                time.sleep(0.05)

    # raw protocol helpers
    def login(self):
        sock = socket.create_connection((HOST, self.port), timeout=30)
        params = b"user\0" + self.user.encode() + b"\0database\0" + self.db.encode() + b"\0\0"
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        kind, payload = self.read_until(sock, b"R")[-1]
        salt = payload[4:8]
        inner = hashlib.md5((self.password + self.user).encode()).hexdigest()
        body = ("md5" + hashlib.md5(inner.encode() + salt).hexdigest()).encode() + b"\0"
        sock.sendall(b"p" + struct.pack("!I", len(body) + 4) + body)
        self.read_until(sock, b"Z")
        return sock

    def read_until(self, sock, kind):
        buf, out = b"", []
        while True:
            while len(buf) >= 5:
                (n,) = struct.unpack("!I", buf[1:5])
                if len(buf) < 1 + n:
                    break
                out.append((buf[:1], buf[5:1 + n]))
                buf = buf[1 + n:]
                if out[-1][0] == kind:
                    # More bytes would be answers to messages this session never sent whole:
                    # someone else's, or its own hidden ones run as real messages.
                    assert not buf, "reply bytes this session did not ask for"
                    return out
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"closed while waiting for {kind!r}: {out[-3:]!r}")
            buf += data

    @staticmethod
    def query(sql):
        body = sql.encode() + b"\0"
        return b"Q" + struct.pack("!I", len(body) + 4) + body

    def rows(self, msgs):
        out = []
        for kind, payload in msgs:
            if kind == b"D":
                (ln,) = struct.unpack("!i", payload[2:6])
                out.append(None if ln < 0 else payload[6:6 + ln].decode())
        return out

    def session(self):
        tag = new_tag("h")
        sock = self.login()
        try:
            attack = self.rng.choice(("split", "straddle", "disguised"))
            if attack == "split":  # one query, sent a byte at a time
                data = self.query(f"select '{tag}'")
                for i in range(len(data)):
                    sock.sendall(data[i:i + 1])
                got = self.rows(self.read_until(sock, b"Z"))
                assert got == [tag], got
            elif attack == "straddle":
                # Query + the header only of a CopyData whose body is a hidden SET: the proxy
                # must not hand the connection to anyone while that message is unfinished.
                hidden = self.query(f"set soak.tag = 'evil-straddle-{tag}'")
                sock.sendall(self.query("select 1") + b"d" + struct.pack("!I", len(hidden) + 4))
                time.sleep(self.rng.uniform(0, 0.05))
                sock.sendall(hidden)
                self.read_until(sock, b"Z")
                # The server ignores CopyData outside COPY; a second query proves the stream is sane.
                sock.sendall(self.query(f"select '{tag}'"))
                self.read_until(sock, b"Z")
            else:
                sql = self.rng.choice(self.DISGUISED)
                sock.sendall(self.query(sql))
                self.read_until(sock, b"Z")
                sock.sendall(self.query("select 1"))
                self.read_until(sock, b"Z")
            self.tally.count(f"pg hostile {attack}")
            sock.sendall(b"X\0\0\0\x04")
        finally:
            sock.close()


# -- MySQL / MariaDB ----------------------------------------------------------------------------------
class MyTagged:
    def __init__(self, port, user, password, db, tally, stop, seed):
        self.args = dict(host=HOST, port=port, user=user, password=password, database=db,
                         autocommit=True, connect_timeout=30, read_timeout=120)
        self.tally, self.stop, self.rng = tally, stop, random.Random(seed)

    def run(self):
        while not self.stop.is_set():
            try:
                self.session()
            except (pymysql.err.Error, OSError) as e:
                self.tally.error("mysql", e)
                time.sleep(0.05)

    def one(self, cur, sql, args=None):
        cur.execute(sql, args)
        row = cur.fetchone()
        return row[0] if row else None

    def session(self):
        tag = new_tag("m")
        pinned = self.rng.random() < 0.5
        zone = "+%02d:%02d" % (self.rng.randint(0, 12), self.rng.choice((0, 30)))
        conn = pymysql.connect(**self.args)
        try:
            cur = conn.cursor()
            cur.execute(f"set time_zone = '{zone}'")  # tracked, not pinned: follows the session
            if pinned:
                cur.execute(f"set @soak_tag = '{tag}'")
                cur.execute("create temporary table soak_tmp (t varchar(40))")
                cur.execute("insert into soak_tmp values (%s)", (tag,))
            steps = self.rng.randint(3, 12)
            kill_at = self.rng.randint(0, steps) if self.rng.random() < 0.2 else None
            for step in range(steps):
                if step == kill_at:
                    cur.execute("begin")
                    cur.execute("insert into soak_killed values (%s)", (tag,))
                    shutdown_socket(conn._sock.fileno())
                    self.tally.count("mysql clients killed")
                    return
                cur.execute("begin")
                self.one(cur, "select k from sbtest1 where id = %s", (self.rng.randint(1, 10000),))
                seen = self.one(cur, "select @@time_zone")
                if seen != zone:
                    self.tally.leak("mysql time_zone", f"{tag} set {zone}, saw {seen}")
                seen = self.one(cur, "select @soak_tag")
                if pinned:
                    if seen != tag:
                        self.tally.leak("mysql user variable", f"{tag} (pinned) saw {seen!r}")
                    if self.one(cur, "select t from soak_tmp") != tag:
                        self.tally.leak("mysql temp table", f"{tag} read another's row")
                else:
                    if seen is not None:
                        self.tally.leak(leak_kind("mysql user variable", seen), f"{tag} saw {seen!r}")
                    try:
                        cur.execute("select t from soak_tmp")
                        self.tally.leak("mysql temp table", f"{tag} saw {cur.fetchall()!r}")
                    except pymysql.err.ProgrammingError as e:
                        if e.args[0] != 1146:
                            raise
                cur.execute("commit")
                self.tally.count("mysql session transactions")
        finally:
            try:
                conn.close()
            except Exception:
                pass


class MyHostile:
    """PyMySQL sessions that change session state in disguise; MyTagged's unpinned sessions must
    never see it (user variables, temporary tables)."""

    DISGUISED = [
        "SET/**/@soak_tag = 'evil-comment'",
        "sEt @soak_tag := 'evil-case'",
        "select @soak_tag := 'evil-select-assign'",
        "/*!SET @soak_tag = 'evil-executable-comment' */",
        "set @`soak_tag` = 'evil-backtick'",
        "select 1; set @soak_tag = 'evil-multi'",
        "create /* x */ temporary table soak_tmp (t varchar(40))",
        "do @soak_tag := 'evil-do'",
    ]

    def __init__(self, port, user, password, db, tally, stop, seed):
        from pymysql.constants import CLIENT
        self.args = dict(host=HOST, port=port, user=user, password=password, database=db,
                         autocommit=True, connect_timeout=30, read_timeout=120,
                         client_flag=CLIENT.MULTI_STATEMENTS)
        self.tally, self.stop, self.rng = tally, stop, random.Random(seed)

    def run(self):
        while not self.stop.is_set():
            conn = None
            try:
                conn = pymysql.connect(**self.args)
                with conn.cursor() as cur:
                    sql = self.rng.choice(self.DISGUISED)
                    cur.execute(sql)
                    while cur.nextset():
                        pass
                    cur.execute("select 1")
                self.tally.count("mysql hostile disguised")
            except (pymysql.err.Error, OSError) as e:
                self.tally.error("mysql hostile", e)
                time.sleep(0.05)
            finally:
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:
                        pass
