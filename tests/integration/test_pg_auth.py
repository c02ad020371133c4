"""Client authentication against the secrets store, and the proxy's own logins to the database."""

import pytest

import psycopg  # test extras: a missing driver must fail, not skip

try:
    from proxyutil import InProcessProxy, run_psql, write_proxy_config, write_secrets
except ImportError:
    from tests.integration.proxyutil import InProcessProxy, run_psql, write_proxy_config, write_secrets

ARN = "arn:aws:secretsmanager:local:000000000000:secret:"


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_client_auth_ok(pg_proxy, pg_server, user):
    with psycopg.connect(pg_proxy.dsn(pg_server, user=user)) as conn:
        assert conn.execute("select current_user").fetchone() == (user,)
    out = run_psql(pg_proxy, pg_server, ["-A", "-t", "-c", "select current_user"], user=user)
    assert out.returncode == 0 and out.stdout.strip() == user, out.stderr


@pytest.mark.parametrize("user", ["app_scram", "app_md5"])
def test_wrong_password(pg_proxy, pg_server, user):
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(pg_proxy.dsn(pg_server, user=user, password="not-the-password"))
    assert f"The password that was provided for the role {user} is wrong." in str(e.value)
    assert e.value.sqlstate in (None, "28P01")


def test_wrong_password_text_via_psql(pg_proxy, pg_server):
    out = run_psql(pg_proxy, pg_server, ["-c", "select 1"], PGPASSWORD="wrong")
    assert out.returncode != 0
    assert "The password that was provided for the role app_scram is wrong." in out.stderr


def test_unknown_role(pg_proxy, pg_server):
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(pg_proxy.dsn(pg_server, user="nobody", password="x"))
    assert ("This RDS proxy has no credentials for the role nobody. Check the credentials for "
            "this role and try again.") in str(e.value)


@pytest.fixture(scope="module")
def db_login_users(pg_server):
    """Users the *database* authenticates with each method (the proxy logs in as them)."""
    users = {"db_scram": "scram-sha-256", "db_md5": "md5", "db_plain": "password", "db_trust": "trust"}
    for name, method in users.items():
        if name not in pg_server.users:
            pg_server.create_user(name, f"{name}-pw-1", method=method)
            pg_server.psql(f"grant appdb_owner to {name}")
    return users


@pytest.mark.parametrize("user", ["db_scram", "db_md5", "db_plain", "db_trust"])
def test_proxy_logs_in_to_the_database(pg_server, db_login_users, tmp_path, user):
    secrets = {ARN + user: (user, pg_server.users[user], "POSTGRES_SCRAM_SHA_256")}
    # pg_server has no TLS: a cleartext password ('password' method) goes only where allowed
    # explicitly (tests/integration/test_database_tls.py covers the refusal).
    extra = {"DatabaseTLS": {"AllowCleartextPassword": True}} if user == "db_plain" else {}
    proxy = InProcessProxy(write_proxy_config(tmp_path, pg_server, secrets=secrets, **extra))
    try:
        with psycopg.connect(proxy.dsn(pg_server, user=user)) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
        method = pg_server.psql(
            f"select auth_method from pg_hba_file_rules where user_name[1] = '{user}'").strip()
        assert method == db_login_users[user]
    finally:
        proxy.stop()


def test_password_rotation(pg_server, tmp_path):
    user = "rot_user"
    if user not in pg_server.users:
        pg_server.create_user(user, "rot-old", method="scram-sha-256")
    pg_server.psql(f"alter role {user} password 'rot-old'")
    pg_server.users[user] = "rot-old"
    arn = ARN + user
    config = write_proxy_config(tmp_path, pg_server,
                                secrets={arn: (user, "rot-old", "POSTGRES_SCRAM_SHA_256")})
    proxy = InProcessProxy(config)
    try:
        with psycopg.connect(proxy.dsn(pg_server, user=user, dbname="postgres")) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
        # Rotate: the database first, then the secret (as Secrets Manager rotation does).
        pg_server.psql(f"alter role {user} password 'rot-new'")
        pg_server.users[user] = "rot-new"
        write_secrets(tmp_path / "secrets.json", {
            a: (u, p) for a, (u, p) in {
                arn: (user, "rot-new"),
                ARN + "app_scram": ("app_scram", pg_server.users["app_scram"]),
            }.items()})
        # Existing pooled database connections are dropped by the server side...
        pg_server.psql(f"select pg_terminate_backend(pid) from pg_stat_activity where usename = '{user}'")
        proxy.wait_for(lambda: proxy.call(lambda: not [
            c for c in proxy.ctx.pool.connections() if c.key[0] == user]), what="pool to notice")
        # ...so the next login needs a new database connection made with the new password.
        with psycopg.connect(proxy.dsn(pg_server, user=user, password="rot-new", dbname="postgres")) as conn:
            assert conn.execute("select current_user").fetchone() == (user,)
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(proxy.dsn(pg_server, user=user, password="rot-old", dbname="postgres"))
        assert f"The password that was provided for the role {user} is wrong." in str(e.value)
    finally:
        proxy.stop()
