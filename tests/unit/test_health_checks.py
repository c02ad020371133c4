"""Health-check credentials and database (failover/checks.py), the `HealthCheck` config key, and
the pinned sessions ended when the writer moves off their target (runtime.end_pinned_sessions_on).
Fake connectors and sessions, task.Clock; no sockets."""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from txrdsproxy.auth.secrets import Credentials, config_secret_arns
from txrdsproxy.config.load import ConfigError, parse_config
from txrdsproxy.config.model import HealthCheckConfig
from txrdsproxy.failover import monitor as mon
from txrdsproxy.failover.checks import HealthChecks, NoCheckCredentials
from txrdsproxy.proxy.pg_backend import DatabaseError, PgConnector

ARN1 = "arn:aws:secretsmanager:local:000000000000:secret:app"
ARN2 = "arn:aws:secretsmanager:local:000000000000:secret:ops"
MON = "arn:aws:secretsmanager:local:000000000000:secret:monitor"


def config(data=None, engine="POSTGRESQL", **proxy):
    targets = [{"RdsResourceId": "pg-1", "Endpoint": "127.0.0.1", "Port": 5432},
               {"RdsResourceId": "pg-2", "Endpoint": "127.0.0.1", "Port": 5433}]
    if data is not None:
        targets[1]["HealthCheck"] = data
    body = dict({"DBProxyName": "p1", "EngineFamily": engine, "Listen": "tcp:6432",
                 "Auth": [{"SecretArn": ARN1}, {"SecretArn": ARN2}],
                 "TargetGroups": [{"Targets": targets}]}, **proxy)
    return parse_config({"Secrets": {"Path": "/etc/secrets.json"}, "DBProxies": [body]}, "x.yaml", "/base")


# -- configuration ----------------------------------------------------------------------------------
def test_health_check_defaults_proxy_and_target_settings():
    cfg = config()
    proxy = cfg.proxies[0]
    assert proxy.health_check == HealthCheckConfig()
    assert proxy.health_check.retries == 2
    assert all(t.health_check is None for t in proxy.target_group.targets)
    cfg = config({"UserName": "ops", "Database": "appdb"},
                 HealthCheck={"SecretArn": MON, "Database": "postgres", "Retries": 4})
    proxy = cfg.proxies[0]
    assert proxy.health_check == HealthCheckConfig(secret_arn=MON, database="postgres", retries=4)
    assert proxy.target_group.targets[1].health_check == HealthCheckConfig(user_name="ops", database="appdb")
    assert MON in config_secret_arns(cfg)  # the store loads it like an Auth secret


@pytest.mark.parametrize("data, where, words", [
    ({"SecretArn": MON, "UserName": "ops"}, "Targets[1].HealthCheck.UserName", "not both"),
    ({"SecretArn": "monitor"}, "HealthCheck.SecretArn", "arn:"),
    ({"Retries": 1}, "Targets[1].HealthCheck", "Retries"),  # proxy level only
    ({"Password": "x"}, "Targets[1].HealthCheck", "Password"),
])
def test_health_check_errors_name_the_key(data, where, words):
    with pytest.raises(ConfigError) as info:
        config(data)
    assert where in str(info.value) and words in str(info.value)


def test_health_check_retries_range_and_database_is_postgresql_only():
    for bad in (-1, 11):
        with pytest.raises(ConfigError) as info:
            config(HealthCheck={"Retries": bad})
        assert "HealthCheck.Retries" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config(engine="MYSQL", HealthCheck={"Database": "mysql"})
    assert "HealthCheck.Database" in str(info.value) and "POSTGRESQL" in str(info.value)


# -- which credentials ------------------------------------------------------------------------------
class Secrets:
    def __init__(self, values):
        self.values = values  # arn -> Credentials

    def get(self, arn):
        return self.values.get(arn)

    def find_user(self, arns, username):
        for arn in arns:
            creds = self.values.get(arn)
            if creds is not None and creds.username == username:
                return arn, creds
        return None


class Connector(PgConnector):
    """PgConnector's failure_reason; probe_role answers from a table keyed by user."""

    def __init__(self, answers):
        self.answers = answers  # (target id, user) -> role or exception
        self.calls = []

    def probe_role(self, target, creds, database=None):
        self.calls.append((target.rds_resource_id, creds.username, database))
        answer = self.answers.get((target.rds_resource_id, creds.username),
                                  DatabaseError({"C": "28P01", "M": f"password authentication failed for user \"{creds.username}\""}))
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)


class Ctx:
    def __init__(self, cfg, secrets, connector):
        self.config = cfg.proxies[0]
        self.secrets = secrets
        self.connector = connector


def outcome(d):
    out = []
    d.addBoth(out.append)
    return out[0]


