"""What the API says about a running proxy: the RDS API's DBProxy, DBProxyTargetGroup and
DBProxyTarget shapes as dicts, read from the registry at request time.

Member names are the RDS model's (admin/querycodec.py writes them by walking botocore's shapes
and refuses a name the model does not have, so these cannot drift unnoticed).  Secret values
never appear: Auth lists the secrets' ARNs and settings only.
"""

import hashlib

DEFAULT_TARGET_GROUP = "default"
DEFAULT_REGION = "us-east-1"
DEFAULT_ACCOUNT = "000000000000"


class Arns:
    """ARNs in the configured region and account (the IAM section's; else us-east-1 and
    000000000000), with the proxy's resource id (DBProxyResourceId, or one derived from its
    name the way auth/iam.py derives it, so policies and tokens name the same proxy)."""

    def __init__(self, config=None):
        iam = getattr(config, "iam", None)
        self.region = getattr(iam, "region", None) or DEFAULT_REGION
        self.account = getattr(iam, "account_id", None) or DEFAULT_ACCOUNT

    @staticmethod
    def resource_id(proxy):
        configured = getattr(proxy, "resource_id", "")
        if configured:
            return configured
        return "prx-" + hashlib.sha256(f"txrdsproxy:db-proxy:{proxy.name}".encode()).hexdigest()[:17]

    def proxy(self, proxy):
        return f"arn:aws:rds:{self.region}:{self.account}:db-proxy:{self.resource_id(proxy)}"

    def any_proxy(self):
        return f"arn:aws:rds:{self.region}:{self.account}:db-proxy:*"

    def target_group(self, proxy):
        digest = hashlib.sha256(f"{self.resource_id(proxy)}/{proxy.target_group.name}".encode())
        return f"arn:aws:rds:{self.region}:{self.account}:target-group:prx-tg-{digest.hexdigest()[:17]}"

    def proxy_endpoint(self, proxy, endpoint_name):
        """An extra endpoint's ARN (db-proxy-endpoint:prx-endpoint-<17 hex>), stable for the
        proxy's resource id and the endpoint's name."""
        digest = hashlib.sha256(f"{self.resource_id(proxy)}/endpoint/{endpoint_name}".encode())
        return (f"arn:aws:rds:{self.region}:{self.account}:db-proxy-endpoint:"
                f"prx-endpoint-{digest.hexdigest()[:17]}")

    def any_proxy_endpoint(self):
        return f"arn:aws:rds:{self.region}:{self.account}:db-proxy-endpoint:*"

    def target(self, target):
        return f"arn:aws:rds:{self.region}:{self.account}:db:{target.rds_resource_id}"


def _int(value):
    return int(round(float(value)))


def endpoint_address(config, port):
    """The Endpoint a client connects to: the configured host name (the proxy's `Endpoint`) or
    the listening address, with the port.  The RDS shapes have no Port member and RDS's
    proxies listen on the engine's default port; ours listen where configured, so the port is
    part of the string ("host:port"), or None while not listening."""
    if port is None:
        return None
    addr = port.getHost()
    number = getattr(addr, "port", None)
    host = getattr(config, "endpoint", "") or getattr(addr, "host", None) or getattr(addr, "name", None)
    if host is None:
        return None
    host = str(host)
    if number is None:
        return host
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


def db_proxy(runtime, arns):
    """-> the DBProxy shape of one ProxyRuntime."""
    config = runtime.config
    out = {
        "DBProxyName": config.name,
        "DBProxyArn": arns.proxy(config),
        "Status": runtime.status.value,
        "EngineFamily": config.engine_family,
        "VpcSecurityGroupIds": list(config.vpc_security_group_ids),
        "VpcSubnetIds": list(config.vpc_subnet_ids),
        "Auth": [_auth(a) for a in config.auth],
        "RoleArn": config.role_arn or None,
        "Endpoint": endpoint_address(config, runtime.port),
        "RequireTLS": config.require_tls,
        "IdleClientTimeout": _int(config.idle_client_timeout),
        "DebugLogging": config.debug_logging,
        "CreatedDate": runtime.created,
        "UpdatedDate": runtime.updated,
    }
    return {k: v for k, v in out.items() if v is not None}


def db_proxy_endpoints(runtime, arns):
    """-> the DBProxyEndpoint shapes of one proxy: its default endpoint (its own Listen,
    IsDefault, READ_WRITE, named "default") and each of its `Endpoints`."""
    config = runtime.config
    out = [{
        "DBProxyEndpointName": "default",
        "DBProxyEndpointArn": arns.proxy_endpoint(config, "default"),
        "DBProxyName": config.name,
        "Status": runtime.status.value,
        "VpcSecurityGroupIds": list(config.vpc_security_group_ids),
        "VpcSubnetIds": list(config.vpc_subnet_ids),
        "Endpoint": endpoint_address(config, runtime.port),
        "CreatedDate": runtime.created,
        "TargetRole": "READ_WRITE",
        "IsDefault": True,
    }]
    for endpoint in getattr(runtime, "endpoints", ()):
        out.append({
            "DBProxyEndpointName": endpoint.name,
            "DBProxyEndpointArn": arns.proxy_endpoint(config, endpoint.name),
            "DBProxyName": config.name,
            "Status": endpoint.status,
            "VpcSecurityGroupIds": list(endpoint.config.vpc_security_group_ids),
            "VpcSubnetIds": list(endpoint.config.vpc_subnet_ids),
            "Endpoint": endpoint_address(config, endpoint.port),
            "CreatedDate": endpoint.created,
            "TargetRole": endpoint.config.target_role,
            "IsDefault": False,
        })
    return [{k: v for k, v in item.items() if v is not None} for item in out]


def _auth(entry):
    out = {
        "Description": entry.description or None,
        "AuthScheme": entry.auth_scheme,
        "SecretArn": entry.secret_arn,
        "IAMAuth": entry.iam_auth,
        "ClientPasswordAuthType": entry.client_password_auth_type or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def db_proxy_target_group(runtime, arns):
    config = runtime.config
    group = config.target_group
    pool = group.connection_pool_config
    return {
        "DBProxyName": config.name,
        "TargetGroupName": group.name,
        "TargetGroupArn": arns.target_group(config),
        "IsDefault": group.name == DEFAULT_TARGET_GROUP,
        "Status": runtime.status.value,
        "ConnectionPoolConfig": {
            "MaxConnectionsPercent": pool.max_connections_percent,
            "MaxIdleConnectionsPercent": pool.max_idle_connections_percent,
            "ConnectionBorrowTimeout": _int(pool.connection_borrow_timeout),
            "SessionPinningFilters": list(pool.session_pinning_filters),
            "InitQuery": pool.init_query,
        },
        "CreatedDate": runtime.created,
        "UpdatedDate": runtime.updated,
    }


def target_health(ctx, target):
    health = getattr(ctx, "health", None)
    if health is None:
        return {"State": "REGISTERING"}
    record = health.health_of(target)
    out = {"State": record.state}
    if record.reason is not None:
        out["Reason"] = record.reason
    if record.description is not None:
        out["Description"] = record.description
    return out


def db_proxy_targets(runtime, arns):
    ctx = runtime.ctx
    return [{
        "TargetArn": arns.target(target),
        "Endpoint": target.endpoint,
        "RdsResourceId": target.rds_resource_id,
        "Port": target.port,
        "Type": "RDS_INSTANCE",
        "Role": ctx.topology.role_of(target),
        "TargetHealth": target_health(ctx, target),
    } for target in runtime.config.target_group.targets]
