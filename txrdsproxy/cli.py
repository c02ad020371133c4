"""`rdsproxy`: the describe-* commands of `aws rds`, against txrdsproxy's management API.

    rdsproxy [--endpoint URL] describe-db-proxies [--db-proxy-name NAME]
    rdsproxy [--endpoint URL] describe-db-proxy-target-groups --db-proxy-name NAME [--target-group-name default]
    rdsproxy [--endpoint URL] describe-db-proxy-targets --db-proxy-name NAME [--target-group-name default]

The endpoint defaults to $RDSPROXY_ENDPOINT, else http://127.0.0.1:8089 (the admin listener).
Output is the API's JSON, indented by 4 like `aws --output json`.  Exit statuses follow the
aws command: 0 success, 252 bad command line, 254 the API answered with an error, 255 the
endpoint could not be reached or did not answer JSON.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

DEFAULT_ENDPOINT = "http://127.0.0.1:8089"
EXIT_USAGE, EXIT_API_ERROR, EXIT_UNREACHABLE = 252, 254, 255

# command -> (API path, operation name for messages, [(option, API parameter, required)])
COMMANDS = {
    "describe-db-proxies": ("db-proxies", "DescribeDBProxies", [
        ("--db-proxy-name", "DBProxyName", False)]),
    "describe-db-proxy-target-groups": ("db-proxy-target-groups", "DescribeDBProxyTargetGroups", [
        ("--db-proxy-name", "DBProxyName", True),
        ("--target-group-name", "TargetGroupName", False)]),
    "describe-db-proxy-targets": ("db-proxy-targets", "DescribeDBProxyTargets", [
        ("--db-proxy-name", "DBProxyName", True),
        ("--target-group-name", "TargetGroupName", False)]),
}


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 252, as the aws command's do, instead of argparse's 2."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(prog="rdsproxy", description="Describe txrdsproxy proxies, like `aws rds`.")
    parser.add_argument("--endpoint", "--endpoint-url", dest="endpoint",
                        default=os.environ.get("RDSPROXY_ENDPOINT") or DEFAULT_ENDPOINT,
                        help="admin API base URL (default: $RDSPROXY_ENDPOINT or %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for name, (_, operation, options) in COMMANDS.items():
        sub = commands.add_parser(name, help=operation)
        for option, param, required in options:
            sub.add_argument(option, dest=param, required=required, metavar=param)
    return parser


def request_url(endpoint, path, params):
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    return endpoint.rstrip("/") + "/v1/" + path + ("?" + query if query else "")


def call(url, timeout, urlopen=None):
    """GET *url* -> (HTTP status, decoded JSON body).

    Raises OSError (URLError is one) when the endpoint cannot be reached and ValueError when
    the answer is not JSON.  HTTP error statuses are returned, not raised.
    """
    urlopen = urlopen or urllib.request.urlopen
    try:
        with urlopen(urllib.request.Request(url, headers={"Accept": "application/json"}),
                     timeout=timeout) as response:
            return response.status, json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        try:
            body = e.read() or b""
        finally:
            e.close()
        try:
            return e.code, json.loads(body.decode("utf-8"))
        except ValueError:
            return e.code, {"Error": {"Code": f"HTTP{e.code}", "Message": body.decode("utf-8", "replace").strip()
                                      or str(e.reason)}}


def main(argv=None, stdout=None, stderr=None, urlopen=None):
    """Run one command; -> exit status (0, 252, 254 or 255)."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    path, operation, options = COMMANDS[args.command]
    url = request_url(args.endpoint, path, {param: getattr(args, param) for _, param, _ in options})
    try:
        status, body = call(url, args.timeout, urlopen)
    except ValueError:
        stderr.write(f"\nThe endpoint {args.endpoint} did not answer with JSON for {operation}.\n")
        return EXIT_UNREACHABLE
    except OSError as e:
        reason = getattr(e, "reason", None) or e
        stderr.write(f"\nCould not connect to the endpoint URL: \"{url}\" ({reason})\n")
        return EXIT_UNREACHABLE
    if status >= 400:
        error = body.get("Error", {}) if isinstance(body, dict) else {}
        code = error.get("Code", f"HTTP{status}")
        message = error.get("Message", "")
        stderr.write(f"\nAn error occurred ({code}) when calling the {operation} operation: {message}\n")
        return EXIT_API_ERROR
    stdout.write(json.dumps(body, indent=4) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
