"""config/load.py: a full valid file, defaults, and errors naming the file and key path."""

import copy
import os

import pytest
import yaml

from txrdsproxy.config import model as m
from txrdsproxy.config.load import ConfigError, load_config, parse_config

ARN = "arn:aws:secretsmanager:local:000000000000:secret:app"

FULL = """
Admin: {Listen: "tcp:8089:interface=127.0.0.1"}
Secrets: {Backend: file, Path: secrets.json}
DBProxies:
  - DBProxyName: app-pg
    EngineFamily: POSTGRESQL
    Listen: "tcp:6432:interface=127.0.0.1"
    RequireTLS: false
    IdleClientTimeout: 900
    DebugLogging: true
    MaxClientConnections: 50
    MaxConnectionRate: 2.5
    MaxMessageSize: 1048576
    Auth:
      - {AuthScheme: SECRETS, SecretArn: "%(arn)s", IAMAuth: DISABLED,
         ClientPasswordAuthType: POSTGRES_MD5, Description: app user}
    TargetGroups:
      - TargetGroupName: default
        ConnectionPoolConfig: {MaxConnectionsPercent: 90, MaxIdleConnectionsPercent: 10,
                               ConnectionBorrowTimeout: 30, SessionPinningFilters: [EXCLUDE_VARIABLE_SETS],
                               InitQuery: "SET x = 1"}
        Targets:
          - {RdsResourceId: pg-1, Endpoint: 127.0.0.1, Port: 5432, Role: READ_WRITE}
          - {RdsResourceId: pg-2, Endpoint: 127.0.0.1, Port: 5433}
  - DBProxyName: app-my
    EngineFamily: MYSQL
    Listen: "tcp:6033"
    Auth:
      - {SecretArn: "%(arn)s"}
    TargetGroups:
      - Targets:
          - {RdsResourceId: my-1, Endpoint: db.local, Port: 3306}
""" % {"arn": ARN}


def minimal():
    return {
        "Secrets": {"Path": "/etc/secrets.json"},
        "DBProxies": [{
            "DBProxyName": "p1",
            "EngineFamily": "POSTGRESQL",
            "Listen": "tcp:6432",
            "Auth": [{"SecretArn": ARN}],
            "TargetGroups": [{"Targets": [{"RdsResourceId": "pg-1", "Endpoint": "127.0.0.1", "Port": 5432}]}],
        }],
    }


def error_of(data, source="etc/x.yaml"):
    with pytest.raises(ConfigError) as info:
        parse_config(data, source, "/base")
    return str(info.value)


def with_change(change):
    data = minimal()
    change(data)
    return data


def proxy0(data):
    return data["DBProxies"][0]


def pool0(data):
    return proxy0(data)["TargetGroups"][0].setdefault("ConnectionPoolConfig", {})


# -- valid --------------------------------------------------------------------------------------------
def test_full_valid_config(tmp_path):
    path = tmp_path / "rdsproxy.yaml"
    path.write_text(FULL)
    cfg = load_config(str(path))
    assert cfg.source == str(path)
    assert cfg.admin == m.AdminConfig(listen="tcp:8089:interface=127.0.0.1")
    assert cfg.secrets == m.SecretsConfig(backend="file", path=os.path.join(str(tmp_path), "secrets.json"))
    pg, my = cfg.proxies
    assert pg == m.DBProxy(
        name="app-pg",
        engine_family="POSTGRESQL",
        listen="tcp:6432:interface=127.0.0.1",
        auth=(m.UserAuthConfig(secret_arn=ARN, iam_auth="DISABLED", client_password_auth_type="POSTGRES_MD5",
                               description="app user"),),
        target_group=m.DBProxyTargetGroup(
            name="default",
            connection_pool_config=m.ConnectionPoolConfig(
                max_connections_percent=90, max_idle_connections_percent=10, connection_borrow_timeout=30.0,
                session_pinning_filters=("EXCLUDE_VARIABLE_SETS",), init_query="SET x = 1"),
            targets=(m.DBProxyTarget("pg-1", "127.0.0.1", 5432, "READ_WRITE"),
                     m.DBProxyTarget("pg-2", "127.0.0.1", 5433, ""))),
        require_tls=False,
        idle_client_timeout=900.0,
        debug_logging=True,
        max_client_connections=50,
        max_connection_rate=2.5,
        max_message_size=1048576,
        resource_id=pg.resource_id,  # derived from the name: tests/unit/test_config_security.py
    )
    assert pg.target_group.connection_pool_config.exclude_variable_sets
    assert my.engine_family == "MYSQL"
    assert my.auth[0].client_password_auth_type == m.MYSQL_NATIVE
    assert my.target_group.targets == (m.DBProxyTarget("my-1", "db.local", 3306),)


