"""`rdsproxy`: the `aws rds` DB proxy commands against txrdsproxy's admin endpoint, plus
`reload` and `deploy`.

    rdsproxy [--endpoint-url URL] [--output json|table|text] [--region R] [--profile P]
             [--no-sign-request] [--config FILE] COMMAND [options]

COMMAND and its options are the aws command's: `describe-db-proxies`, `create-db-proxy`,
`modify-db-proxy`, `delete-db-proxy`, `describe-db-proxy-target-groups`,
`modify-db-proxy-target-group`, `register-db-proxy-targets`, `deregister-db-proxy-targets`,
`describe-db-proxy-targets`, `describe-db-proxy-endpoints`, `create-db-proxy-endpoint`,
`modify-db-proxy-endpoint`, `delete-db-proxy-endpoint`, with options named after the operation's input members
(`--db-proxy-name`, `--connection-pool-config MaxConnectionsPercent=50,...`, `--require-tls` /
`--no-require-tls`, `--db-instance-identifiers a b`).  Commands, options and the request and
response shapes all come from botocore's RDS model, and requests are made by a botocore client,
so this command cannot drift from the API.  Structures and lists of structures take the aws
shorthand (`Key=Value,Key=Value`, a list member's values after its `=`, comma separated) or JSON.

The endpoint defaults to $RDSPROXY_ENDPOINT, else the Admin.Listen of the configuration file
(--config, $RDSPROXY_CONFIG or etc/rdsproxy.yaml), else http://127.0.0.1:8089.  Credentials
come from the usual AWS environment variables, shared files and --profile; with none (or
--no-sign-request) requests go unsigned.  The region: --region, the AWS settings, the
configuration's IAM.Region, else us-east-1.

Exit statuses are the aws command's: 0 success, 252 bad command line, 254 the API answered
with an error, 255 the endpoint could not be reached.
"""

import argparse
import json
import os
import sys

DEFAULT_ENDPOINT = "http://127.0.0.1:8089"
DEFAULT_CONFIG = "etc/rdsproxy.yaml"
EXIT_USAGE, EXIT_API_ERROR, EXIT_UNREACHABLE = 252, 254, 255
OPERATIONS = (
    "CreateDBProxy", "DescribeDBProxies", "ModifyDBProxy", "DeleteDBProxy",
    "DescribeDBProxyTargetGroups", "ModifyDBProxyTargetGroup", "RegisterDBProxyTargets",
    "DeregisterDBProxyTargets", "DescribeDBProxyTargets",
    "DescribeDBProxyEndpoints", "CreateDBProxyEndpoint", "ModifyDBProxyEndpoint",
    "DeleteDBProxyEndpoint",
    "DescribeDBProxySessions",  # ours (admin/extensions.py)
)
PAGED_KEYS = {"DescribeDBProxies": "DBProxies", "DescribeDBProxyTargetGroups": "TargetGroups",
              "DescribeDBProxyTargets": "Targets", "DescribeDBProxySessions": "DBProxySessions",
              "DescribeDBProxyEndpoints": "DBProxyEndpoints"}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 252, as the aws command's do, instead of argparse's 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _model():
    from txrdsproxy.admin.querycodec import rds_model
    return rds_model()


def _option(member_name):
    from botocore import xform_name
    return "--" + xform_name(member_name, "-")


def build_parser():
    from botocore import xform_name
    parser = _Parser(prog="rdsproxy", description="Manage txrdsproxy proxies like `aws rds`.")
    parser.add_argument("--endpoint-url", "--endpoint", dest="endpoint_url", default=None,
                        help="admin endpoint (default: $RDSPROXY_ENDPOINT, the config's Admin.Listen, "
                             f"or {DEFAULT_ENDPOINT})")
    parser.add_argument("--output", choices=("json", "table", "text"), default=None)
    parser.add_argument("--region", default=None)
    parser.add_argument("--profile", default=None)
    parser.add_argument("--no-sign-request", action="store_true")
    parser.add_argument("--config", default=None, help="txrdsproxy config file (for defaults)")
    parser.add_argument("--cli-read-timeout", dest="timeout", type=float, default=60.0)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    model = _model()
    for name in OPERATIONS:
        op = model.operation_model(name)
        sub = commands.add_parser(xform_name(name, "-"), help=op.documentation and name)
        sub.set_defaults(operation=name)
        shape = op.input_shape
        required = set(shape.required_members)
        for member, mshape in shape.members.items():
            option = _option(member)
            if mshape.type_name == "boolean":
                group = sub.add_mutually_exclusive_group()
                group.add_argument(option, dest=member, action="store_true", default=None)
                group.add_argument("--no-" + option[2:], dest=member, action="store_false")
            elif mshape.type_name == "list" and mshape.member.type_name != "structure":
                sub.add_argument(option, dest=member, nargs="+", required=member in required,
                                 metavar=member)
            elif mshape.type_name == "list":
                sub.add_argument(option, dest=member, nargs="+", required=member in required,
                                 metavar=member)
            else:
                sub.add_argument(option, dest=member, required=member in required, metavar=member)
        if name in PAGED_KEYS:
            sub.add_argument("--no-paginate", action="store_true",
                             help="one page only (default: every page, as the aws command)")
    reload = commands.add_parser("reload", help="re-read the configuration file and secrets")
    reload.set_defaults(operation="reload")
    reload.add_argument("--pidfile", default=None,
                        help="send SIGHUP to the twistd process of this pid file instead")
    deploy = commands.add_parser("deploy", help="create or update proxies from a CloudFormation template")
    deploy.set_defaults(operation="deploy")
    deploy.add_argument("--template-file", required=True)
    deploy.add_argument("--parameter-overrides", nargs="+", default=[], metavar="KEY=VALUE")
    deploy.add_argument("--values-file", default=None,
                        help="YAML/JSON mapping of export names for Fn::ImportValue (and parameters)")
    deploy.add_argument("--dry-run", action="store_true", help="print the change set only")
    return parser


