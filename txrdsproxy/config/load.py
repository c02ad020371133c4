"""YAML -> `Config`, validated once, with errors that name the file and the key path.

Every problem is reported as ``ConfigError("etc/x.yaml: DBProxies[0].Listen: ...")`` so that
`twistd rdsproxy --check-config` and a failing start tell the operator exactly what to fix.
"""

import os
import re

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
    top = _Node(source, "", data if data is not None else {}).mapping(
        {"Admin", "Secrets", "DBProxies", "IAM", "DBInstances", "DrainTimeout", "Workers",
         "StateDirectory"})
    admin = m.AdminConfig()
    node = top.get("Admin", dict)
    if node is not None:
        node.mapping({"Listen", "AllowUnauthenticatedLoopbackReads", "DefaultListen"})
        admin = m.AdminConfig(
            listen=node.endpoint("Listen", required=False),
            allow_unauthenticated_loopback_reads=node.get("AllowUnauthenticatedLoopbackReads", bool, False),
            default_listen=node.endpoint("DefaultListen", required=False) or m.AdminConfig.default_listen)
    secrets = _secrets(top.get("Secrets", dict), base_dir)
    iam = _iam(top.get("IAM", dict))
    # `DBProxies: []` is valid: proxies may be created through the API.
    proxies = tuple(_proxy(n, base_dir) for n in top.get("DBProxies", list, required=True))
    names = [p.name for p in proxies]
    endpoint_names = set()  # DBProxyEndpointName is unique over every proxy, as in RDS
    for i, p in enumerate(proxies):
        if names.index(p.name) != i:
            top.child("DBProxies", None).child(i, None).fail(f"duplicate DBProxyName {p.name!r}", "DBProxyName")
        if any(p.auth) and not (secrets.path or secrets.backend == "aws"):
            top.fail("is required when a proxy uses AuthScheme SECRETS", "Secrets")
        for endpoint in p.endpoints:
            if endpoint.name in names or endpoint.name in endpoint_names:
                top.child("DBProxies", None).child(i, None).fail(
                    f"DBProxyEndpointName {endpoint.name!r} is taken by another proxy or endpoint",
                    "Endpoints")
            endpoint_names.add(endpoint.name)
        if any(a.iam_auth == "REQUIRED" for a in p.auth) and not iam.principals:
            top.fail(f"must list Principals when a proxy ({p.name}) has IAMAuth REQUIRED", "IAM")
    return m.Config(source=source, proxies=proxies, secrets=secrets, admin=admin, iam=iam,
                    db_instances=_db_instances(top.get("DBInstances", list, [])),
                    drain_timeout=top.ranged("DrainTimeout", float, 30.0, 0, 3600),
                    workers=_workers(top, proxies),
                    state_directory=_state_directory(top, base_dir))


def _state_directory(top, base_dir):
    """`StateDirectory` (ours): where the failover monitor keeps its fencing decisions
    (failover/fencing.py), relative to the file's folder.  Absent: "" (the folder of the
    configuration file, when there is one: service.state_directory)."""
    value = top.get("StateDirectory", str, "")
    if value == "" and "StateDirectory" in top.value:
        top.fail("must not be empty (leave it out for the configuration file's folder)", "StateDirectory")
    return os.path.join(base_dir, value) if value else ""


MAX_WORKERS = 64


