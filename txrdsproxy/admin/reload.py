"""`POST /reload` on the admin listener: re-read the configuration file and the secrets and apply
the difference (the same as SIGHUP), answering what changed.

It is signed and authorised like the Query API: the IAM action is `rds:ModifyDBProxy` on every
proxy (`arn:aws:rds:<region>:<account>:db-proxy:*`).  200 with {"Changes": [...]} (lines; the
API changes the file undid are among them); 400 with {"Error": {"Code":
"InvalidConfiguration", "Message": "<file>: <key path>: ..."}} when the file is not valid
(nothing changed).
"""

import json

from twisted.logger import Logger
from twisted.web import resource, server

from txrdsproxy.admin.querycodec import QueryError
from txrdsproxy.admin.shapes import Arns

log = Logger()
RELOAD_ACTION = "ModifyDBProxy"


class ReloadResource(resource.Resource):
    isLeaf = True

    def __init__(self, control, authenticator):
        super().__init__()
        self.control, self.authenticator = control, authenticator

    def render_POST(self, request):
        body = request.content.read(65536) if request.content is not None else b""
        try:
            self.authenticator.check(request, body, RELOAD_ACTION,
                                     [Arns(self.control.config).any_proxy()])
        except QueryError as e:
            return _send(request, e.status, {"Error": {"Code": e.code, "Message": e.message}})
        d = self.control.reload()

        def done(lines):
            _finish(request, 200, {"Changes": lines})

        def failed(failure):
            from txrdsproxy.config.load import ConfigError
            if failure.check(ConfigError):
                _finish(request, 400, {"Error": {"Code": "InvalidConfiguration",
                                                 "Message": failure.getErrorMessage()}})
            else:
                log.failure("reload failed", failure)
                _finish(request, 500, {"Error": {"Code": "InternalFailure",
                                                 "Message": failure.getErrorMessage()}})

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


def _send(request, status, body):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode() + b"\n"


def _finish(request, status, body):
    if getattr(request, "_disconnected", False):
        return
    request.write(_send(request, status, body))
    request.finish()
