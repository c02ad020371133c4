"""The read-only management API under /v1/, shaped like the RDS API's describe-* operations.

    GET /v1/db-proxies[?DBProxyName=x]                                -> {"DBProxies": [DBProxy]}
    GET /v1/db-proxy-target-groups?DBProxyName=x[&TargetGroupName=default]
                                                                      -> {"TargetGroups": [...]}
    GET /v1/db-proxy-targets?DBProxyName=x[&TargetGroupName=default]  -> {"Targets": [...]}

Field names and values follow the RDS API's DBProxy, DBProxyTargetGroup and DBProxyTarget
shapes, so `rdsproxy describe-...` reads like `aws rds describe-...`.  Our additions are the
DBProxy's "Port" and a "txrdsproxy" object of live pool figures, read from the sessions' and
connections' own states at request time.  Errors have an RDS-style body:
{"Error": {"Code": ..., "Message": ..., "Type": "Sender"}} with 400 or 404.
Secret values never appear: Auth lists only the secrets' ARNs and settings.
"""

import collections
import json

from twisted.web import resource

REGION = "local"
ACCOUNT = "000000000000"
DEFAULT_TARGET_GROUP = "default"


def proxy_arn(name):
    return f"arn:aws:rds:{REGION}:{ACCOUNT}:db-proxy:{name}"


def target_group_arn(proxy_name, group=DEFAULT_TARGET_GROUP):
    return f"arn:aws:rds:{REGION}:{ACCOUNT}:target-group:{proxy_name}-{group}"


def target_arn(target):
    return f"arn:aws:rds:{REGION}:{ACCOUNT}:db:{target.rds_resource_id}"


class ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self):
        return {"Error": {"Code": self.code, "Message": self.message, "Type": "Sender"}}


def _number(value):
    """1800.0 -> 1800 (the RDS API's integers), 0.5 stays 0.5."""
    return int(value) if float(value).is_integer() else value


# -- the shapes ------------------------------------------------------------------------------

def _status(svc):
    return "available" if svc.port is not None else "creating"


def _live_figures(ctx):
    sessions = list(ctx.sessions)
    conns = ctx.pool.connections()
    states = collections.Counter(c.state for c in conns)
    pinned = [s for s in sessions if s.state.value == "pinned"]
    reasons = collections.Counter(
        getattr(s.pin_reason, "value", s.pin_reason) for s in pinned
        if getattr(s, "pin_reason", None) is not None)
    return {
        "ClientConnections": len(sessions),
        "DatabaseConnections": len(conns),
        "DatabaseConnectionStates": dict(sorted(states.items())),
        "Borrowed": states.get("borrowed", 0),
        "Pinned": len(pinned),
        "PinReasons": dict(sorted(reasons.items())),
        "Waiting": ctx.pool.waiting,
        "MaxDatabaseConnectionsAllowed": ctx.pool.max_connections,
        "DatabaseMaxConnections": ctx.pool.db_max_connections,
    }


def db_proxy(svc):
    """-> the DBProxy shape of one ProxyService."""
    ctx = svc.ctx
    config = ctx.config
    endpoint = port = None
    if svc.port is not None:
        addr = svc.port.getHost()
        endpoint = getattr(addr, "host", None) or getattr(addr, "name", None)
        port = getattr(addr, "port", None)
    return {
        "DBProxyName": config.name,
        "DBProxyArn": proxy_arn(config.name),
        "Status": _status(svc),
        "EngineFamily": config.engine_family,
        "Auth": [{
            "Description": a.description,
            "AuthScheme": a.auth_scheme,
            "SecretArn": a.secret_arn,
            "IAMAuth": a.iam_auth,
            "ClientPasswordAuthType": a.client_password_auth_type,
        } for a in config.auth],
        "Endpoint": endpoint,
        "Port": port,
        "RequireTLS": config.require_tls,
        "IdleClientTimeout": _number(config.idle_client_timeout),
        "DebugLogging": config.debug_logging,
        "txrdsproxy": _live_figures(ctx),
    }


def db_proxy_target_group(svc):
    config = svc.ctx.config
    group = config.target_group
    pool = group.connection_pool_config
    return {
        "DBProxyName": config.name,
        "TargetGroupName": group.name,
        "TargetGroupArn": target_group_arn(config.name, group.name),
        "IsDefault": group.name == DEFAULT_TARGET_GROUP,
        "Status": _status(svc),
        "ConnectionPoolConfig": {
            "MaxConnectionsPercent": pool.max_connections_percent,
            "MaxIdleConnectionsPercent": pool.max_idle_connections_percent,
            "ConnectionBorrowTimeout": _number(pool.connection_borrow_timeout),
            "SessionPinningFilters": list(pool.session_pinning_filters),
            "InitQuery": pool.init_query,
        },
    }