# -- shorthand and JSON values ---------------------------------------------------------------------

def convert(shape, value, where):
    """A command-line value (str, or list of str for nargs) -> the member's value."""
    kind = shape.type_name
    if kind == "list":
        items = value if isinstance(value, list) else [value]
        if len(items) == 1 and items[0].lstrip().startswith("["):
            return _json(items[0], where)
        return [convert(shape.member, item, where) for item in items]
    if kind == "structure":
        if isinstance(value, str) and value.lstrip().startswith("{"):
            return _json(value, where)
        return _shorthand(shape, value, where)
    if kind in ("integer", "long"):
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"{where}: {value!r} is not an integer") from None
    if kind == "boolean":
        if str(value).lower() not in ("true", "false"):
            raise UsageError(f"{where}: {value!r} is not true or false")
        return str(value).lower() == "true"
    return value


def _json(text, where):
    try:
        return json.loads(text)
    except ValueError as e:
        raise UsageError(f"{where}: not valid JSON ({e})") from None


def _shorthand(shape, text, where):
    """`Key=Value,Key=Value`; a list member takes the values after its `=` up to the next
    `Key=` (`SessionPinningFilters=A,B`), as the aws command's shorthand."""
    out = {}
    current = None
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and key in shape.members:
            member = shape.members[key]
            current = key
            if member.type_name == "list":
                out[key] = [convert(member.member, value, f"{where}.{key}")] if value else []
            else:
                out[key] = convert(member, value, f"{where}.{key}")
        elif current is not None and shape.members[current].type_name == "list":
            out[current].append(convert(shape.members[current].member, part, f"{where}.{current}"))
        else:
            known = ", ".join(shape.members)
            raise UsageError(f"{where}: expected Key=Value with Key one of {known}; got {part!r}")
    return out


def build_params(op, args):
    params = {}
    for member, shape in op.input_shape.members.items():
        value = getattr(args, member, None)
        if value is None:
            continue
        params[member] = value if shape.type_name == "boolean" else convert(shape, value, _option(member))
    return params


# -- defaults from the local configuration -------------------------------------------------------------

def local_config(path):
    """-> the raw YAML mapping of the txrdsproxy config file, or {} when there is none."""
    path = path or os.environ.get("RDSPROXY_CONFIG") or DEFAULT_CONFIG
    try:
        import yaml
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
    except Exception:  # a YAML error: defaults only
        return {}


def endpoint_from_config(data):
    listen = ((data.get("Admin") or {}).get("Listen") or "") if data else ""
    parts = listen.split(":")
    if len(parts) >= 2 and parts[0] in ("tcp", "tcp6") and parts[1].isdigit():
        host = "127.0.0.1"
        for part in parts[2:]:
            if part.startswith("interface="):
                host = part[len("interface="):] or host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{parts[1]}"
    return None


def make_client(args, data):
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import ProfileNotFound
    try:
        session = botocore.session.Session(profile=args.profile)
        from txrdsproxy.admin.extensions import install
        install(session)  # DescribeDBProxySessions
        region = args.region or session.get_config_variable("region")
    except ProfileNotFound as e:
        raise UsageError(str(e)) from None
    region = region or ((data.get("IAM") or {}).get("Region") if data else None) or "us-east-1"
    unsigned = args.no_sign_request or session.get_credentials() is None
    config = Config(signature_version=UNSIGNED if unsigned else None, retries={"max_attempts": 1},
                    read_timeout=args.timeout, connect_timeout=min(10.0, args.timeout))
    client = session.create_client("rds", region_name=region, endpoint_url=args.endpoint_url,
                                   config=config)
    return session, client, region, unsigned


