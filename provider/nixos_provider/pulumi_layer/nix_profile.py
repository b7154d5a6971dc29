"""nixos:index:NixProfile: any Nix profile on a host (deploy-rs's multi-profile idea)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..engine.errors import DeployError, EngineError
from ..engine.lazy import lazy_module
from ..engine.models import Profile
from . import input_rules, normalized, secrecy
from .engine_calls import build_closure, deploy_request, deployed_outputs, run_deploy
from .error_text import describe
from .properties import UNKNOWN, contains_unknown, reveal
from .resource import CheckFailed, DeployedResource, DiffResult, PartialFailure, diff_inputs, same, same_machine
from .typed_inputs import ProfileInputs, RecordedProfile

if TYPE_CHECKING:
    from ..engine import deploy as engine
else:
    engine = lazy_module("nixos_provider.engine.deploy")

TYPE = input_rules.PROFILE
INPUT_KEYS = input_rules.PROFILE_INPUTS
DEPLOY_KEYS = ["storePath", "activate", "triggers"]
COMPUTED = ["generation", "previousGeneration", "baselineGeneration", "baselineStorePath", "hostKey", "deployedAt",
            "pushedPaths", "pushedBytes", "substitutedPaths"]


def _now_running(failed: dict[str, Any], e: DeployError) -> dict[str, Any]:
    """After a failed deployment: the profile's generation the engine left in place (0: none)."""
    return {**failed, "storePath": e.now_running, "generation": e.generation or 0}


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
        f = input_rules.profile_failures(news)
        if f:
            raise CheckFailed(f)
        checked = dict(news)
        # Credentials are secret in state whether or not the program said so.
        connection = normalized.normalize_connection(checked.get("connection"), self.ctx.default_user)
        checked["connection"] = secrecy.secret_connection(connection)
        checked.setdefault("onDestroy", "rollback")
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
            out = {**news, "connection": secrecy.secret_connection(news["connection"])}
            out.update({k: UNKNOWN for k in COMPUTED})
            out["profilePath"] = news.get("profilePath") or UNKNOWN
            return "", out
        inputs = ProfileInputs.parse(news)
        remote = self._remote(news)
        profile = self._profile(news)
        async with self.ctx.ssh_slots:
            baseline = await engine.read_state(remote, profile)
        self.ctx.created_on[urn] = (baseline.host_key, profile.path)
        base = {
            **news,
            "connection": secrecy.secret_connection(news["connection"]),
            "profilePath": profile.path,
            "hostKey": baseline.host_key,
            "baselineGeneration": baseline.generation.number if baseline.generation else 0,
            "baselineStorePath": baseline.generation.store_path if baseline.generation else None,
            "storePath": baseline.generation.store_path if baseline.generation else None,
            "generation": baseline.generation.number if baseline.generation else 0,
        }
        ident = self._ident(news)
        return ident, await self._deploy(urn, ident, base, inputs, baseline.host_key)

    async def update(self, urn: str, ident: str, olds: dict[str, Any], news: dict[str, Any], preview: bool,
                     ) -> dict[str, Any]:
        deploys = self.needs_deploy(olds, news)
        base = {**{k: olds.get(k) for k in COMPUTED}, **news, "storePath": olds.get("storePath"),
                "profilePath": olds.get("profilePath"), "connection": secrecy.secret_connection(news["connection"])}
        pinned = reveal(news["connection"]).get("hostKey") or olds.get("hostKey")
        base["hostKey"] = pinned
        if preview:
            if deploys:
                base.update({"storePath": news.get("storePath"), "generation": UNKNOWN, "deployedAt": UNKNOWN,
                             "pushedPaths": UNKNOWN, "pushedBytes": UNKNOWN, "substitutedPaths": UNKNOWN,
                             "previousGeneration": UNKNOWN})
            return base
        if not deploys:
            return base
        # If the deploy fails, the engine keeps the old inputs: the recorded
        # outputs must then describe the old configuration plus what runs now.
        kept = {**olds, "connection": secrecy.secret_connection(olds.get("connection")), "hostKey": pinned}
        return await self._deploy(urn, ident, base, ProfileInputs.parse(news), pinned, kept)

    async def _deploy(self, urn: str, ident: str, base: dict[str, Any], p: ProfileInputs,
                      pinned: str | None, kept: dict[str, Any] | None = None) -> dict[str, Any]:
        """Deploy the inputs; on failure raise PartialFailure with `kept` (or base) updated to what runs."""
        failed = kept if kept is not None else base
        remote = self._remote_of(p.connection, host_key=pinned)
        nix = self._deploy_nix(p.settings)
        try:
            store_path = await build_closure(self.ctx, urn, nix, p.closure, nixos=False)
        except EngineError as e:
            raise PartialFailure(describe(e), ident, failed, p.raw) from e
        req = deploy_request(remote, store_path, self._profile(p.raw), p.settings, activate_command=p.activate,
                             baseline=base.get("baselineGeneration"))
        result = await run_deploy(self.ctx, urn, req, nix, ident=ident, inputs=p.raw, failed=failed,
                                  after_failure=_now_running)
        return {**base, **deployed_outputs(result, "storePath", pinned)}

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
        async with self.ctx.ssh_slots:
            now = await engine.read_state(remote, profile)
        outputs = {**props, "connection": secrecy.secret_connection(props["connection"]), "profilePath": profile.path,
                   "storePath": now.generation.store_path if now.generation else None,
                   "generation": now.generation.number if now.generation else 0, "hostKey": now.host_key}
        if not state:
            outputs["baselineGeneration"] = outputs["generation"]
            outputs["baselineStorePath"] = outputs["storePath"]
            outputs.setdefault("onDestroy", "rollback")
        new_inputs = inputs or {k: outputs[k] for k in ("connection", "profilePath", "storePath", "onDestroy")
                                if outputs.get(k) is not None}
        return f"{remote.host}:{remote.port}:{profile.path}", outputs, new_inputs

    async def delete(self, urn: str, ident: str, state: dict[str, Any]) -> None:
        recorded = RecordedProfile.parse(state)
        if recorded.on_destroy == "retain":
            self.ctx.info(urn, "onDestroy is `retain`: leaving the profile as it is")
            return
        if self.ctx.replaced_in_place(urn, recorded.host_key, recorded.profile.path):
            self.ctx.info(urn, "its replacement manages the same profile on the same machine (the same host key): "
                               "leaving what the replacement deployed")
            return
        remote = self._remote_of(recorded.connection, recorded.host_key)
        profile, baseline = recorded.profile, recorded.baseline_generation or 0
        async with self.ctx.ssh_slots:
            if recorded.on_destroy == "remove" or baseline == 0:
                self.ctx.status(urn, f"removing {profile.path}")
                await engine.remove_profile(remote, profile)
            else:
                self.ctx.status(urn, f"rolling {profile.path} back to generation {baseline}")
                await engine.rollback_to(remote, profile, baseline, activate_command=recorded.activate,
                                         status=lambda s: self.ctx.status(urn, s),
                                         output=lambda s: self.ctx.info(urn, s), fallback_path=recorded.baseline_path)
