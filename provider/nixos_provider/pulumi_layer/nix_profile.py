"""nixos:index:NixProfile: any Nix profile on a host (deploy-rs's multi-profile idea)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..engine.declaration import input_rules
from ..engine.declaration.typed_inputs import ProfileInputs
from ..engine.errors import EngineError
from ..engine.lifecycle.models import ProfileGoal, ProfileRecord
from ..engine.models import Profile
from . import normalized, secrecy
from .engine_calls import fleet_source
from .properties import contains_unknown, reveal
from .resource import (
    CheckFailed,
    DeployedResource,
    DiffResult,
    build_host_key,
    diff_inputs,
    same,
    same_machine,
)
from .schema import PROFILE, held_to
from .state import PROFILE_RECORD, ProfileState

TYPE = PROFILE
INPUT_KEYS = input_rules.PROFILE_INPUTS
DEPLOY_KEYS = ["storePath", "activate", "triggers"]
# The outputs besides the profile's path and store path.
COMPUTED = sorted(PROFILE_RECORD - {"profilePath", "storePath"})
# What a deployment changes, so a preview cannot know it.
DEPLOYED = frozenset({"generation", "previousGeneration", "deployedAt", "pushedPaths", "pushedBytes",
                      "substitutedPaths"})


def _with_store_path(record: ProfileRecord, news: dict[str, Any]) -> tuple[ProfileRecord, set[str]]:
    """A preview's record: the store path Check evaluated, and the properties that leaves unknown."""
    path = news.get("storePath")
    return replace(record, store_path=path if isinstance(path, str) else None), (
        set() if isinstance(path, str) else {"storePath"})


def resolve_profile_path(props: dict[str, Any], ssh_user: str) -> str:
    if props.get("profilePath"):
        return str(props["profilePath"])
    user = props.get("user") or ssh_user
    return f"/nix/var/nix/profiles/per-user/{user}/{props['profile']}"


