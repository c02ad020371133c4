"""YAML -> `Config`, validated once, with errors that name the file and the key path.

Every problem is reported as ``ConfigError("etc/x.yaml: DBProxies[0].Listen: ...")`` so that
`twistd rdsproxy --check-config` and a failing start tell the operator exactly what to fix.
"""

import os

import yaml
from twisted.internet.endpoints import _parseServer  # validation only; no reactor use

from txrdsproxy.config import model as m


class ConfigError(Exception):
    """The configuration file is unusable; the message names the file and the key path."""


class _Node:
    """A mapping plus the key path that led to it, for error messages."""

    def __init__(self, source, path, value):
        self.source, self.path, self.value = source, path, value

    def fail(self, message, key=None):
        where = self.path if key is None else self._join(key)
        raise ConfigError(f"{self.source}: {where or '(top level)'}: {message}")

    def _join(self, key):
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def child(self, key, value):
        return _Node(self.source, self._join(key), value)

    def mapping(self, allowed):
        if not isinstance(self.value, dict):
            self.fail("must be a mapping")
        for key in self.value:
            if key not in allowed:
                self.fail(f"unknown key (allowed: {', '.join(sorted(allowed))})", key)
        return self

    def get(self, key, kind, default=None, required=False):
        if key not in self.value or self.value[key] is None:
            if required:
                self.fail("is required", key)
            return default
        value = self.value[key]
        if kind is bool:
            if not isinstance(value, bool):
                self.fail("must be true or false", key)
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail("must be an integer", key)
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail("must be a number", key)
            value = float(value)
        elif kind is str:
            if not isinstance(value, str):
                self.fail("must be a string", key)
        elif kind is list:
            if not isinstance(value, list):
                self.fail("must be a list", key)
            return [self.child(key, None).child(i, v) for i, v in enumerate(value)]
        elif kind is dict:
            return self.child(key, value)
        return value

    def ranged(self, key, kind, default, low, high):
        value = self.get(key, kind, default)
        if not low <= value <= high:
            self.fail(f"must be between {low} and {high} (got {value})", key)
        return value

    def choice(self, key, choices, default=None, required=False):
        value = self.get(key, str, default, required)
        if key in self.value and value not in choices:
            self.fail(f"must be one of {', '.join(choices)} (got {value!r})", key)
        return value

    def endpoint(self, key, required=True):
        value = self.get(key, str, None, required)
        if value is None:
            return None
        try:
            kind, args, _ = _parseServer(value, None)
        except Exception as e:  # Twisted raises several kinds for a bad description
            self.fail(f"not a Twisted server endpoint description ({e})", key)
        if kind in ("TCP", "SSL") and not 0 <= args[0] <= 65535:
            self.fail(f"not a Twisted server endpoint description (port {args[0]} out of range)", key)
        return value


def load_config(path):
    """Read and validate *path*; raise ConfigError naming the file and key on any problem."""
    source = path
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    return parse_config(data, source, os.path.dirname(os.path.abspath(path)))


def parse_config(data, source="<config>", base_dir="."):
    top = _Node(source, "", data if data is not None else {}).mapping({"Admin", "Secrets", "DBProxies"})
    admin = m.AdminConfig()
    node = top.get("Admin", dict)
    if node is not None:
        node.mapping({"Listen"})
        admin = m.AdminConfig(listen=node.endpoint("Listen", required=False))
    secrets = m.SecretsConfig()
    node = top.get("Secrets", dict)
    if node is not None:
        node.mapping({"Backend", "Path"})
        backend = node.choice("Backend", ("file",), "file")
        path = node.get("Path", str, required=True)
        secrets = m.SecretsConfig(backend=backend, path=os.path.join(base_dir, path))
    proxies = tuple(_proxy(n, base_dir) for n in top.get("DBProxies", list, required=True))
    if not proxies:
        top.fail("must list at least one proxy", "DBProxies")
    names = [p.name for p in proxies]
    for i, p in enumerate(proxies):
        if names.index(p.name) != i:
            top.child("DBProxies", None).child(i, None).fail(f"duplicate DBProxyName {p.name!r}", "DBProxyName")
        if any(p.auth) and not secrets.path:
            top.fail("is required when a proxy uses AuthScheme SECRETS", "Secrets")
    return m.Config(source=source, proxies=proxies, secrets=secrets, admin=admin)


_PROXY_KEYS = {
    "DBProxyName", "EngineFamily", "Listen", "RequireTLS", "IdleClientTimeout", "DebugLogging",
    "Auth", "TargetGroups", "MaxClientConnections", "MaxConnectionRate", "MaxMessageSize",
    "HealthCheckInterval", "TLS", "ClientFirstPacketTimeout", "ClientAuthTimeout", "MaxCancelRate",
    "DatabaseConnectTimeout", "DatabaseOperationTimeout",
}


