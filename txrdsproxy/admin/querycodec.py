"""The Amazon RDS Query protocol, read and written from botocore's own RDS service model.

Requests are `Action=...&Version=2014-10-31` forms whose keys flatten the operation's input
shape the way botocore's QuerySerializer writes them (`Auth.member.1.SecretArn`,
`Filters.Filter.1.Values.Value.2`, `ConnectionPoolConfig.MaxConnectionsPercent`); responses are
`<{Action}Response xmlns="http://rds.amazonaws.com/doc/2014-10-31/"><{Action}Result>...` documents
written by walking the operation's output shape, with `ResponseMetadata/RequestId`; errors are
`<ErrorResponse>` with the code and HTTP status the model gives each fault.  Nothing here lists
a field by hand: a shape the model changes is followed, so what we send is always what botocore
(and so boto3 and the aws command) parses.
"""

import base64
import datetime
import functools
from xml.sax.saxutils import escape

API_VERSION = "2014-10-31"


class QueryError(Exception):
    """A request the protocol refuses; `code` / `status` are the AWS error's."""

    def __init__(self, code, message, status=400, sender=True):
        super().__init__(message)
        self.code, self.message, self.status, self.sender = code, message, status, sender


@functools.lru_cache(maxsize=1)
def rds_model():
    """botocore's RDS ServiceModel (loaded once: parsing it takes a while)."""
    import botocore.session

    from txrdsproxy.admin.extensions import install
    return install(botocore.session.get_session()).get_service_model("rds")


def namespace():
    return rds_model().metadata["xmlNamespace"]


def operation(action):
    """-> botocore OperationModel for *action*; QueryError InvalidAction when unknown."""
    from botocore.model import OperationNotFoundError
    try:
        return rds_model().operation_model(action)
    except OperationNotFoundError:
        raise QueryError("InvalidAction", f"The action {action} is not valid for this web service.") from None


def error_status(code):
    """-> (HTTP status, sender fault) the RDS model gives the fault *code* (400 when unknown)."""
    for name in rds_model().shape_names:
        shape = rds_model().shape_for(name)
        error = shape.metadata.get("error")
        if error and (error.get("code") == code or name == code):
            return error.get("httpStatusCode", 400), error.get("senderFault", True)
    return 400, True


# -- reading a request ------------------------------------------------------------------------------

def decode_params(op, form):
    """*form* ({str: str}, without Action/Version) -> the operation's input as a dict.

    Raises QueryError: InvalidParameterValue for a value of the wrong type or a key the input
    shape has no place for; MissingParameter for a required member left out.
    """
    used = set()
    shape = op.input_shape
    params = _read_structure(shape, "", form, used) if shape is not None else {}
    extra = sorted(k for k in form if k not in used)
    if extra:
        raise QueryError("InvalidParameterValue", f"Unknown parameter {extra[0]} for {op.name}.")
    if shape is not None:
        for name in shape.required_members:
            if name not in params:
                raise QueryError("MissingParameter",
                                 f"The request must contain the parameter {name}")
    return params


