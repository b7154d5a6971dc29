"""NixosMachine's operations on declarations (plain values, schema.json's names): each hands the engine one goal
(install or adopt, build, secret files, deployment, health checks: `lifecycle.machine`) and answers with the record
it returns, or lets its `ConvergeFailed` say what runs now."""

from __future__ import annotations

from typing import Any

from ..declaration import conversion, defaults, input_rules
from ..declaration.typed_inputs import Closure, MachineInputs
from ..declaration.values import known
from ..errors import EngineError
from ..lifecycle.models import MachineGoal, MachineRecord, Report
from ..models import SYSTEM_PROFILE, Profile, Remote
from . import machine_preview
from .changes import Changes, build_host_key, install_unfinished, machine_changes, machine_deploys
from .fleet import Fleet
from .records import Refreshed, record_of

SYSTEM = Profile(SYSTEM_PROFILE)


def machine_id(remote: Remote) -> str:
    return f"{remote.host}:{remote.port}"


class Machines:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    async def check(self, news: dict[str, Any], *, plan: str | None) -> dict[str, Any]:
        """The declaration as state records it: defaults filled, a source's system evaluated (plan: see
        `Fleet.evaluate`). Its rules hold already."""
        checked = defaults.machine(news, self.fleet.settings.default_user)
        if Closure.parse(news, "systemPath").evaluated:
            checked["systemPath"] = await self.fleet.output_path(news, nixos=True, plan=plan)
        return checked

    @staticmethod
    def changes(olds: dict[str, Any], news: dict[str, Any]) -> Changes:
        return machine_changes(olds, news)

    def ident(self, news: dict[str, Any]) -> str:
        """The machine's ID: host:port (none while a preview does not know the connection)."""
        conn = news.get("connection")
        return machine_id(self.fleet.remote(conn)) if isinstance(conn, dict) and known(conn) else ""

    @staticmethod
    def preview_create(news: dict[str, Any], report: Report) -> machine_preview.Planned:
        if news.get("install") is not None:
            report.info("will install NixOS with nixos-anywhere unless the host already runs NixOS (which would be "
                        "adopted)")
        return machine_preview.planned(news, None, deploys=True)

    async def create(self, name: str, news: dict[str, Any], report: Report) -> MachineRecord:
        m = MachineInputs.parse(news)
        # `install: {}` installs with every default.
        goal = self._goal(m, {}, report, pinned=None, install=m.install is not None)
        return await self._converge(name, goal, None, m, report)

    async def preview_update(self, olds: dict[str, Any], news: dict[str, Any],
                             report: Report) -> machine_preview.Planned:
        if install_unfinished(olds):
            return machine_preview.planned(news, None, deploys=True)
        if olds.get("install") is not None and olds.get("install") != news.get("install"):
            report.info("`install` applies only when the machine is created: the change is recorded, nothing is "
                        "reinstalled")
        return await machine_preview.update(self.fleet, olds, news, report, deploys=machine_deploys(olds, news))

    async def update(self, name: str, olds: dict[str, Any], news: dict[str, Any], report: Report) -> MachineRecord:
        m = MachineInputs.parse(news)
        if install_unfinished(olds):
            report.info("the installation did not finish last time: checking the host before installing again")
            goal = self._goal(m, olds, report, pinned=None, install=True)
        else:
            pinned = m.connection.get("hostKey") or olds.get("hostKey")
            goal = self._goal(m, olds, report, pinned=pinned, deploys=machine_deploys(olds, news))
        return await self._converge(name, goal, record_of(MachineRecord, olds), m, report)

    def _goal(self, m: MachineInputs, olds: dict[str, Any], report: Report, *, pinned: str | None,
              install: bool = False, deploys: bool = True) -> MachineGoal:
        fleet = self.fleet
        remote = fleet.remote(m.connection, pinned)
        builder_key = build_host_key(olds, m.build_host)
        return MachineGoal(
            remote=remote,
            source=fleet.source(m.closure, fleet.nix(m.settings.nix_options), report, nixos=True),
            request=m.settings.request(remote, SYSTEM, action=m.action,
                                       binary_cache=m.binary_cache or fleet.settings.binary_cache),
            build_host=None if m.build_host is None else fleet.remote(m.build_host, builder_key),
            build_host_key=builder_key,
            build_on_target=m.build_on_target,
            secret_files=m.secret_files,
            install=conversion.to_install_request(
                m.install or {}, remote, str(m.closure.store_path), command=list(fleet.settings.nixos_anywhere_command),
                disko_script=(m.install or {}).get("diskoScript"), flake=None,
                nix_opts=list(m.settings.nix_options)) if install else None,
            deploys=deploys,
        )

    async def _converge(self, name: str, goal: MachineGoal, recorded: MachineRecord | None, m: MachineInputs,
                        report: Report) -> MachineRecord:
        converging = self.fleet.engine.converge_machine(goal, recorded, self.fleet.nix(m.settings.nix_options), report)
        return await self.fleet.converged(name, converging, recorded, SYSTEM_PROFILE)

    async def refresh(self, ident: str, state: dict[str, Any], inputs: dict[str, Any],
                      report: Report) -> Refreshed[MachineRecord]:
        """What runs now. `pulumi import` has no state yet: with only an ID (host:port), the connection comes from
        the ID; with --properties or `import` in the program, from the inputs."""
        importing = not state
        if not state.get("connection") and not inputs.get("connection"):
            host, _, rest = ident.rpartition(":") if ident.count(":") == 1 else (ident, "", "22")
            inputs = {**inputs, "connection": {"host": host, "port": int(rest or 22),
                                               "user": self.fleet.settings.default_user or "root"}}
        props = {**inputs, **state, "connection": state.get("connection") or inputs.get("connection")}
        kept = {k: props[k] for k in input_rules.MACHINE_INPUTS if k in props}
        recorded = record_of(MachineRecord, props)
        remote = self.fleet.remote(props["connection"], recorded.host_key)
        record = await self.fleet.engine.refresh_machine(remote, recorded, report, importing=importing)
        if importing:
            return self._imported(remote, kept, record, inputs)
        running = record.system_path
        if running and inputs.get("systemPath") not in (None, running):
            # Drift: the inputs say what runs, so refresh shows the running system and the next preview
            # `running => declared`.
            inputs = {**inputs, "systemPath": running}
        return Refreshed(machine_id(remote), kept, record, inputs)

    def _imported(self, remote: Remote, kept: dict[str, Any], record: MachineRecord,
                  inputs: dict[str, Any]) -> Refreshed[MachineRecord]:
        """Import: the inputs describe what runs (the engine's record takes it as the baseline), so the generated
        code deploys nothing. The record never carries secret files' contents."""
        declared = defaults.machine({k: inputs[k] for k in input_rules.MACHINE_INPUTS if inputs.get(k) is not None},
                                    self.fleet.settings.default_user)
        if not Closure.parse(declared, "systemPath").evaluated and declared.get("systemPath") is None:
            if record.system_path is None:
                raise EngineError(f"cannot import {remote.target}: it has no /run/current-system, so there is no "
                                  "system to describe (is it running NixOS?)")
            declared["systemPath"] = record.system_path
        return Refreshed(machine_id(remote), {"action": "switch", "onDestroy": "rollback", **kept}, record, declared)

    async def delete(self, name: str, state: dict[str, Any], report: Report) -> None:
        recorded = record_of(MachineRecord, state)
        if state.get("onDestroy") == "retain":
            report.info("onDestroy is `retain`: leaving the machine as it is, secret files included")
        elif self.fleet.replaced_in_place(name, recorded.host_key, SYSTEM_PROFILE):
            report.info("its replacement manages the same machine (the same host key): leaving the system and "
                        "secret files the replacement deployed")
        else:
            await self.fleet.engine.destroy_machine(self.fleet.remote(state["connection"], recorded.host_key),
                                                    recorded, report)
