"""What is secret in a resource's state, declared once: the fields schema.json marks `secret` (the declaration the
SDKs read too, at any depth: a connection's proxy), and the record fields that are keys. Check's inputs and
`state.State.to_properties` wrap them; nothing else does."""

from __future__ import annotations

from typing import Any

from .properties import UNKNOWN, Secret
from .schema import TYPE_REF, input_properties, schema

# The record fields kept as secrets (engine.lifecycle.models): the HMAC key of the secret files' hashes.
SECRET_RECORD_FIELDS = frozenset({"secret_files_key"})


def secret_fields(props: dict[str, Any], type_token: str) -> dict[str, Any]:
    """props with every field the schema marks secret wrapped as a secret, however the program passed it."""
    inputs = input_properties(type_token)
    return {k: _wrapped(v, inputs[k]) if k in inputs else v for k, v in props.items()}


def _wrapped(value: Any, spec: dict[str, Any]) -> Any:
    if value is None or value is UNKNOWN:
        return value
    if spec.get("secret"):
        return value if isinstance(value, Secret) else Secret(value)
    ref = spec.get("$ref", "")
    if ref.startswith(TYPE_REF) and isinstance(value, dict):
        fields = schema()["types"][ref[len(TYPE_REF):]].get("properties", {})
        return {k: _wrapped(v, fields[k]) if k in fields else v for k, v in value.items()}
    if spec.get("type") == "array" and isinstance(value, list) and "items" in spec:
        return [_wrapped(v, spec["items"]) for v in value]
    return value
