"""Logins that arrive before the AWS Secrets Manager store's first read has ended wait for it
(bounded by ClientAuthTimeout) instead of being refused as users without a secret (PG: "no
credentials for the role", MySQL: "Access denied ... (using password: YES)", a wrong-password
lookalike).  The store's reads run in a fake thread pool the test completes by hand."""

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from tests.unit import test_mysql_frontend as myfe
from tests.unit import test_pg_frontend as pgfe
from txrdsproxy.auth.aws import AwsSecretsStore
from txrdsproxy.auth.secrets import ISecretsLoading
from txrdsproxy.proxy.session import SessionState
from txrdsproxy.wire.mysql import packets as P
from txrdsproxy.wire.pg import messages as msg


class ThreadPool:
    """callInThreadWithCallback as Twisted's, run when the test says (`run_all`)."""

    def __init__(self):
        self.queued = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.queued.append((on_result, f, args, kwargs))

    def run_all(self):
        queued, self.queued = self.queued, []
        for on_result, f, args, kwargs in queued:
            try:
                result = f(*args, **kwargs)
            except Exception as e:  # as the real pool: the Deferred fails
                from twisted.python.failure import Failure
                on_result(False, Failure(e))
            else:
                on_result(True, result)


class Reactor(Clock):
    def __init__(self):
        super().__init__()
        self.pool = ThreadPool()

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class SecretsManager:
    """botocore's secretsmanager client, as far as the store uses it."""

    def __init__(self, values, error=None):
        self.values = values
        self.error = error

    def get_secret_value(self, SecretId):
        if self.error is not None:
            raise self.error
        import json
        return {"SecretString": json.dumps(self.values[SecretId])}


def aws_store(arn, username, password, error=None):
    reactor = Reactor()
    client = SecretsManager({arn: {"username": username, "password": password}}, error)
    store = AwsSecretsStore(reactor, "us-east-1", client_factory=lambda: client)
    store.watch([arn])  # as make_service does at start: the first read is queued, not done
    return store, reactor


def test_the_store_says_which_first_reads_are_under_way():
    store, reactor = aws_store(pgfe.ARN, pgfe.USER, pgfe.PASSWORD)
    assert verifyObject(ISecretsLoading, store)
    pending = store.loading([pgfe.ARN])
    assert pending is not None and not pending.called
    assert store.loading(["arn:other"]) is None  # never asked for: nothing to wait for
    reactor.pool.run_all()
    assert pending.called and store.loading([pgfe.ARN]) is None
    store.refresh()  # a later refresh is not a first read: lookups answer from the cache
    assert store.loading([pgfe.ARN]) is None


def test_a_failed_first_read_ends_the_wait():
    store, reactor = aws_store(pgfe.ARN, pgfe.USER, pgfe.PASSWORD, error=OSError("unreachable"))
    pending = store.loading([pgfe.ARN])
    reactor.pool.run_all()
    assert pending.called and store.loading([pgfe.ARN]) is None and store.get(pgfe.ARN) is None


def pg_harness(store):
    h = pgfe.Harness()
    h.ctx.secrets = store
    return h


def test_pg_login_during_the_first_read_waits_and_then_authenticates():
    store, reactor = aws_store(pgfe.ARN, pgfe.USER, pgfe.PASSWORD)
    h = pg_harness(store)
    h.startup()
    assert h.sent() == b"" and not h.closed  # not "no credentials for the role"
    reactor.pool.run_all()
    [(kind, payload)] = h.messages()
    assert kind == b"R" and payload[:4] == b"\0\0\0\x05"  # the MD5 password request
    h.send(msg.password_message(pgfe.md5_response(pgfe.USER, pgfe.PASSWORD, payload[4:8])))
    h.pool.give()
    assert h.messages()[-1] == (b"Z", b"I") and h.frontend.state is SessionState.IDLE


def test_pg_wait_for_the_first_read_is_bounded_by_the_auth_timeout():
    store, reactor = aws_store(pgfe.ARN, pgfe.USER, pgfe.PASSWORD)
    h = pg_harness(store)
    h.startup()
    h.clock.advance(h.ctx.config.client_auth_timeout)
    fields = pgfe.fatal(h.sent())
    assert (fields["C"], fields["M"]) == ("08006", "Authentication timed out.") and h.closed
    reactor.pool.run_all()  # the read ends after the client was told: nothing more happens
    assert h.sent() == b""


def test_pg_after_a_failed_first_read_the_user_has_no_credentials():
    store, reactor = aws_store(pgfe.ARN, pgfe.USER, pgfe.PASSWORD, error=OSError("unreachable"))
    h = pg_harness(store)
    h.startup()
    reactor.pool.run_all()
    fields = pgfe.fatal(h.sent())
    assert fields["C"] == "28000" and "no credentials for the role bob" in fields["M"]


def test_pg_client_gone_while_waiting():
    store, reactor = aws_store(pgfe.ARN, pgfe.USER, pgfe.PASSWORD)
    h = pg_harness(store)
    h.startup()
    h.lose()
    reactor.pool.run_all()
    assert h.sent() == b""


def test_mysql_login_during_the_first_read_waits_and_then_authenticates():
    store, reactor = aws_store(myfe.ARN, myfe.USER, myfe.PASSWORD)
    h = myfe.Harness()
    h.ctx.secrets = store
    h.handshake()
    assert h.packets() == [] and not h.closed  # not "Access denied ... (using password: YES)"
    reactor.pool.run_all()
    assert h.packets() == [(2, P.ok_packet(status=myfe.AC))]
    assert h.frontend.state is SessionState.IDLE


def test_mysql_packet_while_waiting_is_refused():
    store, reactor = aws_store(myfe.ARN, myfe.USER, myfe.PASSWORD)
    h = myfe.Harness()
    h.ctx.secrets = store
    h.handshake()
    h.send(P.encode_packet(b"\x00" * 20, 3))  # nothing was asked for
    [(_, payload)] = h.packets()
    assert myfe.err(payload)[0] == 1045 and h.closed
    reactor.pool.run_all()
    assert h.packets() == []
