"""The RDS API's DB proxy endpoint operations (DescribeDBProxyEndpoints, CreateDBProxyEndpoint,
ModifyDBProxyEndpoint, DeleteDBProxyEndpoint) over the running registry, as a mixin of
operations.RdsApi (same conventions: decoded input in, output shape out, refusals as QueryError).

A proxy's default endpoint (its own Listen) is listed as "default" with IsDefault true and
cannot be changed here (ModifyDBProxy changes the proxy).  An endpoint made by
CreateDBProxyEndpoint listens at the address its Tags name (`txrdsproxy:Listen`), else at the
admin's DefaultListen (a free port, written into the file); the `txrdsproxy:FallbackToWriter`
tag ("true") lets a READ_ONLY endpoint use the writer when no replica is healthy.  What a change
does to the endpoint's sessions: endpoints.EndpointSet.apply.
"""

from txrdsproxy.admin import shapes
from txrdsproxy.config.model import DEFAULT_ENDPOINT_NAME
from txrdsproxy.control import find_proxy, proxy_path
from txrdsproxy.runtime import RegistryError

ENDPOINT_READ_ACTIONS = ("DescribeDBProxyEndpoints",)
ENDPOINT_WRITE_ACTIONS = ("CreateDBProxyEndpoint", "ModifyDBProxyEndpoint", "DeleteDBProxyEndpoint")
LISTEN_TAG = "txrdsproxy:Listen"
FALLBACK_TAG = "txrdsproxy:FallbackToWriter"


class ProxyEndpointNotFound(RegistryError):
    pass


class ProxyEndpointAlreadyExists(RegistryError):
    pass


class InvalidProxyEndpointState(RegistryError):
    pass


ENDPOINT_FAULTS = [
    (ProxyEndpointNotFound, "DBProxyEndpointNotFoundFault"),
    (ProxyEndpointAlreadyExists, "DBProxyEndpointAlreadyExistsFault"),
    (InvalidProxyEndpointState, "InvalidDBProxyEndpointStateFault"),
]


def _endpoint_path(proxy_name, endpoint_name):
    return proxy_path(proxy_name, f"Endpoints[DBProxyEndpointName={endpoint_name}]")


