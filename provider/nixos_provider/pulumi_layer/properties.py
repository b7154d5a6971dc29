"""Pulumi property values <-> plain Python values.

Secrets arrive (we accept them) as signature objects; they become `Secret`
wrappers so the code that builds outputs can keep them secret. Unknowns
(previews with computed inputs) become the declaration's `UNKNOWN`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict

from ..engine.declaration.values import UNKNOWN as UNKNOWN

SIG_KEY = "4dabf18193072939515e22adb298388d"
SECRET_SIG = "1b47061264138c4ac30d75fd1eb44270"
UNKNOWN_STR = "04da6b54-80e4-46f7-96ec-b56ff0331ba9"


@dataclass(frozen=True)
class Secret:
    value: Any

    def __repr__(self) -> str:  # never print the value
        return "Secret(****)"


def _secret_leaves(value: Any) -> Any:
    """A secret object or list becomes one whose every leaf is secret, so code can read its fields."""
    if isinstance(value, dict):
        return {k: _secret_leaves(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_secret_leaves(v) for v in value]
    if isinstance(value, Secret) or value is UNKNOWN or value is None:
        return value
    return Secret(value)


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get(SIG_KEY) == SECRET_SIG:
            # SDKs mark a whole object secret when one of its fields is (e.g. a
            # `connection` with a secret privateKey).
            return _secret_leaves(decode(value.get("value")))
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    if value == UNKNOWN_STR:
        return UNKNOWN
    return value


def from_struct(s: struct_pb2.Struct | None) -> dict[str, Any]:
    if s is None:
        return {}
    return decode(MessageToDict(s, preserving_proto_field_name=True))  # type: ignore[no-any-return]


def encode(value: Any) -> Any:
    if isinstance(value, Secret):
        return {SIG_KEY: SECRET_SIG, "value": encode(value.value)}
    if value is UNKNOWN:
        return UNKNOWN_STR
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(encode(value))
    return s


def reveal(value: Any) -> Any:
    """Strip Secret wrappers (for values handed to the engine, never to logs)."""
    if isinstance(value, Secret):
        return reveal(value.value)
    if isinstance(value, dict):
        return {k: reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [reveal(v) for v in value]
    return value


def marked_as(value: Any, given: Any) -> Any:
    """value (the engine's answer, worked out from given revealed) with each part secret where given's part at the
    same place was: what the program marked secret stays secret."""
    if isinstance(given, Secret):
        return value if value is None or value is UNKNOWN or isinstance(value, Secret) else Secret(value)
    if isinstance(value, dict) and isinstance(given, dict):
        return {k: marked_as(v, given.get(k)) for k, v in value.items()}
    if isinstance(value, list) and isinstance(given, list):
        return [marked_as(v, given[i] if i < len(given) else None) for i, v in enumerate(value)]
    return value


def without_secrets(text: str, value: Any) -> str:
    """text with every string the program marked secret in value taken out, whole, quoted or quoted and cut short as
    an error message cuts a long value (strings under 3 characters would take out more than the secret)."""
    found: set[str] = set()
    _secret_strings(value, False, found)
    for secret in sorted((s for s in found if len(s) >= 3), key=len, reverse=True):
        for form in (repr(secret), repr(secret)[:80], secret):
            text = text.replace(form, "[secret]")
    return text


def _secret_strings(value: Any, inside: bool, out: set[str]) -> None:
    if isinstance(value, Secret):
        _secret_strings(value.value, True, out)
    elif isinstance(value, dict):
        for v in value.values():
            _secret_strings(v, inside, out)
    elif isinstance(value, list):
        for v in value:
            _secret_strings(v, inside, out)
    elif inside and isinstance(value, str):
        out.add(value)


def is_secret(value: Any) -> bool:
    """Whether any part of the value is a secret."""
    if isinstance(value, Secret):
        return True
    if isinstance(value, dict):
        return any(is_secret(v) for v in value.values())
    if isinstance(value, list):
        return any(is_secret(v) for v in value)
    return False
