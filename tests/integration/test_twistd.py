"""`twistd -n rdsproxy --config FILE` as an operator runs it."""

from pathlib import Path


try:
    from proxyutil import TwistdProxy, find_free_port, run_psql, write_proxy_config
except ImportError:
    from tests.integration.proxyutil import TwistdProxy, find_free_port, run_psql, write_proxy_config


def test_twistd_serves_psql(pg_server, tmp_path):
    port = find_free_port()
    config = write_proxy_config(tmp_path, pg_server, listen=f"tcp:{port}:interface=127.0.0.1")
    proxy = TwistdProxy(config, port).start()
    try:
        for user in ("app_scram", "app_md5"):
            out = run_psql(proxy, pg_server, ["-A", "-t", "-c", "select current_user, 1 + 1"], user=user)
            assert out.returncode == 0, out.stderr + proxy.log()
            assert out.stdout.strip() == f"{user}|2"
    finally:
        status = proxy.stop()
    # twistd re-raises the signal it stopped on after a clean shutdown (exit status -SIGTERM).
    assert status in (0, -15), proxy.log()
    assert "Server Shut Down." in proxy.log()
    assert "Traceback" not in proxy.log()


def test_check_config_ok(pg_server, tmp_path):
    config = write_proxy_config(tmp_path, pg_server)
    out = TwistdProxy.check_config(config)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout


def test_check_config_bad(pg_server, tmp_path):
    config = write_proxy_config(tmp_path, pg_server, listen="nonsense:1:2")
    out = TwistdProxy.check_config(config)
    assert out.returncode == 1, out.stdout + out.stderr
    assert config in out.stderr and "DBProxies[0].Listen" in out.stderr, out.stderr
    Path(config).write_text("DBProxies: [{DBProxyName: x}]\n")
    out = TwistdProxy.check_config(config)
    assert out.returncode == 1 and "DBProxies[0]" in out.stderr, out.stderr
