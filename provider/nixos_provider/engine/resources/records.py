"""A record (`lifecycle.models`) as properties, in schema.json's names, and back from recorded state; what refresh
finds.

A record field's property is its name in camelCase (`system_path` -> `systemPath`); files are their records (hashes,
never contents), keys base64 text.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..declaration.conversion import recorded_files, secret_files_output
from ..lifecycle.models import MachineRecord, ProfileRecord

R = TypeVar("R", MachineRecord, ProfileRecord)


def property_name(field_name: str) -> str:
    head, *rest = field_name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def properties_of(record: MachineRecord | ProfileRecord) -> dict[str, Any]:
    """Each field of the record as its property."""
    return {property_name(f.name): _value(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _value(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, tuple):
        return secret_files_output(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _key(value: Any) -> bytes | None:
    return base64.b64decode(value) if isinstance(value, str) and value else None


# How each type a record field has is read back from state (numbers come back as floats).
_READERS: dict[str, Any] = {
    "int | None": _int, "str | None": _str, "bool | None": lambda v: v if isinstance(v, bool) else None,
    "bytes | None": _key, "tuple[RecordedFile, ...]": recorded_files,
    "Mapping[str, Any] | None": lambda v: dict(v) if isinstance(v, dict) else None,
}


def record_of(kind: type[R], props: Mapping[str, Any]) -> R:
    """The record part of recorded state (or of any properties: inputs are ignored)."""
    return kind(**{f.name: _READERS[str(f.type)](props.get(property_name(f.name))) for f in dataclasses.fields(kind)})


@dataclass(frozen=True)
class Refreshed(Generic[R]):
    """What refresh (or import) found: the resource's ID, the inputs its state keeps beside the record, the record,
    and the inputs to record as declared (import: what runs; drift: the running system)."""

    ident: str
    inputs: dict[str, Any]
    record: R
    declared: dict[str, Any]


# Every property of a record: what a preview of a new resource cannot know.
MACHINE_RECORD = frozenset(property_name(f.name) for f in dataclasses.fields(MachineRecord))
PROFILE_RECORD = frozenset(property_name(f.name) for f in dataclasses.fields(ProfileRecord))
