"""cli.py: argument parsing, the URL asked for, output and exit statuses (urlopen replaced)."""

import io
import json
import os
import subprocess
import sys
import urllib.error

import pytest

from txrdsproxy import cli

PROXIES = {"DBProxies": [{"DBProxyName": "app-pg", "Status": "available"}]}


class FakeResponse:
    def __init__(self, body, status=200):
        self.body, self.status = body, status

    def read(self):
        return self.body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeUrlopen:
    """Records the requests; answers with *body* (a dict -> JSON), or raises *error*."""

    def __init__(self, body=None, error=None):
        self.body, self.error = body, error
        self.requests = []

    def __call__(self, request, timeout=None):
        self.requests.append((request.full_url, timeout, request.get_method()))
        if self.error is not None:
            raise self.error
        body = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return FakeResponse(body)

    @property
    def url(self):
        return self.requests[-1][0]


def run(argv, urlopen):
    out, err = io.StringIO(), io.StringIO()
    status = cli.main(argv, stdout=out, stderr=err, urlopen=urlopen)
    return status, out.getvalue(), err.getvalue()


def http_error(url, code, body):
    return urllib.error.HTTPError(url, code, "error", {}, io.BytesIO(body))


@pytest.fixture(autouse=True)
def no_endpoint_env(monkeypatch):
    monkeypatch.delenv("RDSPROXY_ENDPOINT", raising=False)


def test_describe_db_proxies_prints_json_indented_by_4():
    urlopen = FakeUrlopen(PROXIES)
    status, out, err = run(["describe-db-proxies"], urlopen)
    assert status == 0 and err == ""
    assert out == json.dumps(PROXIES, indent=4) + "\n"
    assert out.startswith('{\n    "DBProxies": [\n        {\n')
    assert urlopen.requests == [("http://127.0.0.1:8089/v1/db-proxies", 30.0, "GET")]


@pytest.mark.parametrize("argv,url", [
    (["describe-db-proxies", "--db-proxy-name", "app-pg"],
     "http://127.0.0.1:8089/v1/db-proxies?DBProxyName=app-pg"),
    (["describe-db-proxy-target-groups", "--db-proxy-name", "app-pg"],
     "http://127.0.0.1:8089/v1/db-proxy-target-groups?DBProxyName=app-pg"),
    (["describe-db-proxy-target-groups", "--db-proxy-name", "app-pg", "--target-group-name", "default"],
     "http://127.0.0.1:8089/v1/db-proxy-target-groups?DBProxyName=app-pg&TargetGroupName=default"),
    (["describe-db-proxy-targets", "--db-proxy-name", "a b&c"],
     "http://127.0.0.1:8089/v1/db-proxy-targets?DBProxyName=a+b%26c"),
    (["--endpoint", "http://admin:9000/", "describe-db-proxy-targets", "--db-proxy-name", "x"],
     "http://admin:9000/v1/db-proxy-targets?DBProxyName=x"),
    (["--endpoint-url", "http://admin:9000", "describe-db-proxies"], "http://admin:9000/v1/db-proxies"),
])
def test_commands_ask_for_the_right_url(argv, url):
    urlopen = FakeUrlopen({})
    assert run(argv, urlopen)[0] == 0
    assert urlopen.url == url


def test_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("RDSPROXY_ENDPOINT", "http://10.1.2.3:8089")
    urlopen = FakeUrlopen({})
    run(["describe-db-proxies"], urlopen)
    assert urlopen.url == "http://10.1.2.3:8089/v1/db-proxies"
    run(["--endpoint", "http://other:1", "describe-db-proxies"], urlopen)
    assert urlopen.url == "http://other:1/v1/db-proxies"  # the option wins


def test_timeout_option():
    urlopen = FakeUrlopen({})
    run(["--timeout", "2.5", "describe-db-proxies"], urlopen)
    assert urlopen.requests[-1][1] == 2.5


@pytest.mark.parametrize("argv", [
    [],
    ["describe-everything"],
    ["describe-db-proxy-targets"],  # --db-proxy-name is required
    ["describe-db-proxy-target-groups"],
    ["describe-db-proxies", "--bogus"],
])
def test_usage_errors_exit_252(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv, urlopen=FakeUrlopen({}))
    assert exc.value.code == 252
    assert "usage: rdsproxy" in capsys.readouterr().err


def test_api_error_prints_code_and_message_and_exits_254():
    body = json.dumps({"Error": {"Code": "DBProxyNotFoundFault", "Message": "No proxy named 'x'."}})
    urlopen = FakeUrlopen(error=http_error("http://h/v1/db-proxies?DBProxyName=x", 404, body.encode()))
    status, out, err = run(["describe-db-proxies", "--db-proxy-name", "x"], urlopen)
    assert status == 254 and out == ""
    assert err.strip() == ("An error occurred (DBProxyNotFoundFault) when calling the DescribeDBProxies"
                           " operation: No proxy named 'x'.")


def test_non_json_error_body_still_exits_254():
    urlopen = FakeUrlopen(error=http_error("http://h/v1/db-proxies", 502, b"Bad Gateway"))
    status, _, err = run(["describe-db-proxies"], urlopen)
    assert status == 254 and "(HTTP502)" in err and "Bad Gateway" in err


def test_connection_failure_exits_255():
    urlopen = FakeUrlopen(error=urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    status, out, err = run(["describe-db-proxies"], urlopen)
    assert status == 255 and out == ""
    assert 'Could not connect to the endpoint URL: "http://127.0.0.1:8089/v1/db-proxies"' in err
    assert "Connection refused" in err


def test_timeout_exits_255():
    status, _, err = run(["describe-db-proxies"], FakeUrlopen(error=TimeoutError("timed out")))
    assert status == 255 and "timed out" in err


def test_non_json_answer_exits_255():
    status, out, err = run(["describe-db-proxies"], FakeUrlopen(b"<html>hello</html>"))
    assert status == 255 and out == "" and "did not answer with JSON" in err


def test_python_dash_m_runs_the_cli():
    env = dict(os.environ, RDSPROXY_ENDPOINT="http://127.0.0.1:8089")
    proc = subprocess.run([sys.executable, "-m", "txrdsproxy.cli", "--help"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0
    for command in cli.COMMANDS:
        assert command in proc.stdout