class EndpointOperations:
    """Mixed into operations.RdsApi (which supplies registry, arns, control)."""

    def _find_endpoint(self, endpoint_name):
        """-> (ProxyRuntime, EndpointRuntime) of an extra endpoint; ProxyEndpointNotFound."""
        for runtime in self.registry:
            endpoint = runtime.endpoints.get(endpoint_name)
            if endpoint is not None:
                return runtime, endpoint
        raise ProxyEndpointNotFound(f"DBProxyEndpoint {endpoint_name} not found.")

    def _endpoint_name_taken(self, name):
        return name == DEFAULT_ENDPOINT_NAME or any(
            runtime.endpoints.get(name) is not None for runtime in self.registry)

    def _endpoint_shape(self, runtime, name):
        for item in shapes.db_proxy_endpoints(runtime, self.arns):
            if item["DBProxyEndpointName"] == name:
                return item
        raise ProxyEndpointNotFound(f"DBProxyEndpoint {name} not found.")

    def endpoint_resources(self, action, params):
        """The ARNs an endpoint operation acts on (IAM): the endpoint's and its proxy's."""
        name = params.get("DBProxyEndpointName")
        proxy_name = params.get("DBProxyName")
        if action == "DescribeDBProxyEndpoints" and name is None:
            if proxy_name is None or proxy_name not in self.registry:
                return [self.arns.any_proxy(), self.arns.any_proxy_endpoint()]
            return [self.arns.proxy(self.registry.get(proxy_name).config)]
        if proxy_name is not None and proxy_name in self.registry:
            config = self.registry.get(proxy_name).config
            return [self.arns.proxy(config), self.arns.proxy_endpoint(config, name)]
        try:
            runtime, _ = self._find_endpoint(name)
        except ProxyEndpointNotFound:
            return [self.arns.any_proxy_endpoint()]
        return [self.arns.proxy(runtime.config), self.arns.proxy_endpoint(runtime.config, name)]

    def _DescribeDBProxyEndpoints(self, params):
        from txrdsproxy.admin.operations import apply_filters, paginate, _with_marker
        proxy_name = params.get("DBProxyName")
        runtimes = [self.registry.get(proxy_name)] if proxy_name is not None else list(self.registry)
        items = [item for r in runtimes for item in shapes.db_proxy_endpoints(r, self.arns)]
        name = params.get("DBProxyEndpointName")
        if name is not None:
            items = [i for i in items if i["DBProxyEndpointName"] == name]
            if not items:
                raise ProxyEndpointNotFound(f"DBProxyEndpoint {name} not found.")
        items = apply_filters(items, params.get("Filters"), {
            "db-proxy-endpoint-name": lambda i: [i["DBProxyEndpointName"]],
            "db-proxy-name": lambda i: [i["DBProxyName"]],
            "target-role": lambda i: [i["TargetRole"]],
        })
        page, marker = paginate(items, params)
        return _with_marker({"DBProxyEndpoints": page}, marker)

    def _CreateDBProxyEndpoint(self, params):
        from txrdsproxy.admin.operations import _refuse, fault
        proxy_name = params["DBProxyName"]
        runtime = self.registry.get(proxy_name)
        name = params["DBProxyEndpointName"]
        if self._endpoint_name_taken(name):
            raise ProxyEndpointAlreadyExists(f"DBProxyEndpoint {name} already exists.")
        _refuse(params, "EndpointNetworkType")
        tags = {t.get("Key"): t.get("Value") for t in params.get("Tags") or []}
        role = params.get("TargetRole") or "READ_WRITE"
        fallback = str(tags.get(FALLBACK_TAG, "")).lower()
        if fallback not in ("", "true", "false"):
            raise fault("InvalidParameterValue", f"Tag {FALLBACK_TAG} must be true or false.")
        item = {
            "DBProxyEndpointName": name,
            "TargetRole": role,
            "Listen": tags.get(LISTEN_TAG) or self.control.config.admin.default_listen,
            "VpcSubnetIds": list(params.get("VpcSubnetIds") or []),
        }
        if params.get("VpcSecurityGroupIds"):
            item["VpcSecurityGroupIds"] = list(params["VpcSecurityGroupIds"])
        if fallback == "true":
            item["FallbackToWriter"] = True

        def edit(document):
            proxy = find_proxy(document, proxy_name)
            if proxy.get("Endpoints") is None:
                proxy["Endpoints"] = []
            proxy["Endpoints"].append(item)

        def paths(document):
            for e in find_proxy(document, proxy_name).get("Endpoints") or []:
                if e.get("DBProxyEndpointName") == name:
                    from txrdsproxy.config.store import plain
                    return {_endpoint_path(proxy_name, name): plain(e)}
            return {}

        self.control.change("CreateDBProxyEndpoint", edit, paths)
        return {"DBProxyEndpoint": self._endpoint_shape(runtime, name)}

    def _ModifyDBProxyEndpoint(self, params):
        name = params["DBProxyEndpointName"]
        if name == DEFAULT_ENDPOINT_NAME:
            raise InvalidProxyEndpointState("The default endpoint of a proxy cannot be modified "
                                            "(ModifyDBProxy changes the proxy).")
        runtime, _ = self._find_endpoint(name)
        proxy_name = runtime.name
        new_name = params.get("NewDBProxyEndpointName")
        if new_name is not None and new_name != name and self._endpoint_name_taken(new_name):
            raise ProxyEndpointAlreadyExists(f"DBProxyEndpoint {new_name} already exists.")
        changed = {}

        def edit(document):
            for e in find_proxy(document, proxy_name).get("Endpoints") or []:
                if e.get("DBProxyEndpointName") == name:
                    if "VpcSecurityGroupIds" in params:
                        e["VpcSecurityGroupIds"] = list(params["VpcSecurityGroupIds"] or [])
                        changed["VpcSecurityGroupIds"] = e["VpcSecurityGroupIds"]
                    if new_name is not None:
                        e["DBProxyEndpointName"] = new_name
                    return
            raise ProxyEndpointNotFound(f"DBProxyEndpoint {name} not found.")

        final = new_name or name

        def paths(document):
            if final != name:
                from txrdsproxy.config.store import plain
                for e in find_proxy(document, proxy_name).get("Endpoints") or []:
                    if e.get("DBProxyEndpointName") == final:
                        return {_endpoint_path(proxy_name, name): None,
                                _endpoint_path(proxy_name, final): plain(e)}
            return {f"{_endpoint_path(proxy_name, final)}.{k}": v for k, v in changed.items()}

        self.control.change("ModifyDBProxyEndpoint", edit, paths)
        return {"DBProxyEndpoint": self._endpoint_shape(runtime, final)}

    def _DeleteDBProxyEndpoint(self, params):
        name = params["DBProxyEndpointName"]
        if name == DEFAULT_ENDPOINT_NAME:
            raise InvalidProxyEndpointState("The default endpoint of a proxy cannot be deleted "
                                            "(DeleteDBProxy deletes the proxy).")
        runtime, endpoint = self._find_endpoint(name)
        proxy_name = runtime.name
        before = self._endpoint_shape(runtime, name)

        def edit(document):
            proxy = find_proxy(document, proxy_name)
            proxy["Endpoints"] = [e for e in proxy.get("Endpoints") or []
                                  if e.get("DBProxyEndpointName") != name]
            if not proxy["Endpoints"]:
                del proxy["Endpoints"]

        self.control.change("DeleteDBProxyEndpoint", edit, {_endpoint_path(proxy_name, name): None})
        return {"DBProxyEndpoint": dict(before, Status="deleting")}
