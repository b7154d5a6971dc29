"""nixos:index:NixProfile: any Nix profile on a host, a mapper between Pulumi's properties and the engine's side
(`engine.resources.profiles`), as NixosMachine is."""

from __future__ import annotations

from typing import Any

from ..engine.declaration import input_rules
from ..engine.resources.profiles import Profiles
from .context import Context
from .properties import marked_as, reveal
from .resource import Changes, CheckFailed, DeclaredResource
from .schema import PROFILE, held_to
from .secrecy import secret_fields
from .state import ProfileState

TYPE = PROFILE


class NixProfile(DeclaredResource):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.profiles = Profiles(ctx.fleet)

    async def check(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> dict[str, Any]:
        f = held_to(TYPE, news, input_rules.profile_failures)
        if f:
            raise CheckFailed(f)
        checked = await self.profiles.check(reveal(news), plan=self.plan(urn, news, "flake"))
        # Credentials are secret in state whether or not the program said so.
        return secret_fields(marked_as(checked, news), TYPE)

    def diff(self, olds: dict[str, Any], news: dict[str, Any]) -> Changes:
        return self.profiles.changes(reveal(olds), reveal(news))

    async def create(self, urn: str, news: dict[str, Any], preview: bool) -> tuple[str, dict[str, Any]]:
        if preview:
            return "", ProfileState(news, *self.profiles.preview_create(reveal(news))).to_properties()
        ident = self.profiles.ident(reveal(news))
        creating = self.profiles.create(urn, reveal(news), self.ctx.report(urn))
        return ident, await self.recorded(ident, ProfileState, creating, news, {})

    async def update(self, urn: str, ident: str, olds: dict[str, Any], news: dict[str, Any], preview: bool,
                     ) -> dict[str, Any]:
        if preview:
            return ProfileState(news, *self.profiles.preview_update(reveal(olds), reveal(news))).to_properties()
        updating = self.profiles.update(urn, reveal(olds), reveal(news), self.ctx.report(urn))
        return await self.recorded(ident, ProfileState, updating, news, olds)

    async def read(self, urn: str, ident: str, state: dict[str, Any], inputs: dict[str, Any],
                   ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        found = await self.profiles.refresh(ident, reveal(state), reveal(inputs))
        return self.refreshed(ProfileState, found, state, inputs)

    async def delete(self, urn: str, ident: str, state: dict[str, Any]) -> None:
        await self.profiles.delete(urn, reveal(state), self.ctx.report(urn))