def test_defaults():
    cfg = parse_config(minimal(), "x.yaml", "/base")
    p = cfg.proxies[0]
    pool = p.target_group.connection_pool_config
    assert pool.max_connections_percent == 100
    assert pool.max_idle_connections_percent == 50
    assert pool.connection_borrow_timeout == 120
    assert pool.session_pinning_filters == () and pool.init_query == ""
    assert not pool.exclude_variable_sets
    assert p.idle_client_timeout == 1800
    assert p.require_tls is False and p.debug_logging is False
    assert p.max_client_connections == 10000
    assert p.max_connection_rate == 0
    assert p.max_message_size == 64 * 1024 * 1024
    assert p.target_group.name == "default"
    assert p.auth[0] == m.UserAuthConfig(secret_arn=ARN, client_password_auth_type=m.PG_SCRAM)
    assert cfg.admin.listen is None
    assert cfg.secrets.backend == "file"


def test_pool_defaults_with_an_empty_pool_config():
    data = minimal()
    pool0(data)
    pool = parse_config(data).proxies[0].target_group.connection_pool_config
    assert (pool.max_connections_percent, pool.max_idle_connections_percent, pool.connection_borrow_timeout,
            pool.idle_connection_timeout) == (100, 50, 120, 60)


def test_idle_connection_timeout_is_read():
    data = minimal()
    pool0(data)["IdleConnectionTimeout"] = 0.5
    assert parse_config(data).proxies[0].target_group.connection_pool_config.idle_connection_timeout == 0.5


def test_idle_default_is_half_of_max_connections_percent_as_in_the_rds_api():
    data = minimal()
    pool0(data)["MaxConnectionsPercent"] = 30
    pool = parse_config(data).proxies[0].target_group.connection_pool_config
    assert pool.max_idle_connections_percent == 15


def test_relative_secrets_path_resolves_against_the_config_folder(tmp_path):
    sub = tmp_path / "etc"
    sub.mkdir()
    data = minimal()
    data["Secrets"]["Path"] = "../secrets/s.json"
    (sub / "p.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(str(sub / "p.yaml"))
    assert os.path.normpath(cfg.secrets.path) == str(tmp_path / "secrets" / "s.json")


def test_relative_config_path_still_resolves_to_the_config_folder(tmp_path, monkeypatch):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(minimal() | {"Secrets": {"Path": "s.json"}}))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("p.yaml")
    assert cfg.secrets.path == str(tmp_path / "s.json")
    assert cfg.source == "p.yaml"


def test_absolute_secrets_path_is_kept():
    assert parse_config(minimal(), "x", "/base").secrets.path == "/etc/secrets.json"


def test_yaml_ints_accepted_for_numbers():
    data = minimal()
    proxy0(data)["IdleClientTimeout"] = 60
    pool0(data)["ConnectionBorrowTimeout"] = 1
    p = parse_config(data).proxies[0]
    assert p.idle_client_timeout == 60.0 and isinstance(p.idle_client_timeout, float)


# -- file errors --------------------------------------------------------------------------------------
def test_missing_file_names_the_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read: "):
        load_config(path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("DBProxies: [\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML"):
        load_config(str(path))


def test_errors_from_a_file_name_that_file(tmp_path):
    path = tmp_path / "bad.yaml"
    data = minimal()
    pool0(data)["MaxConnectionsPercent"] = 0
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(
        f"{path}: DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxConnectionsPercent: "
        "must be between 1 and 100")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=rf"^{path}: DBProxies: is required$"):
        load_config(str(path))


