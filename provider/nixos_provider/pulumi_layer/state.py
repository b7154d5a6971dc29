"""A resource's state, typed: its checked inputs and the engine's record, to and from Pulumi properties.

Every property a resource hands back to Pulumi (Create's, Update's, a preview's, a partial failure's, Read's) is
made by `to_properties()`, and every recorded state is read by `from_properties()`. Secrecy is applied there (as
Check applies it to the inputs it records), from what `secrecy` declares: the fields schema.json marks secret, the
record fields that are keys; so no code path can forget it. A record field's property is its name in camelCase (`system_path` ->
`systemPath`).
"""

from __future__ import annotations

import base64
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

from ..engine.declaration import input_rules
from ..engine.declaration.conversion import recorded_files, secret_files_output
from ..engine.lifecycle.models import MachineRecord, ProfileRecord
from .properties import UNKNOWN, Secret, reveal
from .schema import MACHINE, PROFILE
from .secrecy import SECRET_RECORD_FIELDS, secret_fields

R = TypeVar("R", MachineRecord, ProfileRecord)


def property_name(field_name: str) -> str:
    head, *rest = field_name.split("_")
    return head + "".join(w.capitalize() for w in rest)


def _record_value(value: Any) -> Any:
    """A record field's value as a property: files as their records, keys as base64 text."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, tuple):
        return secret_files_output(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _int(value: Any) -> int | None:
    plain = reveal(value)
    return int(plain) if isinstance(plain, (int, float)) and not isinstance(plain, bool) else None


def _str(value: Any) -> str | None:
    plain = reveal(value)
    return plain if isinstance(plain, str) and plain else None


def _bool(value: Any) -> bool | None:
    plain = reveal(value)
    return plain if isinstance(plain, bool) else None


def _key(value: Any) -> bytes | None:
    plain = reveal(value)
    return base64.b64decode(plain) if isinstance(plain, str) and plain else None


def _mapping(value: Any) -> Mapping[str, Any] | None:
    plain = reveal(value)
    return dict(plain) if isinstance(plain, dict) else None


# How each type a record field has is read back from state (numbers come back as floats, secrets wrapped).
_READERS: dict[str, Any] = {
    "int | None": _int, "str | None": _str, "bool | None": _bool, "bytes | None": _key,
    "tuple[RecordedFile, ...]": lambda value: recorded_files(reveal(value)), "Mapping[str, Any] | None": _mapping,
}


@dataclass(frozen=True)
class State(Generic[R]):
    """Inputs (as Check recorded them) and the record of what the host runs.

    unknown: the record's properties a preview cannot know until the update runs.
    """

    inputs: Mapping[str, Any]
    record: R
    unknown: frozenset[str] = field(default=frozenset())

    RECORD: ClassVar[type[Any]]
    INPUTS: ClassVar[tuple[str, ...]]
    TOKEN: ClassVar[str]

    def to_properties(self) -> dict[str, Any]:
        props = secret_fields(dict(self.inputs), self.TOKEN)
        for f in dataclasses.fields(self.record):
            name = property_name(f.name)
            value = _record_value(getattr(self.record, f.name))
            if name in self.unknown:
                value = UNKNOWN
            elif value is not None and f.name in SECRET_RECORD_FIELDS:
                value = Secret(value)
            props[name] = value
        return props

    @classmethod
    def record_of(cls, props: Mapping[str, Any]) -> R:
        """The record part of recorded state (or of any properties: inputs are ignored)."""
        hints = {f.name: str(f.type) for f in dataclasses.fields(cls.RECORD)}
        return typing.cast(R, cls.RECORD(**{
            name: _READERS[kind](props.get(property_name(name))) for name, kind in hints.items()}))

    @classmethod
    def inputs_of(cls, props: Mapping[str, Any]) -> dict[str, Any]:
        return {k: props[k] for k in cls.INPUTS if k in props}

    @classmethod
    def from_properties(cls, props: Mapping[str, Any]) -> Self:
        """Recorded state (inputs and outputs, as the engine hands them back) as a typed state."""
        return cls(cls.inputs_of(props), cls.record_of(props))


class MachineState(State[MachineRecord]):
    RECORD = MachineRecord
    INPUTS = tuple(input_rules.MACHINE_INPUTS)
    TOKEN = MACHINE


class ProfileState(State[ProfileRecord]):
    RECORD = ProfileRecord
    INPUTS = tuple(input_rules.PROFILE_INPUTS)
    TOKEN = PROFILE


# Every property of a record: what a preview of a new resource cannot know.
MACHINE_RECORD = frozenset(property_name(f.name) for f in dataclasses.fields(MachineRecord))
PROFILE_RECORD = frozenset(property_name(f.name) for f in dataclasses.fields(ProfileRecord))
