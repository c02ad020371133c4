"""The RDS API's DB proxy operations over the running registry (through control.ProxyControl).

Each operation takes the decoded input (member names of botocore's input shape) and returns the
output as a dict of the output shape; refusals raise QueryError with the RDS fault code, whose
HTTP status comes from the model.  `resources(action, params)` names the ARNs a request acts on,
for the IAM policy check.  What each change does to open sessions: runtime.ProxyRuntime.apply
and docs/operations.md.
"""

import base64
import fnmatch

from txrdsproxy.admin import shapes
from txrdsproxy.admin.endpoint_operations import (
    ENDPOINT_FAULTS, ENDPOINT_READ_ACTIONS, ENDPOINT_WRITE_ACTIONS, EndpointOperations)
from txrdsproxy.admin.querycodec import QueryError, error_status
from txrdsproxy.config.load import ConfigError
from txrdsproxy.config.store import ConfigConflict
from txrdsproxy.control import find_group, find_proxy, proxy_path
from txrdsproxy.runtime import (
    InvalidChange, InvalidProxyState, ListenFailed, ProxyAlreadyExists, ProxyNotFound,
    RegistryError, TargetAlreadyRegistered, TargetGroupNotFound, TargetNotFound)

READ_ACTIONS = ("DescribeDBProxies", "DescribeDBProxyTargetGroups", "DescribeDBProxyTargets",
                "DescribeDBProxySessions") + ENDPOINT_READ_ACTIONS  # Sessions: ours (admin/extensions.py)
WRITE_ACTIONS = ("CreateDBProxy", "ModifyDBProxy", "DeleteDBProxy", "ModifyDBProxyTargetGroup",
                 "RegisterDBProxyTargets", "DeregisterDBProxyTargets") + ENDPOINT_WRITE_ACTIONS
ACTIONS = READ_ACTIONS + WRITE_ACTIONS
LISTEN_TAG = "txrdsproxy:Listen"

_FAULTS = ENDPOINT_FAULTS + [
    (ProxyNotFound, "DBProxyNotFoundFault"),
    (ProxyAlreadyExists, "DBProxyAlreadyExistsFault"),
    (TargetGroupNotFound, "DBProxyTargetGroupNotFoundFault"),
    (TargetNotFound, "DBProxyTargetNotFoundFault"),
    (TargetAlreadyRegistered, "DBProxyTargetAlreadyRegisteredFault"),
    (InvalidProxyState, "InvalidDBProxyStateFault"),
    (ListenFailed, "InvalidParameterValue"),
    (InvalidChange, "InvalidParameterValue"),
]


def fault(code, message):
    status, sender = error_status(code)
    return QueryError(code, message, status, sender)


def registry_fault(error):
    for kind, code in _FAULTS:
        if isinstance(error, kind):
            return fault(code, str(error))
    return fault("InvalidParameterValue", str(error))


