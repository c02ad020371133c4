"""IAM identity-policy evaluation: does a principal's policy set allow an action on a resource?

The rules are IAM's for identity-based policies: every statement whose Action and Resource
match is considered; an explicit ``Deny`` wins over any ``Allow``; with neither, the request is
implicitly denied.  ``Action``/``NotAction`` match case-insensitively, ``Resource``/``NotResource``
case-sensitively, both with the wildcards ``*`` (any run of characters) and ``?`` (one character).
A resource wildcard does not cross the colons between an ARN's first six segments (partition,
service, region, account); inside the resource part (after the fifth colon) it matches anything.

Documents are validated when the configuration is loaded (`parse_policy`), so a typo fails the
start with the key path instead of silently granting or withholding access.  ``Condition`` is
refused rather than ignored: ignoring a condition would grant more than the policy says.
"""

import enum
import re
from dataclasses import dataclass
from typing import Tuple


class PolicyError(Exception):
    """A policy document is malformed or uses something this evaluator does not support."""


class Decision(enum.Enum):
    ALLOW = "allow"
    EXPLICIT_DENY = "explicit-deny"
    IMPLICIT_DENY = "implicit-deny"

    @property
    def allowed(self):
        return self is Decision.ALLOW


_VERSIONS = ("2012-10-17", "2008-10-17")
_STATEMENT_KEYS = {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource"}


def _wildcard_regex(pattern, ignore_case):
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


class _ActionPattern:
    __slots__ = ("text", "_re")

    def __init__(self, text):
        if text != "*" and ":" not in text:
            raise PolicyError(f"action {text!r} must be 'service:action' or '*'")
        self.text = text
        self._re = _wildcard_regex(text, ignore_case=True)

    def matches(self, action):
        return self._re.fullmatch(action) is not None


class _ResourcePattern:
    """An ARN pattern matched segment by segment (see the module docstring)."""

    __slots__ = ("text", "_segments")

    def __init__(self, text):
        self.text = text
        if text == "*":
            self._segments = None
            return
        segments = text.split(":", 5)
        if len(segments) != 6 or segments[0] != "arn":
            raise PolicyError(f"resource {text!r} must be an ARN (arn:partition:service:region:account:resource) or '*'")
        self._segments = tuple(_wildcard_regex(s, ignore_case=False) for s in segments)

    def matches(self, arn):
        if self._segments is None:
            return True
        parts = arn.split(":", 5)
        if len(parts) != 6:
            return False
        return all(rx.fullmatch(part) is not None for rx, part in zip(self._segments, parts))


def _strings(node, where):
    if isinstance(node, str):
        return (node,)
    if isinstance(node, list) and node and all(isinstance(v, str) for v in node):
        return tuple(node)
    raise PolicyError(f"{where} must be a string or a non-empty list of strings")


@dataclass(frozen=True)
class Statement:
    effect: str  # "Allow" | "Deny"
    actions: Tuple[_ActionPattern, ...]
    not_actions: bool
    resources: Tuple[_ResourcePattern, ...]
    not_resources: bool
    sid: str = ""

    def applies(self, action, resource):
        hit = any(p.matches(action) for p in self.actions)
        if hit == self.not_actions:
            return False
        hit = any(p.matches(resource) for p in self.resources)
        return hit != self.not_resources


@dataclass(frozen=True)
class Policy:
    statements: Tuple[Statement, ...]


def _statement(node, where):
    if not isinstance(node, dict):
        raise PolicyError(f"{where} must be a mapping")
    if "Condition" in node:
        raise PolicyError(f"{where}.Condition: conditions are not supported (refused rather than ignored)")
    if "Principal" in node or "NotPrincipal" in node:
        raise PolicyError(f"{where}: Principal belongs in resource policies, not in an identity policy")
    unknown = set(node) - _STATEMENT_KEYS
    if unknown:
        raise PolicyError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(_STATEMENT_KEYS))})")
    effect = node.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyError(f"{where}.Effect must be Allow or Deny")
    if ("Action" in node) == ("NotAction" in node):
        raise PolicyError(f"{where}: exactly one of Action and NotAction is required")
    if ("Resource" in node) == ("NotResource" in node):
        raise PolicyError(f"{where}: exactly one of Resource and NotResource is required")
    akey = "Action" if "Action" in node else "NotAction"
    rkey = "Resource" if "Resource" in node else "NotResource"
    sid = node.get("Sid", "")
    if not isinstance(sid, str):
        raise PolicyError(f"{where}.Sid must be a string")
    return Statement(
        effect=effect,
        actions=tuple(_ActionPattern(a) for a in _strings(node[akey], f"{where}.{akey}")),
        not_actions=akey == "NotAction",
        resources=tuple(_ResourcePattern(r) for r in _strings(node[rkey], f"{where}.{rkey}")),
        not_resources=rkey == "NotResource",
        sid=sid,
    )


def parse_policy(document, where="Policy"):
    """An IAM policy document (a dict, as YAML/JSON gives it) -> Policy; raises PolicyError."""
    if not isinstance(document, dict):
        raise PolicyError(f"{where} must be a policy document (a mapping)")
    unknown = set(document) - {"Version", "Id", "Statement"}
    if unknown:
        raise PolicyError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    version = document.get("Version", "2008-10-17")
    if version not in _VERSIONS:
        raise PolicyError(f"{where}.Version must be one of {', '.join(_VERSIONS)}")
    statements = document.get("Statement")
    if isinstance(statements, dict):
        statements = [statements]
    if not isinstance(statements, list) or not statements:
        raise PolicyError(f"{where}.Statement must be a statement or a non-empty list of statements")
    return Policy(tuple(_statement(s, f"{where}.Statement[{i}]") for i, s in enumerate(statements)))


def evaluate(policies, action, resource):
    """-> Decision for *action* (``service:Action``) on *resource* (an ARN) under *policies*."""
    allowed = False
    for policy in policies:
        for st in policy.statements:
            if st.applies(action, resource):
                if st.effect == "Deny":
                    return Decision.EXPLICIT_DENY
                allowed = True
    return Decision.ALLOW if allowed else Decision.IMPLICIT_DENY
