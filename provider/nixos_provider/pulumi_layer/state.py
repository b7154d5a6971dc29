"""A resource's state, typed: its checked inputs and the engine's record, to and from Pulumi properties.

Every property a resource hands back to Pulumi (Create's, Update's, a preview's, a partial failure's, Read's) is
made by `to_properties()`; `from_properties()` reads recorded state back, secrets still wrapped (the engine's side
reads it revealed, with `engine.resources.records`). Secrecy is applied in `to_properties()` (as
Check applies it to the inputs it records), from what `secrecy` declares: the fields schema.json marks secret, the
record fields that are keys; so no code path can forget it. What a preview cannot know yet is Pulumi's unknown.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self

from ..engine.declaration import input_rules
from ..engine.lifecycle.models import MachineRecord, ProfileRecord
from ..engine.resources.records import R, properties_of, property_name, record_of
from .properties import UNKNOWN, Secret, reveal
from .schema import MACHINE, PROFILE
from .secrecy import SECRET_RECORD_FIELDS, secret_fields

SECRET_RECORD_PROPERTIES = frozenset(property_name(name) for name in SECRET_RECORD_FIELDS)


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
        for name, value in properties_of(self.record).items():
            if name in self.unknown:
                value = UNKNOWN
            elif value is not None and name in SECRET_RECORD_PROPERTIES:
                value = Secret(value)
            props[name] = value
        return props

    @classmethod
    def record_of(cls, props: Mapping[str, Any]) -> R:
        """The record part of recorded state (or of any properties: inputs are ignored)."""
        return typing.cast(R, record_of(cls.RECORD, reveal(dict(props))))

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