# -- key path errors ----------------------------------------------------------------------------------
CASES = [
    # (change, expected message after "etc/x.yaml: ")
    (lambda d: d.update(Extra=1), "Extra: unknown key (allowed: Admin, DBInstances, DBProxies, DrainTimeout, IAM, Secrets, StateDirectory, Workers)"),
    (lambda d: proxy0(d).update(Bogus=1), "DBProxies[0].Bogus: unknown key"),
    (lambda d: proxy0(d)["Auth"][0].update(Password="x"), "DBProxies[0].Auth[0].Password: unknown key"),
    (lambda d: proxy0(d)["TargetGroups"][0]["Targets"][0].update(Host="h"),
     "DBProxies[0].TargetGroups[0].Targets[0].Host: unknown key"),
    (lambda d: pool0(d).update(MaxConnections=5), "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxConnections: unknown key"),
    (lambda d: d.update(Admin={"Listen": "tcp:1", "Port": 1}), "Admin.Port: unknown key"),
    (lambda d: d["Secrets"].update(Bogus="x"), "Secrets.Bogus: unknown key"),
    # ranges
    (lambda d: pool0(d).update(MaxConnectionsPercent=0),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxConnectionsPercent: must be between 1 and 100 (got 0)"),
    (lambda d: pool0(d).update(MaxConnectionsPercent=101),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxConnectionsPercent: must be between 1 and 100 (got 101)"),
    (lambda d: pool0(d).update(MaxIdleConnectionsPercent=-1),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxIdleConnectionsPercent: must be between 0 and 100"),
    (lambda d: pool0(d).update(MaxConnectionsPercent=40, MaxIdleConnectionsPercent=60),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxIdleConnectionsPercent: must not exceed MaxConnectionsPercent (40)"),
    (lambda d: pool0(d).update(IdleConnectionTimeout=0),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.IdleConnectionTimeout: must be between 0.1 and 86400"),
    (lambda d: pool0(d).update(ConnectionBorrowTimeout=3601),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.ConnectionBorrowTimeout: must be between 0 and 3600"),
    (lambda d: proxy0(d).update(IdleClientTimeout=0), "DBProxies[0].IdleClientTimeout: must be between 1 and 28800"),
    (lambda d: proxy0(d).update(IdleClientTimeout=28801), "DBProxies[0].IdleClientTimeout: must be between 1 and 28800"),
    (lambda d: proxy0(d)["TargetGroups"][0]["Targets"][0].update(Port=70000),
     "DBProxies[0].TargetGroups[0].Targets[0].Port: must be between 1 and 65535 (got 70000)"),
    # wrong types
    (lambda d: proxy0(d).update(RequireTLS="yes"), "DBProxies[0].RequireTLS: must be true or false"),
    (lambda d: proxy0(d).update(IdleClientTimeout="30"), "DBProxies[0].IdleClientTimeout: must be a number"),
    (lambda d: proxy0(d).update(IdleClientTimeout=True), "DBProxies[0].IdleClientTimeout: must be a number"),
    (lambda d: pool0(d).update(MaxConnectionsPercent=50.5),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxConnectionsPercent: must be an integer"),
    (lambda d: pool0(d).update(MaxConnectionsPercent=True),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.MaxConnectionsPercent: must be an integer"),
    (lambda d: proxy0(d)["TargetGroups"][0]["Targets"][0].update(Port="5432"),
     "DBProxies[0].TargetGroups[0].Targets[0].Port: must be an integer"),
    (lambda d: proxy0(d).update(DBProxyName=5), "DBProxies[0].DBProxyName: must be a string"),
    (lambda d: proxy0(d).update(Auth={"SecretArn": ARN}), "DBProxies[0].Auth: must be a list"),
    (lambda d: proxy0(d).update(Auth=["arn"]), "DBProxies[0].Auth[0]: must be a mapping"),
    (lambda d: d.update(DBProxies={"a": 1}), "DBProxies: must be a list"),
    (lambda d: d.update(DBProxies=["p"]), "DBProxies[0]: must be a mapping"),
    (lambda d: d.update(Secrets="secrets.json"), "Secrets: must be a mapping"),
    (lambda d: proxy0(d)["TargetGroups"][0].update(ConnectionPoolConfig=[1]),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig: must be a mapping"),
    (lambda d: pool0(d).update(SessionPinningFilters="EXCLUDE_VARIABLE_SETS"),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.SessionPinningFilters: must be a list"),
    (lambda d: pool0(d).update(SessionPinningFilters=["EXCLUDE_VARIABLE_SETS", "NOPE"]),
     "DBProxies[0].TargetGroups[0].ConnectionPoolConfig.SessionPinningFilters[1]: unknown filter 'NOPE'"),
    # choices
    (lambda d: proxy0(d).update(EngineFamily="SQLSERVER"),
     "DBProxies[0].EngineFamily: must be one of POSTGRESQL, MYSQL (got 'SQLSERVER')"),
    (lambda d: proxy0(d)["Auth"][0].update(ClientPasswordAuthType="MYSQL_NATIVE_PASSWORD"),
     "DBProxies[0].Auth[0].ClientPasswordAuthType: must be one of POSTGRES_SCRAM_SHA_256, POSTGRES_MD5"),
    (lambda d: proxy0(d)["Auth"][0].update(IAMAuth="OPTIONAL"), "DBProxies[0].Auth[0].IAMAuth: must be one of"),
    (lambda d: proxy0(d)["Auth"][0].update(AuthScheme="KERBEROS"), "DBProxies[0].Auth[0].AuthScheme: must be one of"),
    (lambda d: proxy0(d)["TargetGroups"][0]["Targets"][0].update(Role="WRITER"),
     "DBProxies[0].TargetGroups[0].Targets[0].Role: must be one of READ_WRITE, READ_ONLY"),
    (lambda d: d["Secrets"].update(Backend="vault"), "Secrets.Backend: must be one of file"),
    # required and shapes
    (lambda d: proxy0(d).pop("DBProxyName"), "DBProxies[0].DBProxyName: is required"),
    (lambda d: proxy0(d).pop("EngineFamily"), "DBProxies[0].EngineFamily: is required"),
    (lambda d: proxy0(d).pop("Listen"), "DBProxies[0].Listen: is required"),
    (lambda d: proxy0(d).update(Auth=[]), "DBProxies[0].Auth: must list at least one Auth entry"),
    (lambda d: proxy0(d)["Auth"][0].pop("SecretArn"), "DBProxies[0].Auth[0].SecretArn: is required"),
    (lambda d: proxy0(d).update(TargetGroups=[]), "DBProxies[0].TargetGroups: must hold exactly one target group"),
    (lambda d: proxy0(d)["TargetGroups"].append(copy.deepcopy(proxy0(d)["TargetGroups"][0])),
     "DBProxies[0].TargetGroups: must hold exactly one target group"),
    (lambda d: proxy0(d)["TargetGroups"][0].update(TargetGroupName="9 lives"),
     "DBProxies[0].TargetGroups[0].TargetGroupName: must start with a letter"),
    (lambda d: proxy0(d)["TargetGroups"][0]["Targets"][0].pop("Port"),
     "DBProxies[0].TargetGroups[0].Targets[0].Port: is required"),
    (lambda d: proxy0(d)["TargetGroups"][0]["Targets"][0].update(Port=None),
     "DBProxies[0].TargetGroups[0].Targets[0].Port: is required"),
    (lambda d: proxy0(d)["TargetGroups"][0]["Targets"][0].pop("Endpoint"),
     "DBProxies[0].TargetGroups[0].Targets[0].Endpoint: is required"),
    (lambda d: d.pop("DBProxies"), "DBProxies: is required"),
    (lambda d: d.pop("Secrets"), "Secrets: is required when a proxy uses AuthScheme SECRETS"),
    (lambda d: d.update(Secrets={}), "Secrets.Path: is required"),
    # names
    (lambda d: proxy0(d).update(DBProxyName="1abc"), "DBProxies[0].DBProxyName: must start with a letter"),
    (lambda d: proxy0(d).update(DBProxyName="a_b"), "DBProxies[0].DBProxyName: must start with a letter"),
    (lambda d: proxy0(d).update(DBProxyName=""), "DBProxies[0].DBProxyName: must start with a letter"),
    (lambda d: d["DBProxies"].append(dict(copy.deepcopy(proxy0(d)), Listen="tcp:6433")),
     "DBProxies[1].DBProxyName: duplicate DBProxyName 'p1'"),
    # endpoints
    (lambda d: proxy0(d).update(Listen="tcp:notaport"), "DBProxies[0].Listen: not a Twisted server endpoint description"),
    (lambda d: proxy0(d).update(Listen="bogus:1"), "DBProxies[0].Listen: not a Twisted server endpoint description"),
    (lambda d: proxy0(d).update(Listen=""), "DBProxies[0].Listen: not a Twisted server endpoint description"),
    (lambda d: proxy0(d).update(Listen="tcp"), "DBProxies[0].Listen: not a Twisted server endpoint description"),
    (lambda d: proxy0(d).update(Listen="tcp:6432:colour=blue"), "DBProxies[0].Listen: not a Twisted server endpoint description"),
    (lambda d: proxy0(d).update(Listen="tcp:99999"), "DBProxies[0].Listen: not a Twisted server endpoint description"),
    (lambda d: proxy0(d).update(Listen=6432), "DBProxies[0].Listen: must be a string"),
    (lambda d: d.update(Admin={"Listen": "http:8089"}), "Admin.Listen: not a Twisted server endpoint description"),
]


@pytest.mark.parametrize("change,expected", CASES, ids=[e.split(":")[0] + "-" + str(i) for i, (_, e) in enumerate(CASES)])
def test_errors_name_file_and_key_path(change, expected):
    message = error_of(with_change(change))
    assert message.startswith("etc/x.yaml: " + expected), message


def test_top_level_not_a_mapping():
    assert error_of(["a"]) == "etc/x.yaml: (top level): must be a mapping"


def test_valid_endpoints_are_kept():
    for listen in ("tcp:6432", "tcp:port=6432:interface=127.0.0.1", "unix:/tmp/pg.sock", "tcp:0"):
        data = minimal()
        proxy0(data)["Listen"] = listen
        assert parse_config(data).proxies[0].listen == listen


def test_admin_without_listen():
    data = minimal()
    data["Admin"] = {}
    assert parse_config(data).admin.listen is None


def test_config_is_immutable():
    cfg = parse_config(minimal())
    with pytest.raises(Exception):
        cfg.proxies[0].name = "other"


def test_require_tls_without_tls_is_refused():
    data = yaml.safe_load(FULL)
    data["DBProxies"][0]["RequireTLS"] = True
    with pytest.raises(ConfigError, match=r"x\.yaml: DBProxies\[0\]\.RequireTLS: true needs TLS"):
        parse_config(data, "x.yaml", "/cfg")


def _with_tls(tmp_path, **tls):
    from txrdsproxy.testing.certs import write_self_signed
    write_self_signed(str(tmp_path))
    write_self_signed(str(tmp_path), "other")
    data = yaml.safe_load(FULL)
    data["DBProxies"][0]["TLS"] = tls
    return data


def test_tls_paths_are_relative_to_the_config_folder_and_allow_require_tls(tmp_path):
    data = _with_tls(tmp_path, CertificateFile="proxy.crt", PrivateKeyFile="proxy.key")
    data["DBProxies"][0]["RequireTLS"] = True
    cfg = parse_config(data, "x.yaml", str(tmp_path))
    p = cfg.proxies[0]
    assert p.require_tls is True
    assert p.tls == m.TLSConfig(str(tmp_path / "proxy.crt"), str(tmp_path / "proxy.key"))
    assert cfg.proxies[1].tls is None and cfg.proxies[1].require_tls is False


@pytest.mark.parametrize("tls, error", [
    ({"CertificateFile": "missing.crt", "PrivateKeyFile": "proxy.key"},
     r"DBProxies\[0\]\.TLS\.CertificateFile: .*missing\.crt: cannot read"),
    ({"CertificateFile": "proxy.crt", "PrivateKeyFile": "missing.key"},
     r"DBProxies\[0\]\.TLS\.PrivateKeyFile: .*missing\.key: cannot read"),
    ({"CertificateFile": "proxy.key", "PrivateKeyFile": "proxy.key"},
     r"DBProxies\[0\]\.TLS\.CertificateFile: .*proxy\.key: not a PEM certificate"),
    ({"CertificateFile": "proxy.crt", "PrivateKeyFile": "proxy.crt"},
     r"DBProxies\[0\]\.TLS\.PrivateKeyFile: .*proxy\.crt: not an unencrypted PEM private key"),
    ({"CertificateFile": "proxy.crt", "PrivateKeyFile": "other.key"},
     r"DBProxies\[0\]\.TLS\.PrivateKeyFile: .*other\.key: does not match the certificate"),
    ({"CertificateFile": "proxy.crt"}, r"DBProxies\[0\]\.TLS\.PrivateKeyFile: is required"),
    ({"CertificateFile": "proxy.crt", "PrivateKeyFile": "proxy.key", "CA": "x"},
     r"DBProxies\[0\]\.TLS\.CA: unknown key"),
])
def test_tls_files_are_checked_at_load(tmp_path, tls, error):
    data = _with_tls(tmp_path, **tls)
    with pytest.raises(ConfigError, match=r"^x\.yaml: " + error) as info:
        parse_config(data, "x.yaml", str(tmp_path))
    assert "PRIVATE KEY" not in str(info.value)


def test_iam_auth_required_needs_client_tls_and_principals():
    data = yaml.safe_load(FULL)
    data["DBProxies"][0]["Auth"][0]["IAMAuth"] = "REQUIRED"
    with pytest.raises(ConfigError, match=r"DBProxies\[0\]\.TLS: IAMAuth REQUIRED needs TLS"):
        parse_config(data, "x.yaml", "/cfg")


def test_proxies_and_targets_may_be_empty_for_the_api_to_fill():
    """A proxy created through the API starts with an empty target group, and every proxy may
    have been deleted through the API: both must survive a restart."""
    config = parse_config({"DBProxies": []}, "x.yaml")
    assert config.proxies == ()
    doc = {"Secrets": {"Path": "s.json"}, "DBProxies": [{
        "DBProxyName": "p", "EngineFamily": "POSTGRESQL", "Listen": "tcp:6432",
        "Auth": [{"SecretArn": "a"}], "TargetGroups": [{"TargetGroupName": "default"}],
        "RoleArn": "arn:aws:iam::000000000000:role/r", "VpcSubnetIds": ["s-1", "s-2"]}],
        "DBInstances": [{"DBInstanceIdentifier": "pg-2", "Endpoint": "127.0.0.1", "Port": 5433}],
        "DrainTimeout": 12, "Admin": {"AllowUnauthenticatedLoopbackReads": True}}
    config = parse_config(doc, "x.yaml")
    proxy = config.proxies[0]
    assert proxy.target_group.targets == () and proxy.role_arn.endswith(":role/r")
    assert proxy.vpc_subnet_ids == ("s-1", "s-2")
    assert config.db_instances[0].identifier == "pg-2" and config.db_instances[0].port == 5433
    assert config.drain_timeout == 12.0 and config.admin.allow_unauthenticated_loopback_reads
    doc["DBInstances"].append(dict(doc["DBInstances"][0]))
    with pytest.raises(ConfigError, match=r"DBInstances\[1\]\.DBInstanceIdentifier: duplicate"):
        parse_config(doc, "x.yaml")