def _workers(top, proxies):
    """`Workers: N | auto` (default 1): how many worker processes serve the proxies (see
    txrdsproxy/workers/).  `auto` is the number of CPU cores this process may run on.  With more
    than one, every Listen must be a TCP endpoint: the workers share each port (SO_REUSEPORT)."""
    value = top.value.get("Workers", 1)
    if value == "auto":
        value = max(1, min(MAX_WORKERS, _cpu_count()))
    elif isinstance(value, bool) or not isinstance(value, int):
        top.fail("must be an integer or auto", "Workers")
    if not 1 <= value <= MAX_WORKERS:
        top.fail(f"must be between 1 and {MAX_WORKERS} (got {value})", "Workers")
    if value > 1:
        for i, p in enumerate(proxies):
            if p.listen.split(":", 1)[0].strip().lower() not in ("tcp", "tcp6"):
                top.child("DBProxies", None).child(i, None).fail(
                    "must be a tcp: or tcp6: endpoint when Workers is more than 1", "Listen")
    return value


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _secrets(node, base_dir):
    """`Secrets: {Backend: file, Path}` or `{Backend: aws, Region, EndpointUrl, RefreshInterval}`."""
    if node is None:
        return m.SecretsConfig()
    node.mapping({"Backend", "Path", "Region", "EndpointUrl", "RefreshInterval"})
    backend = node.choice("Backend", ("file", "aws"), "file")
    if backend == "file":
        for key in ("Region", "EndpointUrl", "RefreshInterval"):
            if key in node.value:
                node.fail("applies to Backend aws only", key)
        path = node.get("Path", str, required=True)
        return m.SecretsConfig(backend=backend, path=os.path.join(base_dir, path))
    if "Path" in node.value:
        node.fail("applies to Backend file only", "Path")
    endpoint_url = node.get("EndpointUrl", str, "")
    if endpoint_url and not endpoint_url.startswith(("http://", "https://")):
        node.fail("must be an http:// or https:// URL", "EndpointUrl")
    return m.SecretsConfig(
        backend=backend,
        region=node.get("Region", str, required=True),
        endpoint_url=endpoint_url,
        refresh_interval=node.ranged("RefreshInterval", float, 300.0, 1, 86400),
    )


def _iam(node):
    """`IAM: {Region, AccountId, MaxConcurrentAuthentications, Principals: [...]}`: policies are
    parsed (and refused when malformed or using what the evaluator does not support) here."""
    if node is None:
        return m.IAMConfig()
    from txrdsproxy.auth.policy import PolicyError, parse_policy
    node.mapping({"Region", "AccountId", "Principals", "MaxConcurrentAuthentications"})
    account = node.get("AccountId", str, "000000000000")
    if not (len(account) == 12 and account.isdigit()):
        node.fail("must be 12 digits (quote it in YAML)", "AccountId")
    principals = []
    seen_keys = {}
    for p in node.get("Principals", list, []):
        p.mapping({"Arn", "AccessKeys", "Policies"})
        arn = p.get("Arn", str, required=True)
        if not arn.startswith("arn:") or ":iam::" not in arn:
            p.fail("must be an IAM principal ARN (arn:aws:iam::<account>:user/... or role/...)", "Arn")
        keys = []
        for k in p.get("AccessKeys", list, []):
            k.mapping({"AccessKeyId", "SecretArn"})
            akid = k.get("AccessKeyId", str, required=True)
            if not (16 <= len(akid) <= 128 and akid.isalnum()):
                k.fail("must be 16 to 128 letters and digits", "AccessKeyId")
            if akid in seen_keys:
                k.fail(f"already belongs to {seen_keys[akid]}", "AccessKeyId")
            seen_keys[akid] = arn
            keys.append(m.IAMAccessKey(access_key_id=akid, secret_arn=k.get("SecretArn", str, required=True)))
        policies = []
        for doc in p.get("Policies", list, []):
            try:
                policies.append(parse_policy(doc.value, "policy"))
            except PolicyError as e:
                doc.fail(str(e))
        principals.append(m.IAMPrincipal(arn=arn, access_keys=tuple(keys), policies=tuple(policies)))
    return m.IAMConfig(
        region=node.get("Region", str, "us-east-1"),
        account_id=account,
        principals=tuple(principals),
        max_concurrent_authentications=node.ranged("MaxConcurrentAuthentications", int, 256, 1, 100000),
    )


