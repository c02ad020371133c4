"""The RDS Query API endpoint of the admin listener: `POST /` (and `GET /?Action=...`).

    request -> form (Action, Version, operation input) -> authentication (SigV4 Authorization
    header against the IAM principal store) -> authorisation (the principal's policies allow
    rds:<Action> on every resource the request acts on; an explicit Deny wins) -> the operation
    (admin/operations.py) -> XML (admin/querycodec.py, from botocore's RDS model)

So `boto3.client("rds", endpoint_url=...)` and `aws rds ... --endpoint-url ...` work unchanged.
`Admin.AllowUnauthenticatedLoopbackReads: true` lets unsigned Describe* requests from a
loopback address through (the demo's setting); everything else must be signed.  Why a request
was refused is logged (access key id, principal, reason); the client gets the AWS error shape.
"""

import ipaddress
import urllib.parse
import uuid

from twisted.logger import Logger
from twisted.web import resource

from txrdsproxy.admin.operations import ACTIONS, ALL_RECORDS, READ_ACTIONS
from txrdsproxy.admin.querycodec import (
    API_VERSION, QueryError, decode_params, encode_error, encode_response, operation)

log = Logger()

_SIGNATURE_CODES = {
    "unknown access key": "InvalidClientTokenId",
    "session token given for a long-term access key": "InvalidClientTokenId",
    "missing or wrong session token": "InvalidClientTokenId",
    "no Authorization header": "MissingAuthenticationToken",
}


class ApiAuthenticator:
    """Decides whether a request may run: `check(request, body, action, resources)` returns
    the principal's ARN (or "anonymous") or raises QueryError with the AWS error.

    *principals*: a callable -> the current auth.iam.PrincipalStore (None: no IAM configured,
    every signed request is refused as an unknown key); *config*: a callable -> the Config.
    """

    def __init__(self, principals, config, clock):
        self.principals, self.config, self.clock = principals, config, clock

    def check(self, request, body, action, resources):
        try:
            return self._check(request, body, action, resources)
        except QueryError:
            # Where unsigned reads are allowed, a read signed with a key we do not know (the
            # operator's own AWS credentials) is served as unsigned rather than refused.
            if action in READ_ACTIONS and self._anonymous_reads_allowed(request):
                return "anonymous"
            raise

    def _check(self, request, body, action, resources):
        header = request.getHeader(b"authorization")
        if header is None:
            raise QueryError("MissingAuthenticationToken", "Request is missing Authentication Token",
                             403)
        store = self.principals()
        if store is None:
            raise QueryError("InvalidClientTokenId",
                             "The security token included in the request is invalid.", 403)
        from txrdsproxy.auth.iam import AuthenticationFailed
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        url = f"{scheme}://{host}{request.uri.decode('latin-1')}"
        headers = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers[name.decode("latin-1")] = values[0].decode("latin-1")
        try:
            principal, verified = store.verify_request(request.method.decode(), url, headers, body,
                                                       self.clock.seconds())
        except AuthenticationFailed as e:
            code = _SIGNATURE_CODES.get(e.reason)
            if code is None:
                code = "SignatureDoesNotMatch" if ("mismatch" in e.reason or "clock" in e.reason
                                                  or "signed for" in e.reason) else "IncompleteSignature"
            log.info("management API: {action} refused ({code}): {reason}", action=action, code=code,
                     reason=e.reason)
            raise QueryError(code, _MESSAGES[code], 400 if code == "IncompleteSignature" else 403) from None
        if principal is None:
            raise QueryError("InvalidClientTokenId", _MESSAGES["InvalidClientTokenId"], 403)
        for arn in resources:
            decision = store.authorize(principal, f"rds:{action}", arn)
            if not decision.allowed:
                log.info("management API: {principal} denied rds:{action} on {arn} ({decision})",
                         principal=principal.arn, action=action, arn=arn, decision=decision.value)
                raise QueryError("AccessDenied", f"User: {principal.arn} is not authorized to perform: "
                                 f"rds:{action} on resource: {arn}", 403)
        return principal.arn

    def _anonymous_reads_allowed(self, request):
        if not self.config().admin.allow_unauthenticated_loopback_reads:
            return False
        try:
            return ipaddress.ip_address(request.getClientAddress().host).is_loopback
        except (AttributeError, ValueError):
            return False


