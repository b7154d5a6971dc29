"""The provider's schema (schema.json), and the type checks it implies.

Every input is first held to the type the schema gives it, at its exact path
(`nixOptions[0].value`, `connection.proxy.port`), so that a value of the wrong
JSON type is a Check failure naming that property however deep it sits; the
rules beyond types (ranges, formats, combinations) are the declaration's
(`engine.declaration`), and a key the schema does not declare is refused last.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.declaration.checks import Failures
from ..engine.declaration.values import kind_of
from .properties import UNKNOWN, Secret, reveal

SCHEMA_PATH = Path(os.environ.get("PULUMI_NIXOS_SCHEMA", Path(__file__).resolve().parents[3] / "schema.json"))
TYPE_REF = "#/types/"
MACHINE = "nixos:index:NixosMachine"
PROFILE = "nixos:index:NixProfile"


@functools.cache
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())  # type: ignore[no-any-return]


def input_properties(type_token: str) -> dict[str, Any]:
    return schema()["resources"][type_token]["inputProperties"]  # type: ignore[no-any-return]


_WHAT = {"string": "a string", "integer": "a whole number", "number": "a number", "boolean": "true or false",
         "array": "a list", "object": "an object"}


def _fits(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return kind == "number" or float(value).is_integer()
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


def held_to(type_token: str, news: dict[str, Any], rules: Callable[[dict[str, Any], Failures], Any]) -> Failures:
    """A resource's inputs held to their types first, then (revealed) to the declaration's rules, then every key
    the schema does not declare refused: last, since a rule that knows why a key has no place there says it
    better. One reason per property."""
    plain = reveal(news)
    types, unknown = _findings(type_token, plain)
    f = Failures()
    f.add_all(types)
    rules(plain, f)
    f.add_all(unknown)
    return f


def unknown_keys(type_token: str, value: Any, *, owner: str | None = None) -> list[tuple[str, str]]:
    """(property path, reason) for each key the schema does not declare, at any depth (`connection.prot`): a typo
    is refused, never ignored. `type_token` is a resource, or a type of `#/types/` (owner: the value's path; a
    value that is not an object is the type check's to report)."""
    return _findings(type_token, value, owner=owner)[1]


def _findings(type_token: str, value: Any, *, owner: str | None = None) -> tuple[list[tuple[str, str]],
                                                                              list[tuple[str, str]]]:
    """One walk of a resource's inputs (or of one value of a type): (wrong types, unknown keys)."""
    types: list[tuple[str, str]] = []
    unknown: list[tuple[str, str]] = []
    if owner is not None:
        _walk({"$ref": TYPE_REF + type_token}, value, owner, types, unknown)
        return types, unknown
    props = input_properties(type_token)
    _report_unknown(value, props, "", type_token, unknown)
    for name, item in value.items():
        if name in props:
            _walk(props[name], item, name, types, unknown)
    return types, unknown


def _report_unknown(value: dict[str, Any], fields: dict[str, Any], path: str, token: str,
                    out: list[tuple[str, str]]) -> None:
    # A type's property described as "Output only" is set by the provider (SecretFile.contentHash), never an input.
    known = [k for k, spec in fields.items() if not spec.get("description", "").startswith("Output only")]
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"it has {', '.join(f'`{k}`' for k in sorted(known))}"
            out.append((f"{path}.{key}" if path else str(key),
                        f"is not a property of {token.rsplit(':', 1)[-1]} ({hint})"))


def _walk(spec: dict[str, Any], value: Any, path: str, out: list[tuple[str, str]],
          unknown: list[tuple[str, str]]) -> None:
    if isinstance(value, Secret):
        value = value.value
    if value is None or value is UNKNOWN:
        return
    ref = spec.get("$ref", "")
    if ref and not ref.startswith(TYPE_REF):
        return  # pulumi.json#/Any (the items of `triggers`): any value
    kind = "object" if ref else str(spec.get("type", ""))
    if kind not in _WHAT:
        return
    if not _fits(kind, value):
        out.append((path, f"must be {_WHAT[kind]}, not {kind_of(value)}"))
        return
    if ref.startswith(TYPE_REF):
        token = ref[len(TYPE_REF):]
        fields = schema()["types"][token].get("properties", {})
        _report_unknown(value, fields, path, token, unknown)
        for key, item in value.items():
            if key in fields:
                _walk(fields[key], item, f"{path}.{key}", out, unknown)
    elif kind == "array" and "items" in spec:
        for i, item in enumerate(value):
            _walk(spec["items"], item, f"{path}[{i}]", out, unknown)
    elif kind == "object" and "additionalProperties" in spec:
        for key, item in value.items():
            _walk(spec["additionalProperties"], item, f"{path}[{json.dumps(key)}]", out, unknown)
