"""What NixosMachine and NixProfile share: the boundary with the engine's side (`engine.resources`), which works on
values revealed; here its answers get their secrets marked again, and a failure becomes Pulumi's partial failure."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from ..engine.declaration.checks import CheckFailed
from ..engine.lifecycle.models import ConvergeFailed
from ..engine.resources.changes import Changes
from ..engine.resources.records import R, Refreshed
from .context import Context, stack_of
from .properties import is_secret, marked_as
from .secrecy import secret_fields
from .state import State

__all__ = ["Changes", "CheckFailed", "DeclaredResource", "PartialFailure"]


class DeclaredResource:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @staticmethod
    def plan(urn: str, news: dict[str, Any], *source_keys: str) -> str | None:
        """The stack whose evaluations go ahead of its Checks, and remember this one for its next run; None when a
        source or option is a secret (never written down to be evaluated ahead)."""
        return None if any(is_secret(news.get(k)) for k in (*source_keys, "nixOptions")) else stack_of(urn)

    @staticmethod
    async def recorded(ident: str, state: type[State[R]], converging: Awaitable[R], news: dict[str, Any],
                       olds: dict[str, Any]) -> dict[str, Any]:
        """A converge's record as properties, or its failure as a PartialFailure with what runs now (paired with the
        inputs that describe it)."""
        try:
            record = await converging
        except ConvergeFailed as e:
            assert isinstance(e.record, state.RECORD)
            inputs = news if e.with_new_inputs else state.inputs_of(olds)
            raise PartialFailure(str(e), ident, state(inputs, e.record).to_properties(), news) from e
        return state(news, record).to_properties()

    @staticmethod
    def refreshed(state: type[State[R]], found: Refreshed[R], recorded: dict[str, Any],
                  inputs: dict[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """Read's answer: the ID, the outputs, and the inputs, marked secret as Read was given them (and as the schema
        says)."""
        given = {**inputs, **recorded}
        return (found.ident, state(marked_as(found.inputs, given), found.record).to_properties(),
                secret_fields(marked_as(found.declared, inputs), state.TOKEN))


class PartialFailure(Exception):
    """The operation failed, but this is what the machine is now (ErrorResourceInitFailed)."""

    def __init__(self, message: str, resource_id: str, outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
        super().__init__(message)
        self.resource_id = resource_id
        self.outputs = outputs
        self.inputs = inputs