class NixProfile(DeployedResource):

    def _profile(self, props: dict[str, Any]) -> Profile:
        remote = self._remote(props)
        return Profile(str(props["profilePath"]), props.get("user") or None) if props.get("profilePath") else Profile(
            resolve_profile_path(props, remote.user), props.get("user") or None)

    async def check(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> dict[str, Any]:
        f = held_to(TYPE, news, input_rules.profile_failures)
        if f:
            raise CheckFailed(f)
        checked = dict(news)
        checked["connection"] = normalized.normalize_connection(checked.get("connection"), self.ctx.default_user)
        checked.setdefault("onDestroy", "rollback")
        # Credentials are secret in state whether or not the program said so.
        checked = secrecy.secret_fields(checked, TYPE)
        if news.get("flake") is not None:
            checked["storePath"] = await self._resolve_source(urn, news, nixos=False)
        return checked

    def diff(self, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        keys = [k for k in INPUT_KEYS if k not in ("profile", "profilePath", "user")]
        result = diff_inputs(olds, news, keys, [("connection", "host"), ("connection", "port")], DEPLOY_KEYS)
        # Which profile this is: compare resolved paths, since `profile` + `user`
        # and `profilePath` can name the same one.
        if not contains_unknown([news.get("profile"), news.get("profilePath"), news.get("user"), news.get("connection")]):
            new_path = resolve_profile_path(news, str(reveal(news["connection"]).get("user") or "root"))
            if olds.get("profilePath") and new_path != olds["profilePath"]:
                result.replaces.append("profilePath")
                result.detailed["profilePath"] = "UPDATE_REPLACE"
                result.delete_before_replace = same_machine(olds, news)
            elif (news.get("user") or None) != (olds.get("user") or None):
                result.detailed["user"] = "UPDATE"
        return result

    @staticmethod
    def needs_deploy(olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return any(not same(olds.get(k), news.get(k)) for k in DEPLOY_KEYS) or contains_unknown(news.get("storePath"))

    def _ident(self, props: dict[str, Any]) -> str:
        remote = self._remote(props)
        return f"{remote.host}:{remote.port}:{self._profile(props).path}"

    async def create(self, urn: str, news: dict[str, Any], preview: bool) -> tuple[str, dict[str, Any]]:
        if preview:
            path = news.get("profilePath")
            record, unknown = _with_store_path(ProfileRecord(profile_path=path if isinstance(path, str) else None), news)
            unknown |= set(COMPUTED) | (set() if isinstance(path, str) else {"profilePath"})
            return "", ProfileState(news, record, frozenset(unknown)).to_properties()
        p = ProfileInputs.parse(reveal(news))
        return self._ident(news), await self._converge(urn, self._ident(news), p, None, news, {}, pinned=None)

    async def update(self, urn: str, ident: str, olds: dict[str, Any], news: dict[str, Any], preview: bool,
                     ) -> dict[str, Any]:
        deploys = self.needs_deploy(olds, news)
        pinned = reveal(news["connection"]).get("hostKey") or olds.get("hostKey")
        if preview:
            key = build_host_key(olds, news.get("buildHost"))
            record = replace(ProfileState.record_of(olds), host_key=pinned, build_host_key=key)
            if not deploys:
                return ProfileState(news, record).to_properties()
            record, unknown = _with_store_path(record, news)
            if news.get("buildHost") is not None and not key:
                unknown.add("buildHostKey")  # pinned by the deployment
            return ProfileState(news, record, frozenset(unknown | DEPLOYED)).to_properties()
        return await self._converge(urn, ident, ProfileInputs.parse(reveal(news)), ProfileState.record_of(olds), news, olds,
                                    pinned=pinned, deploys=deploys)

    async def _converge(self, urn: str, ident: str, p: ProfileInputs, recorded: ProfileRecord | None,
                        news: dict[str, Any], olds: dict[str, Any], *, pinned: str | None,
                        deploys: bool = True) -> dict[str, Any]:
        """The engine's converge, its record as properties; its failure as a PartialFailure with what runs now."""
        nix = self._deploy_nix(p.settings)
        builder_key = build_host_key(olds, p.build_host)
        request = p.settings.request(self._remote_of(p.connection, host_key=pinned), self._profile(news),
                                     activate_command=p.activate)
        goal = ProfileGoal(request, fleet_source(self.ctx, urn, p.closure, nix, nixos=False),
                           build_host=None if p.build_host is None else self._remote_of(p.build_host, builder_key),
                           build_host_key=builder_key, build_on_target=p.build_on_target, deploys=deploys)
        converging = self.ctx.engine.converge_profile(goal, recorded, nix, self.ctx.report(urn))
        return await self._recorded(urn, ident, ProfileState, converging, recorded, news, olds,
                                    goal.request.profile.path)

    async def read(self, urn: str, ident: str, state: dict[str, Any], inputs: dict[str, Any],
                   ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        props = {**inputs, **state}
        if not props.get("connection"):
            parts = ident.split(":", 2)
            if len(parts) != 3 or not parts[2].startswith("/"):
                raise EngineError(f"cannot import NixProfile {ident!r}: the ID is host:port:/profile/path")
            props = {"connection": {"host": parts[0], "port": int(parts[1]), "user": self.ctx.default_user or "root"},
                     "profilePath": parts[2]}
        remote = self._remote(props, host_key=state.get("hostKey"))
        profile = Profile(str(props.get("profilePath") or self._profile(props).path), props.get("user") or None)
        recorded = ProfileState.from_properties(props)
        record = await self.ctx.engine.refresh_profile(remote, profile, recorded.record, importing=not state)
        inputs_now = dict(recorded.inputs)
        if not state:
            inputs_now.setdefault("onDestroy", "rollback")
        outputs = ProfileState(inputs_now, record).to_properties()
        new_inputs = inputs or {k: outputs[k] for k in ("connection", "profilePath", "storePath", "onDestroy")
                                if outputs.get(k) is not None}
        return f"{remote.host}:{remote.port}:{profile.path}", outputs, new_inputs

    async def delete(self, urn: str, ident: str, state: dict[str, Any]) -> None:
        recorded = ProfileState.from_properties(state)
        inputs, record = reveal(dict(recorded.inputs)), recorded.record
        if inputs.get("onDestroy") == "retain":
            self.ctx.info(urn, "onDestroy is `retain`: leaving the profile as it is")
            return
        profile = Profile(str(record.profile_path), inputs.get("user") or None)
        if self.ctx.replaced_in_place(urn, record.host_key, profile.path):
            self.ctx.info(urn, "its replacement manages the same profile on the same machine (the same host key): "
                               "leaving what the replacement deployed")
            return
        await self.ctx.engine.destroy_profile(
            self._remote_of(inputs["connection"], record.host_key), profile, record,
            remove=inputs.get("onDestroy") == "remove", activate_command=inputs.get("activate") or None,
            report=self.ctx.report(urn))