def _key(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _read(shape, prefix, form, used):
    kind = shape.type_name
    if kind == "structure":
        value = _read_structure(shape, prefix, form, used)
        return value if value or prefix in form else None
    if kind == "list":
        return _read_list(shape, prefix, form, used)
    if kind == "map":
        raise QueryError("InvalidParameterValue", f"{prefix}: maps are not accepted here")
    if prefix not in form:
        return None
    used.add(prefix)
    return _scalar(shape, prefix, form[prefix])


def _read_structure(shape, prefix, form, used):
    out = {}
    for name, member in shape.members.items():
        value = _read(member, _key(prefix, member.serialization.get("name", name)), form, used)
        if value is not None:
            out[name] = value
    return out


def _read_list(shape, prefix, form, used):
    if shape.serialization.get("flattened"):
        member_name = shape.member.serialization.get("name")
        list_prefix = ".".join(prefix.split(".")[:-1] + [member_name]) if member_name else prefix
    else:
        list_prefix = _key(prefix, shape.member.serialization.get("name", "member"))
    if prefix in form and form[prefix] == "":  # an empty list is sent as "Name="
        used.add(prefix)
        return []
    indexes = set()
    start = list_prefix + "."
    for key in form:
        if key.startswith(start):
            head = key[len(start):].split(".", 1)[0]
            if not head.isdigit() or int(head) < 1:
                raise QueryError("InvalidParameterValue", f"{key}: list index must be 1 or more")
            indexes.add(int(head))
    if not indexes:
        return None
    if sorted(indexes) != list(range(1, max(indexes) + 1)):
        raise QueryError("InvalidParameterValue", f"{list_prefix}: list indexes must be 1..N")
    out = []
    for i in range(1, max(indexes) + 1):
        value = _read(shape.member, f"{list_prefix}.{i}", form, used)
        out.append(value if value is not None else {})
    return out


def _scalar(shape, key, text):
    kind = shape.type_name
    if kind == "string":
        enum = shape.enum if hasattr(shape, "enum") else None
        if enum and text not in enum:
            raise QueryError("InvalidParameterValue",
                             f"{key}: {text!r} is not one of {', '.join(enum)}")
        return text
    if kind in ("integer", "long"):
        try:
            return int(text)
        except ValueError:
            raise QueryError("InvalidParameterValue", f"{key}: {text!r} is not an integer") from None
    if kind == "boolean":
        if text.lower() not in ("true", "false"):
            raise QueryError("InvalidParameterValue", f"{key}: {text!r} is not true or false")
        return text.lower() == "true"
    if kind in ("double", "float"):
        try:
            return float(text)
        except ValueError:
            raise QueryError("InvalidParameterValue", f"{key}: {text!r} is not a number") from None
    if kind == "timestamp":
        try:
            return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise QueryError("InvalidParameterValue", f"{key}: {text!r} is not a timestamp") from None
    if kind == "blob":
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:
            raise QueryError("InvalidParameterValue", f"{key}: not base64") from None
    raise QueryError("InvalidParameterValue", f"{key}: unsupported type {kind}")


# -- writing a response -----------------------------------------------------------------------------

def encode_response(op, result, request_id):
    """The XML document of a successful *op* whose output is *result* (a dict in the output
    shape's member names).  A key the output shape has no member for raises KeyError: the
    shapes we build must match the model, and tests check they do."""
    parts = [f'<{op.name}Response xmlns="{namespace()}">']
    shape = op.output_shape
    if shape is not None:
        wrapper = shape.serialization.get("resultWrapper", f"{op.name}Result")
        parts.append(f"<{wrapper}>")
        _write_members(shape, result or {}, parts)
        parts.append(f"</{wrapper}>")
    parts.append(f"<ResponseMetadata><RequestId>{escape(request_id)}</RequestId></ResponseMetadata>")
    parts.append(f"</{op.name}Response>")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + "".join(parts)).encode("utf-8")


def encode_error(code, message, request_id, sender=True):
    kind = "Sender" if sender else "Receiver"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<ErrorResponse xmlns="{namespace()}">'
            f"<Error><Type>{kind}</Type><Code>{escape(code)}</Code>"
            f"<Message>{escape(message)}</Message></Error>"
            f"<RequestId>{escape(request_id)}</RequestId></ErrorResponse>").encode("utf-8")


def _write_members(shape, value, parts):
    unknown = [k for k in value if k not in shape.members]
    if unknown:
        raise KeyError(f"{shape.name} has no member {unknown[0]}")
    for name, member in shape.members.items():
        if name in value and value[name] is not None:
            _write(member, member.serialization.get("name", name), value[name], parts)


def _write(shape, tag, value, parts):
    kind = shape.type_name
    if kind == "structure":
        parts.append(f"<{tag}>")
        _write_members(shape, value, parts)
        parts.append(f"</{tag}>")
    elif kind == "list":
        member_tag = shape.member.serialization.get("name", "member")
        if shape.serialization.get("flattened"):
            for item in value:
                _write(shape.member, member_tag, item, parts)
        else:
            parts.append(f"<{tag}>")
            for item in value:
                _write(shape.member, member_tag, item, parts)
            parts.append(f"</{tag}>")
    elif kind == "boolean":
        parts.append(f"<{tag}>{'true' if value else 'false'}</{tag}>")
    elif kind == "timestamp":
        if isinstance(value, (int, float)):
            value = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        text = value.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        parts.append(f"<{tag}>{text}</{tag}>")
    elif kind in ("integer", "long"):
        parts.append(f"<{tag}>{int(value)}</{tag}>")
    else:
        parts.append(f"<{tag}>{escape(str(value))}</{tag}>")