def _proxy(node, base_dir="."):
    node.mapping(_PROXY_KEYS)
    name = node.get("DBProxyName", str, required=True)
    if not name or not all(c.isalnum() or c == "-" for c in name) or not name[0].isalpha():
        node.fail("must start with a letter and hold only letters, digits and hyphens", "DBProxyName")
    engine = node.choice("EngineFamily", m.ENGINE_FAMILIES, required=True)
    auth = tuple(_auth(n, engine) for n in node.get("Auth", list, required=True))
    if not auth:
        node.fail("must list at least one Auth entry", "Auth")
    groups = node.get("TargetGroups", list, required=True)
    if len(groups) != 1:
        node.fail("must hold exactly one target group (named default)", "TargetGroups")
    tls = _tls(node.get("TLS", dict), base_dir)
    require_tls = node.get("RequireTLS", bool, False)
    if require_tls and tls is None:
        node.fail("true needs TLS (CertificateFile and PrivateKeyFile) to be configured on this proxy",
                  "RequireTLS")
    return m.DBProxy(
        name=name,
        engine_family=engine,
        listen=node.endpoint("Listen"),
        auth=auth,
        target_group=_target_group(groups[0], engine),
        require_tls=require_tls,
        tls=tls,
        idle_client_timeout=node.ranged("IdleClientTimeout", float, 1800.0, 1, 28800),
        debug_logging=node.get("DebugLogging", bool, False),
        max_client_connections=node.ranged("MaxClientConnections", int, 10000, 1, 1000000),
        max_connection_rate=node.ranged("MaxConnectionRate", float, 0.0, 0, 1000000),
        max_message_size=node.ranged("MaxMessageSize", int, 64 * 1024 * 1024, 1024, 1024 ** 3),
        health_check_interval=node.ranged("HealthCheckInterval", float, 5.0, 1, 300),
        client_first_packet_timeout=node.ranged("ClientFirstPacketTimeout", float, 5.0, 0.1, 300),
        client_auth_timeout=node.ranged("ClientAuthTimeout", float, 60.0, 1, 3600),
        max_cancel_rate=node.ranged("MaxCancelRate", float, 100.0, 0, 1000000),
        database_connect_timeout=node.ranged("DatabaseConnectTimeout", float, 30.0, 0.1, 3600),
        database_operation_timeout=node.ranged("DatabaseOperationTimeout", float, 30.0, 0.1, 3600),
    )


def _tls(node, base_dir):
    """`TLS: {CertificateFile, PrivateKeyFile}`: paths relative to the config file's folder; the
    files are loaded once here so a bad certificate or key stops the start."""
    if node is None:
        return None
    node.mapping({"CertificateFile", "PrivateKeyFile"})
    cert = os.path.join(base_dir, node.get("CertificateFile", str, required=True))
    key = os.path.join(base_dir, node.get("PrivateKeyFile", str, required=True))
    from txrdsproxy.tls import TLSFilesError, build_context
    try:
        build_context(cert, key)
    except TLSFilesError as e:
        node.fail(f"{e.path}: {e.message}", "CertificateFile" if e.which == "certificate" else "PrivateKeyFile")
    return m.TLSConfig(certificate_file=cert, private_key_file=key)


def _not_yet(node, key, value, unsupported, why):
    """Refuse a setting this version cannot honour, rather than silently ignore it."""
    if value == unsupported:
        node.fail(f"{value!r} is not supported by this version ({why})", key)
    return value


def _auth(node, engine):
    node.mapping({"AuthScheme", "SecretArn", "IAMAuth", "ClientPasswordAuthType", "Description", "UserName"})
    node.choice("AuthScheme", ("SECRETS",), "SECRETS")
    kind = node.choice("ClientPasswordAuthType", m.CLIENT_AUTH_TYPES[engine], m.DEFAULT_CLIENT_AUTH_TYPE[engine])
    return m.UserAuthConfig(
        secret_arn=node.get("SecretArn", str, required=True),
        iam_auth=_not_yet(node, "IAMAuth", node.choice("IAMAuth", ("DISABLED", "REQUIRED"), "DISABLED"),
                          "REQUIRED", "IAM authentication is not implemented yet"),
        client_password_auth_type=kind,
        description=node.get("Description", str, ""),
    )


def _target_group(node, engine):
    node.mapping({"TargetGroupName", "ConnectionPoolConfig", "Targets"})
    name = node.get("TargetGroupName", str, "default")
    if name != "default":
        node.fail("must be 'default' (a proxy has one target group)", "TargetGroupName")
    pool = m.ConnectionPoolConfig()
    cp = node.get("ConnectionPoolConfig", dict)
    if cp is not None:
        cp.mapping({"MaxConnectionsPercent", "MaxIdleConnectionsPercent", "ConnectionBorrowTimeout",
                    "SessionPinningFilters", "InitQuery"})
        filters = []
        allowed = m.PINNING_FILTERS[engine]
        for f in cp.get("SessionPinningFilters", list, []):
            if f.value not in allowed:
                f.fail(f"unknown filter {f.value!r} for {engine} (allowed: {', '.join(allowed)})")
            filters.append(f.value)
        max_pct = cp.ranged("MaxConnectionsPercent", int, 100, 1, 100)
        idle_pct = cp.ranged("MaxIdleConnectionsPercent", int, max_pct // 2, 0, 100)  # RDS: half
        if idle_pct > max_pct:
            cp.fail(f"must not exceed MaxConnectionsPercent ({max_pct})", "MaxIdleConnectionsPercent")
        pool = m.ConnectionPoolConfig(
            max_connections_percent=max_pct,
            max_idle_connections_percent=idle_pct,
            connection_borrow_timeout=cp.ranged("ConnectionBorrowTimeout", float, 120.0, 0, 3600),
            session_pinning_filters=tuple(filters),
            init_query=cp.get("InitQuery", str, ""),
        )
    targets = []
    for t in node.get("Targets", list, required=True):
        t.mapping({"RdsResourceId", "Endpoint", "Port", "Role"})
        targets.append(m.DBProxyTarget(
            rds_resource_id=t.get("RdsResourceId", str, required=True),
            endpoint=t.get("Endpoint", str, required=True),
            port=t.ranged("Port", int, None, 1, 65535) if t.value.get("Port") is not None
            else t.fail("is required", "Port"),
            role=t.choice("Role", ("READ_WRITE", "READ_ONLY"), ""),
        ))
    if not targets:
        node.fail("must list at least one target", "Targets")
    return m.DBProxyTargetGroup(name=name, connection_pool_config=pool, targets=tuple(targets))