def _target_health(ctx, target):
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


def db_proxy_targets(svc):
    ctx = svc.ctx
    per_target = collections.Counter(
        getattr(c, "target", None) for c in ctx.pool.connections())
    out = []
    for target in ctx.config.target_group.targets:
        out.append({
            "TargetArn": target_arn(target),
            "Endpoint": target.endpoint,
            "RdsResourceId": target.rds_resource_id,
            "Port": target.port,
            "Type": "RDS_INSTANCE",
            "Role": ctx.topology.role_of(target),
            "TargetHealth": _target_health(ctx, target),
            "txrdsproxy": {"DatabaseConnections": per_target.get(target, 0)},
        })
    return out


# -- the operations --------------------------------------------------------------------------

class Api:
    """The three describe operations over a list of ProxyServices (each has .ctx and .port)."""

    def __init__(self, services):
        self.services = services

    def _find(self, name):
        for svc in self.services:
            if svc.ctx.config.name == name:
                return svc
        raise ApiError(404, "DBProxyNotFoundFault", f"No proxy named {name!r} is configured.")

    def _group(self, params):
        svc = self._find(params["DBProxyName"])
        group = params.get("TargetGroupName")
        if group is not None and group != svc.ctx.config.target_group.name:
            raise ApiError(404, "DBProxyTargetGroupNotFoundFault",
                           f"Proxy {svc.ctx.config.name!r} has no target group named {group!r}"
                           f" (its only target group is {DEFAULT_TARGET_GROUP!r}).")
        return svc

    def describe_db_proxies(self, params):
        name = params.get("DBProxyName")
        services = [self._find(name)] if name is not None else self.services
        return {"DBProxies": [db_proxy(s) for s in services]}

    def describe_db_proxy_target_groups(self, params):
        return {"TargetGroups": [db_proxy_target_group(self._group(params))]}

    def describe_db_proxy_targets(self, params):
        return {"Targets": db_proxy_targets(self._group(params))}


# (path, method name, required parameters, optional parameters)
OPERATIONS = (
    (b"db-proxies", "describe_db_proxies", (), ("DBProxyName",)),
    (b"db-proxy-target-groups", "describe_db_proxy_target_groups", ("DBProxyName",),
     ("TargetGroupName",)),
    (b"db-proxy-targets", "describe_db_proxy_targets", ("DBProxyName",), ("TargetGroupName",)),
)


def parse_params(args, required, optional):
    """request.args ({bytes: [bytes]}) -> {str: str}; ApiError(400) for anything unexpected."""
    params = {}
    for raw_key, values in args.items():
        try:
            key = raw_key.decode("utf-8")
            decoded = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise ApiError(400, "InvalidParameterValue", "Parameters must be UTF-8.") from None
        if key not in required and key not in optional:
            raise ApiError(400, "InvalidParameterValue", f"Unknown parameter {key!r}.")
        if len(decoded) != 1:
            raise ApiError(400, "InvalidParameterValue", f"Parameter {key!r} is given more than once.")
        if not decoded[0]:
            raise ApiError(400, "InvalidParameterValue", f"Parameter {key!r} must not be empty.")
        params[key] = decoded[0]
    for key in required:
        if key not in params:
            raise ApiError(400, "MissingParameter", f"The parameter {key} is required.")
    return params


def _send(request, status, body):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode() + b"\n"


class OperationResource(resource.Resource):
    """One describe operation; GET only (other methods get 405 from twisted.web)."""

    isLeaf = True

    def __init__(self, api, method, required, optional):
        super().__init__()
        self.api, self.method, self.required, self.optional = api, method, required, optional

    def render_GET(self, request):
        if request.postpath not in ([], [b""]):
            return _send(request, 404, ApiError(404, "UnknownOperation", "No such resource.").body())
        try:
            params = parse_params(request.args, self.required, self.optional)
            return _send(request, 200, getattr(self.api, self.method)(params))
        except ApiError as e:
            return _send(request, e.status, e.body())


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request):
        names = ", ".join("/v1/" + path.decode() for path, *_ in OPERATIONS)
        return _send(request, 404, ApiError(
            404, "UnknownOperation", f"No such operation; this API serves {names}.").body())


class ApiRoot(resource.Resource):
    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)


def api_root(services):
    """-> the /v1 resource for *services* (a list of ProxyService)."""
    api = Api(services)
    root = ApiRoot()
    for path, method, required, optional in OPERATIONS:
        root.putChild(path, OperationResource(api, method, required, optional))
    return root
