"""`rdsproxy deploy`: make the proxies match a CloudFormation template's `AWS::RDS::DBProxy` and
`AWS::RDS::DBProxyTargetGroup` resources, through the RDS API (so credentials, IAM policies and
persistence are the API's), idempotently.

    rdsproxy deploy --template-file template.yaml [--parameter-overrides K=V ...]
                    [--values-file values.yaml] [--dry-run]

The template's intrinsic functions are resolved before anything is asked of the API: `Ref` (a
parameter, a pseudo parameter, or a resource: a DBProxy's `Ref` is its name), `Fn::Sub`,
`Fn::ImportValue` (the values file's `Exports`, or the whole file), `Fn::Split`, `Fn::Join`,
`Fn::Select`, `Fn::GetAtt` (DBProxy `DBProxyName`/`DBProxyArn`/`Endpoint` of a proxy that
exists), in long form or as YAML short tags (`!Ref`, `!Sub`, ...).  Parameter values come from
`--parameter-overrides`, then the values file's `Parameters`, then the template's `Default`.

The change set: a DBProxy that does not exist is created, one that differs is modified (only
the properties the template sets); a target group's ConnectionPoolConfigurationInfo members that
differ are modified; its instances are registered or deregistered so that they are exactly the
template's.  `--dry-run` prints the change set and changes nothing; a second run prints
"No changes.".  (The seed's example spells `DbProxyName` and `InstanceIdentifiers`; both
spellings are accepted.)
"""

import yaml

PROXY_TYPE = "AWS::RDS::DBProxy"
GROUP_TYPE = "AWS::RDS::DBProxyTargetGroup"
EXIT_USAGE, EXIT_API_ERROR, EXIT_UNREACHABLE = 252, 254, 255
FUNCTIONS = ("Ref", "Fn::Sub", "Fn::ImportValue", "Fn::Split", "Fn::Join", "Fn::Select",
             "Fn::GetAtt", "Fn::If", "Fn::Base64", "Fn::FindInMap")


class TemplateError(Exception):
    """The template cannot be resolved; the message names the resource and property."""


# -- reading the template ---------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    pass


def _short_tag(tag, name):
    def construct(loader, node):
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
            if name == "Fn::GetAtt" and isinstance(value, str):
                value = value.split(".", 1)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_mapping(node, deep=True)
        return {name: value}
    _Loader.add_constructor(tag, construct)


for _name in FUNCTIONS:
    _short_tag("!" + _name.replace("Fn::", ""), _name)


def load_template(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)  # noqa: S506 (a SafeLoader with CFN tags)
    except OSError as e:
        raise TemplateError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TemplateError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("Resources"), dict):
        raise TemplateError(f"{path}: a template needs a Resources mapping")
    return data


def load_values(path):
    if not path:
        return {}, {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise TemplateError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict):
        raise TemplateError(f"{path}: must be a mapping")
    if "Exports" in data or "Parameters" in data:
        return dict(data.get("Parameters") or {}), dict(data.get("Exports") or {})
    return dict(data), dict(data)


# -- resolving intrinsic functions ---------------------------------------------------------------------

