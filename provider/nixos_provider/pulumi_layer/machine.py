"""nixos:index:NixosMachine: one NixOS host kept at the declared system.

A mapper between Pulumi's properties and the engine's side (`engine.resources.machines`), which decides and runs
everything on values revealed: here each answer becomes properties again, secrets marked, a preview's unknowns
Pulumi's.
"""

from __future__ import annotations

from typing import Any

from ..engine.declaration import input_rules
from ..engine.declaration.typed_inputs import SOURCE_KEYS
from ..engine.resources.machines import Machines
from .context import Context
from .properties import marked_as, reveal
from .resource import Changes, CheckFailed, DeclaredResource
from .schema import MACHINE, held_to
from .secrecy import secret_fields
from .state import MachineState

TYPE = MACHINE


class NixosMachine(DeclaredResource):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.machines = Machines(ctx.fleet)

    async def check(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> dict[str, Any]:
        f = held_to(TYPE, news, lambda plain, f: input_rules.machine_failures(plain, self.ctx.fleet.project_dir, f))
        if f:
            raise CheckFailed(f)
        checked = await self.machines.check(reveal(news), plan=self.plan(urn, news, *SOURCE_KEYS))
        # Credentials and file contents are secret in state whether or not the program said so.
        return secret_fields(marked_as(checked, news), TYPE)

    def diff(self, olds: dict[str, Any], news: dict[str, Any]) -> Changes:
        return self.machines.changes(reveal(olds), reveal(news))

    async def create(self, urn: str, news: dict[str, Any], preview: bool) -> tuple[str, dict[str, Any]]:
        plain = reveal(news)
        ident = self.machines.ident(plain)
        if preview:
            record, unknown = self.machines.preview_create(plain, self.ctx.report(urn))
            return ident, MachineState(news, record, unknown).to_properties()
        return ident, await self.recorded(ident, MachineState, self.machines.create(urn, plain, self.ctx.report(urn)),
                                          news, {})

    async def update(self, urn: str, ident: str, olds: dict[str, Any], news: dict[str, Any], preview: bool,
                     ) -> dict[str, Any]:
        if preview:
            record, unknown = await self.machines.preview_update(reveal(olds), reveal(news), self.ctx.report(urn))
            return MachineState(news, record, unknown).to_properties()
        updating = self.machines.update(urn, reveal(olds), reveal(news), self.ctx.report(urn))
        return await self.recorded(ident, MachineState, updating, news, olds)

    async def read(self, urn: str, ident: str, state: dict[str, Any], inputs: dict[str, Any],
                   ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        found = await self.machines.refresh(ident, reveal(state), reveal(inputs), self.ctx.report(urn))
        return self.refreshed(MachineState, found, state, inputs)

    async def delete(self, urn: str, ident: str, state: dict[str, Any]) -> None:
        await self.machines.delete(urn, reveal(state), self.ctx.report(urn))