class RdsApi(EndpointOperations):
    """The operations (see the module docstring; the proxy endpoint ones are in
    admin/endpoint_operations.py)."""

    def __init__(self, control):
        self.control = control

    @property
    def registry(self):
        return self.control.registry

    @property
    def arns(self):
        return shapes.Arns(self.control.config)

    def call(self, action, params):
        """-> output dict of *action*; raises QueryError."""
        if action not in ACTIONS:
            raise QueryError("InvalidAction", f"The action {action} is not valid for this web service.")
        method = getattr(self, "_" + action)
        try:
            return method(params)
        except RegistryError as e:
            raise registry_fault(e) from None
        except ConfigConflict as e:
            raise fault("InvalidDBProxyStateFault", str(e)) from None
        except ConfigError as e:
            raise fault("InvalidParameterValue", str(e)) from None
        except OSError as e:
            raise QueryError("InternalFailure", f"the configuration file could not be written "
                             f"({e.strerror or e}); nothing changed", 500, sender=False) from None

    # -- which resources a request acts on (IAM) --------------------------------------------------
    def resources(self, action, params):
        if action in ENDPOINT_READ_ACTIONS + ENDPOINT_WRITE_ACTIONS:
            return self.endpoint_resources(action, params)
        arns = self.arns
        name = params.get("DBProxyName")
        if name is None:
            return [arns.any_proxy()]
        runtime = self.registry.get(name) if name in self.registry else None
        if runtime is None:
            from types import SimpleNamespace
            proxy = SimpleNamespace(name=name, resource_id="",
                                    target_group=SimpleNamespace(name=params.get("TargetGroupName")
                                                                 or shapes.DEFAULT_TARGET_GROUP))
            return [arns.proxy(proxy)]
        out = [arns.proxy(runtime.config)]
        if action in ("DescribeDBProxyTargetGroups", "DescribeDBProxyTargets", "ModifyDBProxyTargetGroup",
                      "RegisterDBProxyTargets", "DeregisterDBProxyTargets"):
            out.append(arns.target_group(runtime.config))
        return out

    # -- describe ----------------------------------------------------------------------------------
    def _DescribeDBProxies(self, params):
        name = params.get("DBProxyName")
        runtimes = [self.registry.get(name)] if name is not None else list(self.registry)
        items = [shapes.db_proxy(r, self.arns) for r in runtimes]
        items = apply_filters(items, params.get("Filters"), {
            "db-proxy-name": lambda i: [i["DBProxyName"]],
            "engine-family": lambda i: [i["EngineFamily"]],
            "status": lambda i: [i["Status"]],
        })
        page, marker = paginate(items, params)
        return _with_marker({"DBProxies": page}, marker)

    def _DescribeDBProxyTargetGroups(self, params):
        runtime = self._group(params)
        items = apply_filters([shapes.db_proxy_target_group(runtime, self.arns)], params.get("Filters"), {
            "target-group-name": lambda i: [i["TargetGroupName"]],
        })
        page, marker = paginate(items, params)
        return _with_marker({"TargetGroups": page}, marker)

    def _DescribeDBProxyTargets(self, params):
        runtime = self._group(params)
        items = apply_filters(shapes.db_proxy_targets(runtime, self.arns), params.get("Filters"), {
            "rds-resource-id": lambda i: [i["RdsResourceId"]],
            "role": lambda i: [i["Role"]],
            "state": lambda i: [i["TargetHealth"]["State"]],
            "type": lambda i: [i["Type"]],
        })
        page, marker = paginate(items, params)
        return _with_marker({"Targets": page}, marker)

    def _DescribeDBProxySessions(self, params):
        from txrdsproxy.admin.sessions import describe_sessions
        runtime = self.registry.get(params["DBProxyName"])
        items = apply_filters(describe_sessions(runtime.ctx, params.get("Pinned")),
                              params.get("Filters"), {
            "user-name": lambda i: [i.get("UserName", "")],
            "database-name": lambda i: [i.get("DatabaseName", "")],
            "state": lambda i: [i["State"]],
            "pin-reason": lambda i: [i.get("PinReason", "")],
        })
        page, marker = paginate(items, params)
        return _with_marker({"DBProxySessions": page}, marker)

    def _group(self, params):
        runtime = self.registry.get(params["DBProxyName"])
        group = params.get("TargetGroupName")
        if group is not None and group != runtime.config.target_group.name:
            raise TargetGroupNotFound(
                f"DBProxy {runtime.name} has no target group {group} "
                f"(its target group is {runtime.config.target_group.name}).")
        return runtime

    # -- create / modify / delete ---------------------------------------------------------------------
    def _CreateDBProxy(self, params):
        name = params["DBProxyName"]
        if self.registry.name_taken(name):
            raise ProxyAlreadyExists(f"DBProxy {name} already exists.")
        if params["EngineFamily"] not in ("POSTGRESQL", "MYSQL"):
            raise fault("InvalidParameterValue",
                        f"EngineFamily {params['EngineFamily']} is not supported (POSTGRESQL, MYSQL).")
        _refuse(params, "DefaultAuthScheme", "EndpointNetworkType", "TargetConnectionNetworkType")
        tags = {t.get("Key"): t.get("Value") for t in params.get("Tags") or []}
        item = {
            "DBProxyName": name,
            "EngineFamily": params["EngineFamily"],
            "Listen": tags.get(LISTEN_TAG) or self.control.config.admin.default_listen,
            "Auth": [_auth_doc(a) for a in params.get("Auth") or []],
            "TargetGroups": [{"TargetGroupName": shapes.DEFAULT_TARGET_GROUP, "Targets": []}],
            "RoleArn": params["RoleArn"],
            "VpcSubnetIds": list(params.get("VpcSubnetIds") or []),
        }
        for key in ("VpcSecurityGroupIds",):
            if params.get(key):
                item[key] = list(params[key])
        for key in ("RequireTLS", "IdleClientTimeout", "DebugLogging"):
            if key in params:
                item[key] = params[key]

        def edit(document):
            if document.get("DBProxies") is None:
                document["DBProxies"] = []
            document["DBProxies"].append(item)

        self.control.change("CreateDBProxy", edit, lambda doc: {proxy_path(name): _plain_item(doc, name)})
        return {"DBProxy": shapes.db_proxy(self.registry.get(name), self.arns)}

    def _ModifyDBProxy(self, params):
        name = params["DBProxyName"]
        self.registry.get(name)
        _refuse(params, "DefaultAuthScheme")
        new_name = params.get("NewDBProxyName")
        if new_name is not None and new_name != name and self.registry.name_taken(new_name):
            raise ProxyAlreadyExists(f"DBProxy {new_name} already exists.")
        keys = {"RequireTLS": "RequireTLS", "IdleClientTimeout": "IdleClientTimeout",
                "DebugLogging": "DebugLogging", "RoleArn": "RoleArn",
                "SecurityGroups": "VpcSecurityGroupIds"}
        changed = {}

        def edit(document):
            item = find_proxy(document, name)
            for param, key in keys.items():
                if param in params:
                    item[key] = list(params[param]) if isinstance(params[param], list) else params[param]
                    changed[key] = item[key]
            if "Auth" in params:
                item["Auth"] = [_auth_doc(a) for a in params["Auth"]]
                changed["Auth"] = [dict(a) for a in item["Auth"]]
            if new_name is not None and new_name != name:
                resource_id = shapes.Arns.resource_id(self.registry.get(name).config)
                item["DBProxyName"] = new_name
                if _supports_resource_id():
                    item["DBProxyResourceId"] = resource_id  # the ARN survives the rename

        final = new_name or name
        self.control.change("ModifyDBProxy", edit, lambda doc: {
            proxy_path(final, key): value for key, value in changed.items()} | (
            {proxy_path(name): None, proxy_path(final): _plain_item(doc, final)} if final != name else {}))
        return {"DBProxy": shapes.db_proxy(self.registry.get(final), self.arns)}

    def _DeleteDBProxy(self, params):
        name = params["DBProxyName"]
        runtime = self.registry.get(name)

        def edit(document):
            document["DBProxies"].remove(find_proxy(document, name))

        self.control.change("DeleteDBProxy", edit, {proxy_path(name): None})
        return {"DBProxy": shapes.db_proxy(runtime, self.arns)}  # status: deleting

    # -- target groups and targets ---------------------------------------------------------------------
    def _ModifyDBProxyTargetGroup(self, params):
        name = params["DBProxyName"]
        runtime = self._group(params)
        group_name = params["TargetGroupName"]
        pool = params.get("ConnectionPoolConfig") or {}
        new_name = params.get("NewName")
        changed = {}

        def edit(document):
            group = find_group(document, name, group_name)
            if pool:
                current = group.get("ConnectionPoolConfig")
                if current is None:
                    group["ConnectionPoolConfig"] = current = {}
                for key, value in pool.items():
                    current[key] = list(value) if isinstance(value, list) else value
                    changed[f"TargetGroups[TargetGroupName={new_name or group_name}]."
                            f"ConnectionPoolConfig.{key}"] = current[key]
            if new_name is not None:
                group["TargetGroupName"] = new_name

        self.control.change("ModifyDBProxyTargetGroup", edit,
                            {proxy_path(name, k): v for k, v in changed.items()})
        return {"DBProxyTargetGroup": shapes.db_proxy_target_group(runtime, self.arns)}

    def _RegisterDBProxyTargets(self, params):
        name = params["DBProxyName"]
        runtime = self._group(params)
        if params.get("DBClusterIdentifiers"):
            ident = params["DBClusterIdentifiers"][0]
            raise fault("DBClusterNotFoundFault", f"DBCluster {ident} not found (this proxy "
                        "registers DB instances only).")
        idents = list(params.get("DBInstanceIdentifiers") or [])
        registered = {t.rds_resource_id for t in runtime.config.target_group.targets}
        targets = []
        for ident in idents:
            if ident in registered:
                raise TargetAlreadyRegistered(
                    f"DB instance {ident} is already registered with DBProxy {name}.")
            instance = self.control.db_instance(ident)
            if instance is None:
                raise fault("DBInstanceNotFound", f"DBInstance {ident} not found (list it under "
                            "DBInstances in the configuration).")
            targets.append({"RdsResourceId": ident, "Endpoint": instance.endpoint, "Port": instance.port})

        def edit(document):
            group = find_group(document, name, params.get("TargetGroupName"))
            if group.get("Targets") is None:
                group["Targets"] = []
            group["Targets"].extend(targets)

        self.control.change("RegisterDBProxyTargets", edit, {
            proxy_path(name, f"TargetGroups[TargetGroupName={runtime.config.target_group.name}]."
                             f"Targets[RdsResourceId={t['RdsResourceId']}]"): t for t in targets})
        by_id = {t["RdsResourceId"]: t for t in shapes.db_proxy_targets(runtime, self.arns)}
        return {"DBProxyTargets": [by_id[i] for i in idents if i in by_id]}

    def _DeregisterDBProxyTargets(self, params):
        name = params["DBProxyName"]
        runtime = self._group(params)
        idents = list(params.get("DBInstanceIdentifiers") or []) + list(params.get("DBClusterIdentifiers") or [])
        registered = {t.rds_resource_id for t in runtime.config.target_group.targets}
        for ident in idents:
            if ident not in registered:
                raise TargetNotFound(f"DBProxy {name} has no registered target {ident}.")

        def edit(document):
            group = find_group(document, name, params.get("TargetGroupName"))
            group["Targets"] = [t for t in group.get("Targets") or [] if t.get("RdsResourceId") not in idents]

        self.control.change("DeregisterDBProxyTargets", edit, {
            proxy_path(name, f"TargetGroups[TargetGroupName={runtime.config.target_group.name}]."
                             f"Targets[RdsResourceId={i}]"): None for i in idents})
        return {}