SECRETS = {ARN1: Credentials("app", "pw1", ARN1), ARN2: Credentials("ops", "pw2", ARN2),
           MON: Credentials("monitor", "pw3", MON)}


def test_default_tries_each_auth_secret_until_one_logs_in_and_remembers_it():
    cfg = config()
    pg1, pg2 = cfg.proxies[0].target_group.targets
    connector = Connector({("pg-1", "app"): "READ_WRITE", ("pg-2", "ops"): "READ_ONLY"})
    checks = HealthChecks(Ctx(cfg, Secrets(SECRETS), connector))
    assert outcome(checks.probe(pg1)) == "READ_WRITE"
    assert outcome(checks.probe(pg2)) == "READ_ONLY"  # "app" does not exist on pg-2
    assert connector.calls == [("pg-1", "app", None), ("pg-2", "app", None), ("pg-2", "ops", None)]
    del connector.calls[:]
    assert outcome(checks.probe(pg2)) == "READ_ONLY"
    assert connector.calls == [("pg-2", "ops", None)]  # the one that worked comes first now


def test_every_auth_secret_refused_is_auth_failure():
    cfg = config()
    pg1 = cfg.proxies[0].target_group.targets[0]
    checks = HealthChecks(Ctx(cfg, Secrets(SECRETS), Connector({})))
    failure = outcome(checks.probe(pg1))
    assert checks.failure_reason(failure) == mon.AUTH_FAILURE
    assert "ops" in failure.getErrorMessage()  # the last refusal; no password anywhere
    assert "pw" not in failure.getErrorMessage()


def test_a_connection_failure_is_not_retried_with_other_users():
    cfg = config()
    pg1 = cfg.proxies[0].target_group.targets[0]
    connector = Connector({("pg-1", "app"): ConnectionRefusedError("refused")})
    checks = HealthChecks(Ctx(cfg, Secrets(SECRETS), connector))
    outcome(checks.probe(pg1))
    assert connector.calls == [("pg-1", "app", None)]


def test_target_health_check_secret_and_database_win_over_the_proxy_ones():
    cfg = config({"SecretArn": MON, "Database": "monitoring"}, HealthCheck={"UserName": "ops"})
    pg1, pg2 = cfg.proxies[0].target_group.targets
    connector = Connector({("pg-1", "ops"): "READ_WRITE", ("pg-2", "monitor"): "READ_ONLY"})
    checks = HealthChecks(Ctx(cfg, Secrets(SECRETS), connector))
    assert outcome(checks.probe(pg1)) == "READ_WRITE"
    assert outcome(checks.probe(pg2)) == "READ_ONLY"
    assert connector.calls == [("pg-1", "ops", None), ("pg-2", "monitor", "monitoring")]


@pytest.mark.parametrize("setting, words", [
    ({"SecretArn": MON}, "no secret " + MON),
    ({"UserName": "nobody"}, "no Auth secret for user nobody"),
])
def test_missing_health_check_credentials_are_auth_failure_saying_which_setting(setting, words):
    cfg = config(HealthCheck=setting)
    pg1 = cfg.proxies[0].target_group.targets[0]
    secrets = dict(SECRETS)
    del secrets[MON]
    checks = HealthChecks(Ctx(cfg, Secrets(secrets), Connector({})))
    failure = outcome(checks.probe(pg1))
    assert failure.check(NoCheckCredentials) and words in failure.getErrorMessage()
    assert checks.failure_reason(failure) == mon.AUTH_FAILURE


def test_pg_probe_key_uses_the_configured_database():
    pg = PgConnector(Clock(), None, None, "", 1 << 20)
    assert pg.probe_key(Credentials("u", "p")) == ("u", "postgres")
    assert pg.probe_key(Credentials("u", "p"), "monitoring") == ("u", "monitoring")


# -- wiring and the pinned sessions of a former writer ------------------------------------------------
class FakeSecrets:
    def get(self, arn):
        return Credentials("app", "pw", arn)

    def find_user(self, arns, username):
        return None


class Conn:
    def __init__(self, target):
        self.target = target


class Lease:
    def __init__(self, target):
        self.conn = Conn(target)


class Session:
    def __init__(self, lease=None, pin=None, boundary=True):
        self.lease, self.pin_reason, self.boundary = lease, pin, boundary
        self.drained = []
        self.ended = False

    def drain(self, why=None):
        self.drained.append(why)
        if self.boundary:
            self.ended = True
        return self.ended


