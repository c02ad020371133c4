"""`twistd -n rdsproxy --config FILE` as an operator runs it."""

import os
import time
import socket
import subprocess
from pathlib import Path

import pytest

try:
    from proxyutil import TwistdProxy, find_free_port, free_privileged_port, run_psql, write_proxy_config
except ImportError:
    from tests.integration.proxyutil import (TwistdProxy, find_free_port, free_privileged_port, run_psql,
                                             write_proxy_config)


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


def _run_twistd(config, *extra, timeout=60):
    return subprocess.run([TwistdProxy.twistd(), "-n", "--pidfile=", *extra, "rdsproxy", "--config", config],
                          capture_output=True, text=True, timeout=timeout, cwd=os.path.dirname(config))


def test_busy_listen_port_makes_twistd_exit_non_zero_with_address_and_os_error(pg_server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_proxy_config(tmp_path, pg_server, listen=f"tcp:{port}:interface=127.0.0.1")
        out = _run_twistd(config)
    assert out.returncode != 0, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert f"cannot listen on tcp:{port}:interface=127.0.0.1" in text, text
    assert "Address already in use" in text, text
    assert "Traceback" not in text and "Unhandled" not in text, text


def test_busy_admin_port_also_stops_the_start(pg_server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin = taken.getsockname()[1]
        config = write_proxy_config(tmp_path, pg_server, listen=f"tcp:{find_free_port()}:interface=127.0.0.1")
        text = Path(config).read_text() + f'Admin: {{Listen: "tcp:{admin}:interface=127.0.0.1"}}\n'
        Path(config).write_text(text)
        out = _run_twistd(config)
    assert out.returncode != 0
    assert f"127.0.0.1:{admin}" in out.stdout + out.stderr and "Address already in use" in out.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a port below 1024 then dropping privileges needs root")
def test_privileged_port_is_bound_before_privileges_drop(pg_server, tmp_path):
    port = free_privileged_port()
    config = write_proxy_config(tmp_path, pg_server, listen=f"tcp:{port}:interface=127.0.0.1")
    os.chmod(tmp_path, 0o755)  # the unprivileged process reads its config folder
    proxy = TwistdProxy(config, port, twistd_args=["--uid=65534", "--gid=65534"])
    try:
        proxy.start()

        def uid_line():
            status = Path(f"/proc/{proxy.proc.pid}/status").read_text()
            return next(line for line in status.splitlines() if line.startswith("Uid:"))

        # The port accepts from the moment it is bound, a moment before twistd sheds its
        # privileges: poll (bounded) for the drop.
        deadline = time.monotonic() + 60  # against a hang
        while uid_line().split()[1:3] != ["65534", "65534"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert uid_line().split()[1:3] == ["65534", "65534"], uid_line()  # running unprivileged
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")  # SSLRequest: the proxy answers it
            assert c.recv(1) == b"N"
    finally:
        proxy.stop()