def _refuse(params, *names):
    for name in names:
        if params.get(name):
            raise fault("InvalidParameterValue", f"{name} is not supported by txrdsproxy.")


def _supports_resource_id():
    from txrdsproxy.config.load import _PROXY_KEYS
    return "DBProxyResourceId" in _PROXY_KEYS


def _auth_doc(entry):
    """A UserAuthConfig of the API -> the config file's Auth item."""
    out = {}
    for key in ("Description", "UserName", "AuthScheme", "SecretArn", "IAMAuth", "ClientPasswordAuthType"):
        if entry.get(key) is not None:
            out[key] = entry[key]
    if "SecretArn" not in out:
        raise fault("InvalidParameterValue", "Auth: every entry needs a SecretArn.")
    return out


def _plain_item(document, name):
    from txrdsproxy.config.store import plain
    return plain(find_proxy(document, name))


# -- filters and paging -------------------------------------------------------------------------------

def apply_filters(items, filters, fields):
    """Keep the items every filter matches (any of its Values; * and ? wildcards).  An unknown
    filter name is InvalidParameterValue, naming the ones this operation knows."""
    for f in filters or []:
        name = f.get("Name")
        values = f.get("Values") or []
        if name not in fields:
            raise fault("InvalidParameterValue", f"Unrecognized filter name: {name} "
                        f"(this operation filters on {', '.join(sorted(fields))}).")
        items = [i for i in items if any(fnmatch.fnmatchcase(str(v), pattern)
                                         for v in fields[name](i) for pattern in values)]
    return items


