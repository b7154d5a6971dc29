"""nixos:index:NixosMachine: one NixOS host kept at the declared system.

A mapper between Pulumi's properties and the engine: Check and Diff work on inputs; Create and Update hand the
engine a goal (`engine.lifecycle`) and record what it returns, or what its failure says runs; Read and Delete ask
the engine likewise. The lifecycle itself (install or adopt, build, secret files, deployment, health checks) is
the engine's.
"""

from __future__ import annotations

from typing import Any

from ..engine.declaration import conversion, input_rules
from ..engine.declaration.typed_inputs import Closure, MachineInputs
from ..engine.errors import EngineError
from ..engine.lifecycle.models import MachineGoal, MachineRecord
from ..engine.models import SYSTEM_PROFILE, Profile, Remote
from . import normalized, secrecy
from .engine_calls import fleet_source
from .machine_preview import CHANGE_REPORTS, COMPUTED, MachinePreview, preview_state, secret_files_diff
from .properties import contains_unknown, reveal
from .resource import CheckFailed, DiffResult, build_host_key, diff_inputs, same
from .schema import MACHINE, held_to
from .state import MachineState

TYPE = MACHINE
INPUT_KEYS = input_rules.MACHINE_INPUTS
# A change to one of these means the machine must be deployed again.
DEPLOY_KEYS = ["systemPath", "action", "triggers"]
__all__ = ["CHANGE_REPORTS", "COMPUTED", "INPUT_KEYS", "TYPE", "NixosMachine"]
SYSTEM = Profile(SYSTEM_PROFILE)


def _id(remote: Remote) -> str:
    return f"{remote.host}:{remote.port}"