def test_build_monitor_wires_checks_retries_and_the_former_writer_rule():
    from txrdsproxy.service import build_proxy
    cfg = config(HealthCheck={"Retries": 5})
    ctx = build_proxy(cfg.proxies[0], FakeSecrets(), Clock(), {})
    monitor = ctx.monitor
    assert monitor.retries == 5 and monitor.checks.ctx is ctx
    assert monitor.failure_reason == monitor.checks.failure_reason
    pg1, pg2 = ctx.topology.targets
    pinned_old = Session(Lease(pg1), pin="prepared_statement")
    pinned_busy = Session(Lease(pg1), pin="set_variable", boundary=False)
    unpinned_old = Session(Lease(pg1))
    pinned_other = Session(Lease(pg2), pin="set_variable")
    idle = Session()
    ctx.sessions.update([pinned_old, pinned_busy, unpinned_old, pinned_other, idle])
    for listener in monitor.writer_listeners:
        listener(pg1, pg2, "failover")
    assert pinned_old.drained == ["writer changed"]
    assert pinned_busy.drained == ["writer changed"] and not pinned_busy.ended
    assert unpinned_old.drained == pinned_other.drained == idle.drained == []
    ctx.sessions.discard(pinned_old)  # it ended
    ctx.clock.advance(0.05)
    assert pinned_busy.drained == ["writer changed"] * 2  # asked again until its transaction ends


# -- the engines' "writer changed" error --------------------------------------------------------------
def test_mysql_pinned_session_ends_after_its_transaction_with_the_writer_changed_error():
    from tests.unit.test_mysql_frontend import AC, INTX, Harness, err, ok, query
    from txrdsproxy.wire.mysql import errors
    s = Harness()
    s.login()
    s.send(query("BEGIN"))
    lease = s.pool.give()
    lease.conn.respond(ok(AC | INTX))
    s.send(query("CREATE TEMPORARY TABLE t (x int)"))  # pins; cannot move
    lease.conn.respond(ok(AC | INTX))
    s.packets()
    assert s.frontend.drain("writer changed") is False  # inside a transaction: not yet
    assert not s.closed
    s.send(query("COMMIT"))
    lease.conn.respond(ok(AC))  # the boundary: ended at once, in this turn (no poll)
    assert s.closed
    [(seq1, commit_ok), (seq, payload)] = s.packets()
    assert seq1 == 1 and commit_ok[0] == 0  # the COMMIT's OK reached the client whole, first
    assert s.frontend.drain("writer changed") is True  # already ending
    expected = P_err(errors.writer_changed())
    assert seq == 0 and err(payload) == expected
    assert expected[:2] == (1053, "08S01") and "writer changed" in expected[2]
    assert s.closed


def P_err(payload):
    from txrdsproxy.wire.mysql import packets as P
    e = P.parse_err(payload)
    return e.code, e.sqlstate, e.message


def test_pg_pinned_session_ends_after_its_transaction_with_the_writer_changed_fatal():
    from tests.unit.test_pg_frontend import Harness, fatal
    from txrdsproxy.proxy.session import SessionState
    from txrdsproxy.wire.pg import messages as msg
    s = Harness()
    s.login()
    s.send(msg.query("BEGIN; CREATE TEMP TABLE t (x int)"))  # pins, inside a transaction; cannot move
    lease = s.pool.give()
    lease.conn.txn_status = b"T"  # what the backend connection reads from ReadyForQuery
    s.frontend.ready_for_query(b"T")
    assert s.frontend.state is SessionState.PINNED
    s.sent()
    assert s.frontend.drain("writer changed") is False and not s.closed
    s.send(msg.query("COMMIT"))
    lease.conn.txn_status = b"I"
    s.frontend.backend_data(msg.ready_for_query(b"I"))
    s.frontend.ready_for_query(b"I")  # the boundary: ended at once, in this turn (no poll)
    assert s.closed
    data = s.sent()
    assert data.startswith(msg.ready_for_query(b"I"))  # the COMMIT's answer reached the client first
    assert s.frontend.drain("writer changed") is True  # already ending
    fields = fatal(data[len(msg.ready_for_query(b"I")):])
    assert (fields["S"], fields["C"]) == ("FATAL", "08006")
    assert fields["M"].startswith("The proxy ended this session: it was pinned to a database "
                                  "connection on the former writer, and the writer changed")
    assert s.closed
    s.lose()
    assert lease.released and lease.release_args["needs_reset"] is True


def test_a_changed_health_check_applies_to_the_next_check():
    from txrdsproxy.runtime import ProxyRuntime
    runtime = ProxyRuntime(config().proxies[0], FakeSecrets(), Clock(), {})
    checks = runtime.ctx.monitor.checks
    pg1 = runtime.ctx.topology.targets[0]
    checks.working[pg1] = ARN2
    assert checks.settings(pg1) == HealthCheckConfig()
    changes = runtime.apply(config(HealthCheck={"Retries": 0, "UserName": "ops"}).proxies[0])
    assert changes == ["health_check"]
    assert runtime.ctx.monitor.retries == 0 and checks.working == {}
    assert checks.settings(pg1) == HealthCheckConfig(user_name="ops", retries=0)