MIN_RECORDS, MAX_RECORDS = 20, 100


ALL_RECORDS = object()  # MaxRecords of a worker's answer to `Workers: N`'s parent: no page


def paginate(items, params):
    """-> (page, next Marker or None).  MaxRecords 20..100 (default 100), as RDS's;
    ALL_RECORDS (never from a client: see query.py) gives every item."""
    size = params.get("MaxRecords", MAX_RECORDS)
    if size is ALL_RECORDS:
        return list(items), None
    if not MIN_RECORDS <= size <= MAX_RECORDS:
        raise fault("InvalidParameterValue",
                    f"MaxRecords must be between {MIN_RECORDS} and {MAX_RECORDS} (got {size}).")
    start = 0
    marker = params.get("Marker")
    if marker:
        try:
            text = base64.urlsafe_b64decode(marker.encode()).decode()
            prefix, _, number = text.partition(":")
            start = int(number)
            if prefix != "offset" or start < 0:
                raise ValueError(text)
        except (ValueError, UnicodeDecodeError):
            raise fault("InvalidParameterValue", "The Marker is not valid.") from None
    page = items[start:start + size]
    end = start + len(page)
    next_marker = base64.urlsafe_b64encode(f"offset:{end}".encode()).decode() if end < len(items) else None
    return page, next_marker


def _with_marker(out, marker):
    if marker is not None:
        out["Marker"] = marker
    return out