class Resolver:
    def __init__(self, template, parameters, exports, region, account, lookup=None):
        self.template = template
        self.params = {}
        for name, spec in (template.get("Parameters") or {}).items():
            spec = spec if isinstance(spec, dict) else {}
            if name in parameters:
                value = parameters[name]
            elif "Default" in spec:
                value = spec["Default"]
            else:
                continue
            self.params[name] = _typed(value, spec.get("Type", "String"), name)
        for name, value in parameters.items():
            self.params.setdefault(name, value)
        self.params.update({"AWS::Region": region, "AWS::AccountId": account,
                            "AWS::StackName": "rdsproxy-deploy", "AWS::Partition": "aws",
                            "AWS::URLSuffix": "amazonaws.com", "AWS::NoValue": None})
        self.exports = exports
        self.lookup = lookup  # (logical id, attribute) -> value, for Fn::GetAtt
        self.resources = template["Resources"]

    def ref(self, name, where):
        if name in self.params:
            return self.params[name]
        resource = self.resources.get(name)
        if isinstance(resource, dict):
            if resource.get("Type") == PROXY_TYPE:
                return self.resolve(_prop(resource.get("Properties") or {}, "DBProxyName"), where)
            if resource.get("Type") == GROUP_TYPE:
                return self.resolve((resource.get("Properties") or {}).get("TargetGroupName", "default"), where)
        raise TemplateError(f"{where}: Ref {name}: no such parameter or resource "
                            "(give it with --parameter-overrides or the values file)")

    def resolve(self, value, where):
        if isinstance(value, list):
            return [self.resolve(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, arg), = value.items()
            if key == "Ref":
                return self.ref(self.resolve(arg, where), where)
            if key == "Fn::ImportValue":
                name = self.resolve(arg, where)
                if name not in self.exports:
                    raise TemplateError(f"{where}: Fn::ImportValue {name}: not in the values file's exports")
                return self.exports[name]
            if key == "Fn::Sub":
                return self._sub(arg, where)
            if key == "Fn::Split":
                delimiter, text = self.resolve(arg, where)
                return str(text).split(delimiter)
            if key == "Fn::Join":
                delimiter, items = self.resolve(arg, where)
                return delimiter.join(str(i) for i in items)
            if key == "Fn::Select":
                index, items = self.resolve(arg, where)
                try:
                    return items[int(index)]
                except (IndexError, ValueError):
                    raise TemplateError(f"{where}: Fn::Select index {index} out of range") from None
            if key == "Fn::GetAtt":
                logical, attribute = self.resolve(arg, where)
                if self.lookup is None:
                    raise TemplateError(f"{where}: Fn::GetAtt {logical}.{attribute} cannot be resolved")
                return self.lookup(logical, attribute, where)
            if key in FUNCTIONS:
                raise TemplateError(f"{where}: {key} is not supported by rdsproxy deploy")
        return {k: self.resolve(v, f"{where}.{k}") for k, v in value.items()}

    def _sub(self, arg, where):
        variables = {}
        if isinstance(arg, list):
            text, extra = arg
            variables = {k: self.resolve(v, where) for k, v in (extra or {}).items()}
        else:
            text = arg
        out, i = [], 0
        while i < len(text):
            start = text.find("${", i)
            if start < 0:
                out.append(text[i:])
                break
            out.append(text[i:start])
            end = text.find("}", start)
            if end < 0:
                raise TemplateError(f"{where}: Fn::Sub: unclosed ${{")
            name = text[start + 2:end]
            if name.startswith("!"):
                out.append("${" + name[1:] + "}")
            elif name in variables:
                out.append(str(variables[name]))
            elif "." in name:
                out.append(str(self.resolve({"Fn::GetAtt": name.split(".", 1)}, where)))
            else:
                out.append(str(self.ref(name, where)))
            i = end + 1
        return "".join(out)


def _typed(value, kind, name):
    """A parameter value as its Type says: Number -> int or float, CommaDelimitedList -> list."""
    if kind == "Number":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TemplateError(f"Parameters.{name}: {value!r} is not a Number") from None
        return int(number) if number.is_integer() else number
    if kind == "CommaDelimitedList" or kind.startswith("List<"):
        return value if isinstance(value, list) else [v.strip() for v in str(value).split(",")]
    return str(value)


def _prop(props, name):
    """A property by its CloudFormation name, or the seed example's spelling of it."""
    for key in {"DBProxyName": ("DBProxyName", "DbProxyName"),
                "DBInstanceIdentifiers": ("DBInstanceIdentifiers", "InstanceIdentifiers"),
                "ConnectionPoolConfigurationInfo": ("ConnectionPoolConfigurationInfo", "ConnectionPoolConfig")
                }.get(name, (name,)):
        if key in props:
            return props[key]
    return None


# -- the change set ----------------------------------------------------------------------------------

def plan(template, resolver, current_proxy, current_group, current_targets):
    """-> [(description, operation, params)] that make the proxies match *template*.

    *current_proxy(name)* -> the DBProxy dict or None; *current_group(name, group)* -> the
    DBProxyTargetGroup dict or None; *current_targets(name, group)* -> [RdsResourceId]."""
    changes = []
    resources = template["Resources"]
    proxies = {}
    for logical, res in resources.items():
        if not isinstance(res, dict) or res.get("Type") != PROXY_TYPE:
            continue
        props = resolver.resolve(res.get("Properties") or {}, logical)
        name = _prop(props, "DBProxyName")
        if not name:
            raise TemplateError(f"{logical}: DBProxyName is required")
        proxies[logical] = name
        existing = current_proxy(name)
        if existing is None:
            params = {"DBProxyName": name, "EngineFamily": props.get("EngineFamily"),
                      "Auth": _auth(props.get("Auth") or []), "RoleArn": props.get("RoleArn"),
                      "VpcSubnetIds": props.get("VpcSubnetIds") or []}
            for key in ("VpcSecurityGroupIds", "RequireTLS", "IdleClientTimeout", "DebugLogging", "Tags"):
                if props.get(key) is not None:
                    params[key] = props[key]
            missing = [k for k in ("EngineFamily", "RoleArn") if not params.get(k)]
            if missing:
                raise TemplateError(f"{logical}: {missing[0]} is required to create DBProxy {name}")
            changes.append((f"Create DBProxy {name} ({logical})", "CreateDBProxy", params))
            continue
        if props.get("EngineFamily") and props["EngineFamily"] != existing.get("EngineFamily"):
            raise TemplateError(f"{logical}: DBProxy {name} exists with EngineFamily "
                                f"{existing.get('EngineFamily')}; EngineFamily cannot change")
        params, diffs = {"DBProxyName": name}, []
        for key in ("RequireTLS", "IdleClientTimeout", "DebugLogging", "RoleArn"):
            if props.get(key) is not None and props[key] != existing.get(key):
                params[key] = props[key]
                diffs.append(f"{key} {existing.get(key)!r} -> {props[key]!r}")
        if props.get("VpcSecurityGroupIds") is not None and \
                list(props["VpcSecurityGroupIds"]) != list(existing.get("VpcSecurityGroupIds") or []):
            params["SecurityGroups"] = props["VpcSecurityGroupIds"]
            diffs.append("VpcSecurityGroupIds")
        if props.get("Auth") is not None and _auth_differs(_auth(props["Auth"]), existing.get("Auth") or []):
            params["Auth"] = _auth(props["Auth"])
            diffs.append("Auth")
        if diffs:
            changes.append((f"Modify DBProxy {name}: {', '.join(diffs)}", "ModifyDBProxy", params))
    for logical, res in resources.items():
        if not isinstance(res, dict) or res.get("Type") != GROUP_TYPE:
            continue
        props = resolver.resolve(res.get("Properties") or {}, logical)
        name = _prop(props, "DBProxyName")
        group = props.get("TargetGroupName") or "default"
        if not name:
            raise TemplateError(f"{logical}: DBProxyName is required")
        creating = any(op == "CreateDBProxy" and p["DBProxyName"] == name for _, op, p in changes)
        if not creating and current_proxy(name) is None:
            raise TemplateError(f"{logical}: DBProxy {name} is neither in the template nor running")
        pool = _prop(props, "ConnectionPoolConfigurationInfo")
        if pool:
            existing = (current_group(name, group) or {}).get("ConnectionPoolConfig", {}) if not creating else {}
            diffs = {k: v for k, v in pool.items() if existing.get(k) != v}
            if diffs:
                changes.append((f"Modify DBProxyTargetGroup {name}/{group}: {', '.join(sorted(diffs))}",
                                "ModifyDBProxyTargetGroup",
                                {"DBProxyName": name, "TargetGroupName": group, "ConnectionPoolConfig": pool}))
        wanted = [str(i) for i in (_prop(props, "DBInstanceIdentifiers") or [])]
        have = [] if creating else current_targets(name, group)
        add = [i for i in wanted if i not in have]
        remove = [i for i in have if i not in wanted]
        if add:
            changes.append((f"Register targets {', '.join(add)} with {name}/{group}", "RegisterDBProxyTargets",
                            {"DBProxyName": name, "TargetGroupName": group, "DBInstanceIdentifiers": add}))
        if remove:
            changes.append((f"Deregister targets {', '.join(remove)} from {name}/{group}",
                            "DeregisterDBProxyTargets",
                            {"DBProxyName": name, "TargetGroupName": group, "DBInstanceIdentifiers": remove}))
    return changes


def _auth(entries):
    out = []
    for entry in entries:
        item = {k: v for k, v in entry.items() if v is not None}
        out.append(item)
    return out


def _auth_differs(wanted, existing):
    """Do the template's Auth entries differ from the proxy's?  Only what the template says is
    compared: an entry that leaves ClientPasswordAuthType out accepts the engine's default."""
    by_arn = {e.get("SecretArn"): e for e in existing}
    if sorted(by_arn) != sorted(e.get("SecretArn") for e in wanted):
        return True
    for entry in wanted:
        have = by_arn[entry.get("SecretArn")]
        for key, value in entry.items():
            if (have.get(key) or "") != (value or ""):
                return True
    return False


# -- the command ----------------------------------------------------------------------------------------

def main(args, data, stdout, stderr):
    from botocore import xform_name
    from botocore.exceptions import ClientError, EndpointConnectionError
    from txrdsproxy.cli import make_client
    try:
        template = load_template(args.template_file)
        params, exports = load_values(args.values_file)
        for item in args.parameter_overrides:
            key, sep, value = item.partition("=")
            if not sep:
                stderr.write(f"rdsproxy deploy: --parameter-overrides takes KEY=VALUE (got {item!r})\n")
                return EXIT_USAGE
            params[key] = value
        _, rds, region, _ = make_client(args, data)
        account = str((data.get("IAM") or {}).get("AccountId") or "") if data else ""
        if not account:  # the server's own account, from the ARNs it gives
            arns = [p["DBProxyArn"] for p in rds.describe_db_proxies().get("DBProxies", [])]
            account = arns[0].split(":")[4] if arns else "000000000000"

        def current_proxy(name):
            try:
                return rds.describe_db_proxies(DBProxyName=name)["DBProxies"][0]
            except ClientError as e:
                if e.response["Error"]["Code"] == "DBProxyNotFoundFault":
                    return None
                raise

        def current_group(name, group):
            return rds.describe_db_proxy_target_groups(DBProxyName=name, TargetGroupName=group)["TargetGroups"][0]

        def current_targets(name, group):
            return [t["RdsResourceId"] for t in
                    rds.describe_db_proxy_targets(DBProxyName=name, TargetGroupName=group)["Targets"]]

        def get_att(logical, attribute, where):
            res = template["Resources"].get(logical) or {}
            if res.get("Type") != PROXY_TYPE:
                raise TemplateError(f"{where}: Fn::GetAtt {logical}.{attribute}: only DBProxy attributes")
            proxy = current_proxy(resolver.resolve(_prop(res.get("Properties") or {}, "DBProxyName"), where))
            if proxy is None or attribute not in proxy:
                raise TemplateError(f"{where}: Fn::GetAtt {logical}.{attribute}: not known before it exists")
            return proxy[attribute]

        resolver = Resolver(template, params, exports, region, account, get_att)
        changes = plan(template, resolver, current_proxy, current_group, current_targets)
        skipped = [f"{logical} ({res.get('Type')})" for logical, res in template["Resources"].items()
                   if isinstance(res, dict) and res.get("Type") not in (PROXY_TYPE, GROUP_TYPE)]
        for line in skipped:
            stdout.write(f"Skipped (not a DB proxy resource): {line}\n")
        if not changes:
            stdout.write("No changes.\n")
            return 0
        stdout.write(("Change set (dry run, nothing changed):\n" if args.dry_run else "Change set:\n"))
        for description, operation, call_params in changes:
            stdout.write(f"  {description}\n")
        if args.dry_run:
            return 0
        for description, operation, call_params in changes:
            getattr(rds, xform_name(operation))(**call_params)
            stdout.write(f"done: {description}\n")
        return 0
    except TemplateError as e:
        stderr.write(f"rdsproxy deploy: {e}\n")
        return EXIT_USAGE
    except ClientError as e:
        error = e.response.get("Error", {})
        stderr.write(f"\nAn error occurred ({error.get('Code')}) when deploying: {error.get('Message', '')}\n")
        return EXIT_API_ERROR
    except EndpointConnectionError as e:
        stderr.write(f"\nCould not connect to the endpoint URL: \"{args.endpoint_url}\" ({e})\n")
        return EXIT_UNREACHABLE