def _db_instances(nodes):
    """`DBInstances: [{DBInstanceIdentifier, Endpoint, Port}]`: what RegisterDBProxyTargets may
    name (the instances RDS would know)."""
    out, seen = [], set()
    for n in nodes:
        n.mapping({"DBInstanceIdentifier", "Endpoint", "Port"})
        ident = n.get("DBInstanceIdentifier", str, required=True)
        if ident in seen:
            n.fail(f"duplicate DBInstanceIdentifier {ident!r}", "DBInstanceIdentifier")
        seen.add(ident)
        if n.value.get("Port") is None:
            n.fail("is required", "Port")
        out.append(m.DBInstance(identifier=ident, endpoint=n.get("Endpoint", str, required=True),
                                port=n.ranged("Port", int, None, 1, 65535)))
    return tuple(out)



_PROXY_KEYS = {
    "DBProxyName", "EngineFamily", "Listen", "RequireTLS", "IdleClientTimeout", "DebugLogging",
    "Auth", "TargetGroups", "MaxClientConnections", "MaxConnectionRate", "MaxMessageSize",
    "HealthCheckInterval", "HealthCheck", "TLS", "ClientFirstPacketTimeout", "ClientAuthTimeout", "MaxCancelRate",
    "DatabaseConnectTimeout", "DatabaseOperationTimeout", "DatabaseTLS", "DBProxyResourceId", "Endpoint",
    "RoleArn", "VpcSubnetIds", "VpcSecurityGroupIds", "Endpoints", "MaxReplicaLag",
    "MaxSessionReplaySize",
}
_ENDPOINT_KEYS = {"DBProxyEndpointName", "TargetRole", "Listen", "FallbackToWriter",
                  "VpcSubnetIds", "VpcSecurityGroupIds"}


def _name_ok(name):
    """RDS identifiers: a letter first, letters, digits and hyphens, no trailing or double hyphen."""
    return (bool(name) and name[0].isalpha() and all(c.isalnum() or c == "-" for c in name)
            and not name.endswith("-") and "--" not in name)