# -- output ----------------------------------------------------------------------------------------

def _default(value):
    import datetime
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def render(result, output, title):
    result = {k: v for k, v in result.items() if k != "ResponseMetadata"}
    if output == "json":
        return json.dumps(result, indent=4, default=_default) + "\n"
    if output == "text":
        lines = []
        _text(result, "", lines)
        return "".join(line + "\n" for line in lines)
    return _table(result, title)


def _scalar(value):
    if isinstance(value, bool):
        return "True" if value else "False"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _text(value, name, lines):
    """The aws command's text output: one line per structure of scalars, prefixed by the upper-cased
    key of the list it is in; lists of scalars tab-separated on one line."""
    if isinstance(value, dict):
        scalars = [_scalar(v) for k, v in sorted(value.items()) if not isinstance(v, (dict, list))]
        if scalars:
            lines.append("\t".join(([name.upper()] if name else []) + scalars))
        for key, sub in sorted(value.items()):
            if isinstance(sub, (dict, list)):
                _text(sub, key, lines)
    elif isinstance(value, list):
        if value and all(not isinstance(v, (dict, list)) for v in value):
            lines.append("\t".join([name.upper()] + [_scalar(v) for v in value]))
        else:
            for item in value:
                _text(item, name, lines)


def _table(result, title):
    rows = []

    def walk(value, prefix):
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{prefix}.{key}" if prefix else key)
        elif isinstance(value, list):
            if not value:
                rows.append((prefix, ""))
            for i, item in enumerate(value):
                walk(item, f"{prefix}[{i}]")
        else:
            rows.append((prefix, _scalar(value)))

    walk(result, "")
    width_k = max([len(k) for k, _ in rows] + [4])
    width_v = max([len(v) for _, v in rows] + [5])
    inner = width_k + width_v + 5
    line = "+" + "-" * (inner - 2) + "+"
    out = [line, "|" + title.center(inner - 2) + "|", line]
    for key, value in rows:
        out.append(f"| {key.ljust(width_k)} | {value.ljust(width_v)} |")
    out.append(line)
    return "\n".join(out) + "\n"


# -- running ---------------------------------------------------------------------------------------

def main(argv=None, stdout=None, stderr=None):
    """Run one command; -> exit status (0, 252, 254 or 255)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    data = local_config(args.config)
    args.endpoint_url = (args.endpoint_url or os.environ.get("RDSPROXY_ENDPOINT")
                         or endpoint_from_config(data) or DEFAULT_ENDPOINT)
    output = args.output or os.environ.get("AWS_DEFAULT_OUTPUT") or "json"
    if output not in ("json", "table", "text"):
        output = "json"
    try:
        if args.operation == "reload":
            from txrdsproxy.admin.reload_client import reload
            return reload(args, data, stdout, stderr)
        if args.operation == "deploy":
            from txrdsproxy.deploy import main as deploy_main
            return deploy_main(args, data, stdout, stderr)
        return _call(args, data, output, stdout, stderr)
    except UsageError as e:
        stderr.write(f"rdsproxy: error: {e}\n")
        return EXIT_USAGE


def _call(args, data, output, stdout, stderr):
    from botocore import xform_name
    from botocore.exceptions import (ClientError, EndpointConnectionError, ParamValidationError,
                                     ReadTimeoutError, ConnectTimeoutError)
    op = _model().operation_model(args.operation)
    params = build_params(op, args)
    _, client, _, _ = make_client(args, data)
    method = getattr(client, xform_name(args.operation))
    try:
        if args.operation in PAGED_KEYS and not args.no_paginate and "Marker" not in params:
            result = None
            while True:
                page = method(**params)
                if result is None:
                    result = page
                else:
                    result[PAGED_KEYS[args.operation]].extend(page[PAGED_KEYS[args.operation]])
                marker = page.get("Marker")
                if not marker:
                    result.pop("Marker", None)
                    break
                params["Marker"] = marker
        else:
            result = method(**params)
    except ParamValidationError as e:
        stderr.write(f"\n{e}\n")
        return EXIT_USAGE
    except ClientError as e:
        error = e.response.get("Error", {})
        stderr.write(f"\nAn error occurred ({error.get('Code')}) when calling the {args.operation} "
                     f"operation: {error.get('Message', '')}\n")
        return EXIT_API_ERROR
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as e:
        stderr.write(f"\nCould not connect to the endpoint URL: \"{args.endpoint_url}\" ({e})\n")
        return EXIT_UNREACHABLE
    stdout.write(render(result, output, args.operation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