_MESSAGES = {
    "InvalidClientTokenId": "The security token included in the request is invalid.",
    "SignatureDoesNotMatch": "The request signature we calculated does not match the signature you "
                             "provided. Check your AWS Secret Access Key and signing method.",
    "IncompleteSignature": "The request signature does not conform to AWS standards.",
    "MissingAuthenticationToken": "Request is missing Authentication Token",
}


def parse_form(body, query):
    """Form body (bytes) and query string -> {str: str}; QueryError for a repeated key or bytes
    that are not UTF-8."""
    out = {}
    for text in (query, body):
        if not text:
            continue
        try:
            pairs = urllib.parse.parse_qsl(text.decode("utf-8"), keep_blank_values=True,
                                           strict_parsing=False, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise QueryError("MalformedQueryString", "The request is not a valid form (UTF-8).") from None
        for key, value in pairs:
            if key in out:
                raise QueryError("InvalidParameterValue", f"Parameter {key} is given more than once.")
            out[key] = value
    return out


class QueryResource(resource.Resource):
    """`/` of the admin listener.  A GET without Action goes to *fallback* (the console page),
    when there is one."""

    isLeaf = True
    MAX_BODY = 1024 * 1024

    def __init__(self, api, authenticator, fallback=None):
        super().__init__()
        self.api, self.authenticator, self.fallback = api, authenticator, fallback

    def render_GET(self, request):
        if b"Action" not in request.args and self.fallback is not None:
            return self.fallback.render(request)
        return self._handle(request, b"")

    def render_POST(self, request):
        body = request.content.read(self.MAX_BODY + 1) if request.content is not None else b""
        if len(body) > self.MAX_BODY:
            return self._error(request, QueryError("RequestEntityTooLarge", "The request is too large.", 413),
                               str(uuid.uuid4()))
        return self._handle(request, body)

    def _handle(self, request, body):
        request_id = str(uuid.uuid4())
        try:
            query = request.uri.partition(b"?")[2]
            form = parse_form(body if request.method == b"POST" else b"", query)
            action = form.pop("Action", None)
            version = form.pop("Version", None)
            if not action:
                raise QueryError("MissingAction", "The request must contain the parameter Action.")
            if action not in ACTIONS:
                raise QueryError("InvalidAction", f"The action {action} is not valid for this web service.")
            if version != API_VERSION:
                raise QueryError("InvalidParameterValue" if version else "MissingParameter",
                                 f"Version must be {API_VERSION}.")
            op = operation(action)
            params = decode_params(op, form)
            if getattr(request, "unpaged", False) and "MaxRecords" in op.input_shape.members:
                # `Workers: N`: the parent asks each worker for all its records and cuts the
                # page itself (workers/admin.py); only its private socket's requests have this.
                params = dict(params, MaxRecords=ALL_RECORDS)
                params.pop("Marker", None)
            principal = self.authenticator.check(request, body, action,
                                                 self.api.resources(action, params))
            result = self.api.call(action, params)
            if action not in READ_ACTIONS:
                log.info("management API: {principal} {action} {name}", principal=principal,
                         action=action, name=params.get("DBProxyName"))
            out = encode_response(op, result, request_id)
        except QueryError as e:
            return self._error(request, e, request_id)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/xml")
        request.setHeader(b"x-amzn-requestid", request_id.encode())
        return out

    def _error(self, request, error, request_id):
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", b"text/xml")
        request.setHeader(b"x-amzn-requestid", request_id.encode())
        return encode_error(error.code, error.message, request_id, error.sender)