class NixosMachine(MachinePreview):

    # -- Check ------------------------------------------------------------------

    async def check(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> dict[str, Any]:
        f = held_to(TYPE, news, lambda plain, f: input_rules.machine_failures(plain, self.ctx.project_dir, f))
        if f:
            raise CheckFailed(f)

        checked = dict(news)
        checked["connection"] = normalized.normalize_connection(checked.get("connection"), self.ctx.default_user)
        if checked.get("buildHost") is not None:
            checked["buildHost"] = normalized.normalize_connection(checked["buildHost"], self.ctx.default_user)
        checked.setdefault("action", "switch")
        checked.setdefault("onDestroy", "rollback")
        if checked.get("secretFiles") is not None:
            checked["secretFiles"] = normalized.normalize_secret_files(checked["secretFiles"])
        # Credentials and file contents are secret in state whether or not the program said so.
        checked = secrecy.secret_fields(checked, TYPE)
        if Closure.parse(reveal(news), "systemPath").evaluated:
            checked["systemPath"] = await self._resolve_source(urn, news, nixos=True)
        return checked

    # -- Diff -------------------------------------------------------------------

    def diff(self, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        keys = [k for k in INPUT_KEYS if k != "secretFiles"]
        result = diff_inputs(olds, news, keys, [("connection", "host"), ("connection", "port")], DEPLOY_KEYS)
        result.detailed.update(secret_files_diff(olds, news))
        return result

    @staticmethod
    def needs_deploy(olds: dict[str, Any], news: dict[str, Any]) -> bool:
        return any(not same(olds.get(k), news.get(k)) for k in DEPLOY_KEYS) or contains_unknown(news.get("systemPath"))

    @staticmethod
    def install_unfinished(olds: dict[str, Any]) -> bool:
        """A create with `install` that failed: the next update installs (or adopts) again."""
        return olds.get("install") is not None and olds.get("installStatus") not in ("installed", "adopted")

    # -- Create / Update ----------------------------------------------------------------

    async def create(self, urn: str, news: dict[str, Any], preview: bool) -> tuple[str, dict[str, Any]]:
        if preview:
            ident = f"{reveal(news['connection']).get('host')}:{reveal(news['connection']).get('port', 22)}"
            if news.get("install") is not None:
                self.ctx.info(urn, "will install NixOS with nixos-anywhere unless the host already runs NixOS "
                                   "(which would be adopted)")
            return ident, preview_state(news, None, deploys=True).to_properties()
        m = MachineInputs.parse(reveal(news))
        # `install: {}` installs with every default.
        goal = self._goal(urn, m, {}, pinned=None, install=m.install is not None)
        return _id(goal.remote), await self._converge(urn, _id(goal.remote), goal, None, news, {}, m)

    async def update(self, urn: str, ident: str, olds: dict[str, Any], news: dict[str, Any], preview: bool,
                     ) -> dict[str, Any]:
        if self.install_unfinished(olds):
            if preview:
                return preview_state(news, None, deploys=True).to_properties()
            self.ctx.info(urn, "the installation did not finish last time: checking the host before installing again")
            m = MachineInputs.parse(reveal(news))
            goal = self._goal(urn, m, olds, pinned=None, install=True)
            return await self._converge(urn, ident, goal, MachineState.record_of(olds), news, olds, m)
        if preview and olds.get("install") is not None and not same(olds.get("install"), news.get("install")):
            self.ctx.info(urn, "`install` applies only when the machine is created: the change is recorded, "
                               "nothing is reinstalled")
        deploys = self.needs_deploy(olds, news)
        if preview:
            return (await self._preview_update(urn, olds, news, deploys)).to_properties()
        m = MachineInputs.parse(reveal(news))
        pinned = m.connection.get("hostKey") or olds.get("hostKey")
        goal = self._goal(urn, m, olds, pinned=pinned, deploys=deploys)
        return await self._converge(urn, ident, goal, MachineState.record_of(olds), news, olds, m)

    def _goal(self, urn: str, m: MachineInputs, olds: dict[str, Any], *, pinned: str | None, install: bool = False,
              deploys: bool = True) -> MachineGoal:
        remote = self._remote_of(m.connection, host_key=pinned)
        nix = self._deploy_nix(m.settings)
        builder_key = build_host_key(olds, m.build_host)
        return MachineGoal(
            remote=remote,
            source=fleet_source(self.ctx, urn, m.closure, nix, nixos=True),
            request=m.settings.request(remote, SYSTEM, action=m.action,
                                       binary_cache=m.binary_cache or self.ctx.binary_cache),
            build_host=None if m.build_host is None else self._remote_of(m.build_host, builder_key),
            build_host_key=builder_key,
            build_on_target=m.build_on_target,
            secret_files=m.secret_files,
            install=conversion.to_install_request(
                m.install or {}, remote, str(m.closure.store_path), command=self.ctx.nixos_anywhere_command,
                disko_script=(m.install or {}).get("diskoScript"), flake=None,
                nix_opts=list(m.settings.nix_options)) if install else None,
            deploys=deploys,
        )

    async def _converge(self, urn: str, ident: str, goal: MachineGoal, recorded: MachineRecord | None,
                        news: dict[str, Any], olds: dict[str, Any], m: MachineInputs) -> dict[str, Any]:
        """The engine's converge, its record as properties; its failure as a PartialFailure with what runs now."""
        converging = self.ctx.engine.converge_machine(goal, recorded, self._deploy_nix(m.settings), self.ctx.report(urn))
        return await self._recorded(urn, ident, MachineState, converging, recorded, news, olds, SYSTEM_PROFILE)

    # -- Read / Delete ----------------------------------------------------------

    async def read(self, urn: str, ident: str, state: dict[str, Any], inputs: dict[str, Any],
                   ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        # `pulumi import`: no state yet. With only an ID (host:port), the connection comes from the ID; with
        # --properties or `import` in the program, from the inputs the engine passes.
        importing = not state
        if not state.get("connection") and not inputs.get("connection"):
            host, _, rest = ident.rpartition(":") if ident.count(":") == 1 else (ident, "", "22")
            inputs = {**inputs, "connection": {"host": host, "port": int(rest or 22),
                                               "user": self.ctx.default_user or "root"}}
        props = {**inputs, **state} if state else dict(inputs)
        props["connection"] = state.get("connection") or inputs.get("connection")
        recorded = MachineState.from_properties(props)
        remote = self._remote(props, host_key=recorded.record.host_key)
        record = await self.ctx.engine.refresh_machine(remote, recorded.record, self.ctx.report(urn),
                                                       importing=importing)
        if importing:
            return _id(remote), *self._imported(remote, recorded, record, inputs)
        running = record.system_path
        if running and inputs.get("systemPath") not in (None, running):
            # Drift: the inputs say what runs, so refresh shows the running system and the next preview
            # `running => declared`.
            inputs = {**inputs, "systemPath": running}
        return _id(remote), MachineState(recorded.inputs, record).to_properties(), inputs

    def _imported(self, remote: Remote, recorded: MachineState, record: MachineRecord,
                  inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Import: the inputs describe what runs (the engine's record takes it as the baseline), so the generated
        code deploys nothing. Outputs never carry secret files' contents."""
        running = record.system_path
        outputs = {"action": "switch", "onDestroy": "rollback", **recorded.inputs}
        new_inputs = {k: inputs[k] for k in INPUT_KEYS if inputs.get(k) is not None}
        new_inputs["connection"] = normalized.normalize_connection(inputs["connection"], self.ctx.default_user)
        # The defaults Check fills in, so the generated code's Check adds nothing to diff against.
        new_inputs.setdefault("action", "switch")
        new_inputs.setdefault("onDestroy", "rollback")
        if not Closure.parse(reveal(new_inputs), "systemPath").evaluated and new_inputs.get("systemPath") is None:
            if running is None:
                raise EngineError(f"cannot import {remote.target}: it has no /run/current-system, so there is no "
                                  "system to describe (is it running NixOS?)")
            new_inputs["systemPath"] = running
        return MachineState(outputs, record).to_properties(), new_inputs

    async def delete(self, urn: str, ident: str, state: dict[str, Any]) -> None:
        recorded = MachineState.from_properties(state)
        record = recorded.record
        if reveal(recorded.inputs.get("onDestroy")) == "retain":
            self.ctx.info(urn, "onDestroy is `retain`: leaving the machine as it is, secret files included")
            return
        if self.ctx.replaced_in_place(urn, record.host_key, SYSTEM_PROFILE):
            self.ctx.info(urn, "its replacement manages the same machine (the same host key): leaving the system "
                               "and secret files the replacement deployed")
            return
        remote = self._remote_of(recorded.inputs["connection"], record.host_key)
        await self.ctx.engine.destroy_machine(remote, record, self.ctx.report(urn))