def _endpoints(node, listen):
    """`Endpoints: [{DBProxyEndpointName, TargetRole, Listen, FallbackToWriter}]`."""
    out, names = [], set()
    addresses = {listen}
    for n in node.get("Endpoints", list, []):
        n.mapping(_ENDPOINT_KEYS)
        name = n.get("DBProxyEndpointName", str, required=True)
        if not _name_ok(name):
            n.fail("must start with a letter and hold only letters, digits and single hyphens,"
                   " not ending with one", "DBProxyEndpointName")
        if name in names:
            n.fail(f"duplicate DBProxyEndpointName {name!r}", "DBProxyEndpointName")
        if name == m.DEFAULT_ENDPOINT_NAME:
            n.fail(f"{name!r} names the proxy's own Listen (its default endpoint)", "DBProxyEndpointName")
        names.add(name)
        role = n.choice("TargetRole", m.ENDPOINT_TARGET_ROLES, m.READ_WRITE)
        address = n.endpoint("Listen")
        if address in addresses and not re.match(r"^(tcp6?|ssl):0(:|$)", address):
            n.fail(f"{address!r} is already the Listen of this proxy or another of its endpoints",
                   "Listen")
        addresses.add(address)
        fallback = n.get("FallbackToWriter", bool, False)
        if fallback and role != m.READ_ONLY:
            n.fail("applies to TargetRole READ_ONLY only", "FallbackToWriter")
        out.append(m.DBProxyEndpoint(name=name, listen=address, target_role=role,
                                     fallback_to_writer=fallback,
                                     vpc_subnet_ids=_strings(n, "VpcSubnetIds"),
                                     vpc_security_group_ids=_strings(n, "VpcSecurityGroupIds")))
    return tuple(out)


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
    if tls is None and any(a.iam_auth == "REQUIRED" for a in auth):
        node.fail("IAMAuth REQUIRED needs TLS (CertificateFile and PrivateKeyFile) on this proxy: "
                  "IAM authentication is allowed only with SSL connections", "TLS")
    from txrdsproxy.auth.iam import RESOURCE_ID_RE, proxy_resource_id
    resource_id = node.get("DBProxyResourceId", str, "")
    if resource_id and not RESOURCE_ID_RE.match(resource_id):
        node.fail("must be prx- followed by 17 lowercase hexadecimal characters", "DBProxyResourceId")
    listen = node.endpoint("Listen")
    return m.DBProxy(
        name=name,
        engine_family=engine,
        listen=listen,
        endpoints=_endpoints(node, listen),
        max_replica_lag=node.ranged("MaxReplicaLag", float, 0.0, 0, 86400),
        max_session_replay_size=node.ranged("MaxSessionReplaySize", int, 65536, 0, 16 * 1024 * 1024),
        auth=auth,
        target_group=_target_group(groups[0], engine),
        require_tls=require_tls,
        tls=tls,
        database_tls=_database_tls(node.get("DatabaseTLS", dict), base_dir, engine),
        resource_id=proxy_resource_id(name, resource_id),
        endpoint=node.get("Endpoint", str, ""),
        idle_client_timeout=node.ranged("IdleClientTimeout", float, 1800.0, 1, 28800),
        debug_logging=node.get("DebugLogging", bool, False),
        max_client_connections=node.ranged("MaxClientConnections", int, 10000, 1, 1000000),
        max_connection_rate=node.ranged("MaxConnectionRate", float, 0.0, 0, 1000000),
        max_message_size=node.ranged("MaxMessageSize", int, 64 * 1024 * 1024, 1024, 1024 ** 3),
        health_check_interval=node.ranged("HealthCheckInterval", float, 5.0, 1, 300),
        health_check=_health_check(node.get("HealthCheck", dict), engine, proxy_level=True)
        or m.HealthCheckConfig(),
        client_first_packet_timeout=node.ranged("ClientFirstPacketTimeout", float, 5.0, 0.1, 300),
        client_auth_timeout=node.ranged("ClientAuthTimeout", float, 60.0, 1, 3600),
        max_cancel_rate=node.ranged("MaxCancelRate", float, 100.0, 0, 1000000),
        database_connect_timeout=node.ranged("DatabaseConnectTimeout", float, 30.0, 0.1, 3600),
        database_operation_timeout=node.ranged("DatabaseOperationTimeout", float, 30.0, 0.1, 3600),
        role_arn=node.get("RoleArn", str, ""),
        vpc_subnet_ids=_strings(node, "VpcSubnetIds"),
        vpc_security_group_ids=_strings(node, "VpcSecurityGroupIds"),
    )


def _strings(node, key):
    out = []
    for item in node.get(key, list, []):
        if not isinstance(item.value, str):
            item.fail("must be a string")
        out.append(item.value)
    return tuple(out)


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


def _database_tls(node, base_dir, engine):
    """`DatabaseTLS: {Mode, CAFile, AllowCleartextPassword, ServerPublicKeyFile}`."""
    if node is None:
        return m.DatabaseTLSConfig()
    node.mapping({"Mode", "CAFile", "AllowCleartextPassword", "ServerPublicKeyFile"})
    mode = node.choice("Mode", m.DB_TLS_MODES, "follow-client")
    ca = node.get("CAFile", str, "")
    if ca:
        ca = os.path.join(base_dir, ca)
        from txrdsproxy.backend_tls import TLSFilesError, load_ca_file
        try:
            load_ca_file(ca)
        except TLSFilesError as e:
            node.fail(f"{e.path}: {e.message}", "CAFile")
    key = node.get("ServerPublicKeyFile", str, "")
    if key:
        if engine != m.ENGINE_MYSQL:
            node.fail("applies to MYSQL proxies only", "ServerPublicKeyFile")
        key = os.path.join(base_dir, key)
        try:
            with open(key, "rb") as f:
                pem = f.read()
        except OSError as e:
            node.fail(f"{key}: cannot read: {e.strerror}", "ServerPublicKeyFile")
        if b"-----BEGIN PUBLIC KEY-----" not in pem:
            node.fail(f"{key}: not a PEM public key", "ServerPublicKeyFile")
    return m.DatabaseTLSConfig(
        mode=mode, ca_file=ca,
        allow_cleartext_password=node.get("AllowCleartextPassword", bool, False),
        server_public_key_file=key,
    )


def _auth(node, engine):
    node.mapping({"AuthScheme", "SecretArn", "IAMAuth", "ClientPasswordAuthType", "Description", "UserName"})
    node.choice("AuthScheme", ("SECRETS",), "SECRETS")
    kind = node.choice("ClientPasswordAuthType", m.CLIENT_AUTH_TYPES[engine], m.DEFAULT_CLIENT_AUTH_TYPE[engine])
    return m.UserAuthConfig(
        secret_arn=node.get("SecretArn", str, required=True),
        iam_auth=node.choice("IAMAuth", ("DISABLED", "REQUIRED"), "DISABLED"),
        client_password_auth_type=kind,
        description=node.get("Description", str, ""),
    )


def _health_check(node, engine, proxy_level=False):
    """`HealthCheck: {SecretArn | UserName, Database, Retries}` (Retries on the proxy only)."""
    if node is None:
        return None
    keys = {"SecretArn", "UserName", "Database"} | ({"Retries"} if proxy_level else set())
    node.mapping(keys)
    arn = node.get("SecretArn", str, "")
    user = node.get("UserName", str, "")
    if arn and user:
        node.fail("give SecretArn or UserName, not both", "UserName")
    if arn and not arn.startswith("arn:"):
        node.fail("must be a secret's ARN (arn:...)", "SecretArn")
    database = node.get("Database", str, "")
    if database and engine != m.ENGINE_POSTGRESQL:
        node.fail("applies to POSTGRESQL proxies only (MySQL health checks use no database)", "Database")
    return m.HealthCheckConfig(secret_arn=arn, user_name=user, database=database,
                               retries=node.ranged("Retries", int, 2, 0, 10) if proxy_level else 2)


def _target_group(node, engine):
    node.mapping({"TargetGroupName", "ConnectionPoolConfig", "Targets"})
    name = node.get("TargetGroupName", str, "default")
    # One target group per proxy, as in RDS Proxy; it is named `default` unless renamed
    # (ModifyDBProxyTargetGroup NewName).
    if not name or not all(c.isalnum() or c == "-" for c in name) or not name[0].isalpha():
        node.fail("must start with a letter and hold only letters, digits and hyphens", "TargetGroupName")
    pool = m.ConnectionPoolConfig()
    cp = node.get("ConnectionPoolConfig", dict)
    if cp is not None:
        cp.mapping({"MaxConnectionsPercent", "MaxIdleConnectionsPercent", "ConnectionBorrowTimeout",
                    "SessionPinningFilters", "InitQuery", "IdleConnectionTimeout"})
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
            idle_connection_timeout=cp.ranged("IdleConnectionTimeout", float, 60.0, 0.1, 86400),
            session_pinning_filters=tuple(filters),
            init_query=cp.get("InitQuery", str, ""),
        )
    targets = []
    for t in node.get("Targets", list, []):
        t.mapping({"RdsResourceId", "Endpoint", "Port", "Role", "HealthCheck"})
        targets.append(m.DBProxyTarget(
            health_check=_health_check(t.get("HealthCheck", dict), engine),
            rds_resource_id=t.get("RdsResourceId", str, required=True),
            endpoint=t.get("Endpoint", str, required=True),
            port=t.ranged("Port", int, None, 1, 65535) if t.value.get("Port") is not None
            else t.fail("is required", "Port"),
            role=t.choice("Role", ("READ_WRITE", "READ_ONLY"), ""),
        ))
    # An empty target group is valid (a proxy created through the API has one until
    # RegisterDBProxyTargets); its logins wait for a target, up to ConnectionBorrowTimeout.
    return m.DBProxyTargetGroup(name=name, connection_pool_config=pool, targets=tuple(targets))
