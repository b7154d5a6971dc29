"""nixos:index:NixosMachine: one NixOS host kept at the declared system.

A mapper between Pulumi's properties and the engine: Check and Diff work on inputs; Create and Update hand the
engine a goal (`engine.lifecycle`) and record what it returns, or what its failure says runs; Read and Delete ask
the engine likewise. The lifecycle itself (install or adopt, build, secret files, deployment, health checks) is
the engine's.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..engine.errors import EngineError
from ..engine.lifecycle.models import ConvergeFailed, MachineGoal, MachineRecord, PreviewGoal
from ..engine.models import SYSTEM_PROFILE, Profile, Remote
from ..engine.nix.closure_diff import ClosureChanges
from ..engine.target import secret_files as files
from . import conversion, input_rules, normalized, secrecy
from .engine_calls import FleetSource, deploy_request
from .properties import contains_unknown, reveal
from .resource import CheckFailed, DeployedResource, DiffResult, PartialFailure, diff_inputs, same
from .state import MACHINE_RECORD, MachineState
from .typed_inputs import SOURCE_KEYS, Closure, MachineInputs

TYPE = input_rules.MACHINE
INPUT_KEYS = input_rules.MACHINE_INPUTS
# A change to one of these means the machine must be deployed again.
DEPLOY_KEYS = ["systemPath", "action", "triggers"]
# The outputs that report package changes: set by preview (pending) and by a deployment (last), not copied over.
CHANGE_REPORTS = ["pendingChanges", "lastChanges"]
# The other outputs: what the record holds besides the system, its files and the change reports.
COMPUTED = sorted(MACHINE_RECORD - {"systemPath", "secretFiles", "secretFilesKey", *CHANGE_REPORTS})
# What a deployment changes, so a preview cannot know it.
DEPLOYED = frozenset({"generation", "previousGeneration", "nixosVersion", "deployedAt", "pushedPaths", "pushedBytes",
                      "substitutedPaths", "needsReboot", "systemDerivation"})
SYSTEM = Profile(SYSTEM_PROFILE)


def _id(remote: Remote) -> str:
    return f"{remote.host}:{remote.port}"


def _build_host_key(olds: dict[str, Any], news: dict[str, Any]) -> str | None:
    """The build host key the last deployment pinned, while buildHost still names that host."""
    old, new = reveal(olds.get("buildHost")), reveal(news.get("buildHost"))
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    same_host = (reveal(old.get("host")), reveal(old.get("port"))) == (reveal(new.get("host")), reveal(new.get("port")))
    return olds.get("buildHostKey") if same_host else None
class NixosMachine(DeployedResource):

    # -- Check ------------------------------------------------------------------

    async def check(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> dict[str, Any]:
        f = input_rules.machine_failures(news, self.ctx.project_dir)
        if f:
            raise CheckFailed(f)

        checked = dict(news)
        checked["connection"] = normalized.normalize_connection(checked.get("connection"), self.ctx.default_user)
        if checked.get("buildHost") is not None:
            checked["buildHost"] = normalized.normalize_connection(checked["buildHost"], self.ctx.default_user)
        # Credentials are secret in state whether or not the program said so.
        checked = secrecy.secret_fields(checked)
        checked.setdefault("action", "switch")
        checked.setdefault("onDestroy", "rollback")
        if checked.get("secretFiles") is not None:
            checked["secretFiles"] = normalized.normalize_secret_files(checked["secretFiles"])
        if Closure.parse(news, "systemPath").evaluated:
            checked["systemPath"] = await self._resolve_source(urn, news, nixos=True)
        return checked

    # -- Diff -------------------------------------------------------------------

    def diff(self, olds: dict[str, Any], news: dict[str, Any]) -> DiffResult:
        keys = [k for k in INPUT_KEYS if k != "secretFiles"]
        result = diff_inputs(olds, news, keys, [("connection", "host"), ("connection", "port")], DEPLOY_KEYS)
        result.detailed.update(_secret_files_diff(olds, news))
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
            return ident, _preview_state(news, None, deploys=True).to_properties()
        m = MachineInputs.parse(news)
        # `install: {}` installs with every default.
        goal = self._goal(urn, m, {}, pinned=None, install=m.install is not None)
        return _id(goal.remote), await self._converge(urn, _id(goal.remote), goal, None, news, {}, m)

    async def update(self, urn: str, ident: str, olds: dict[str, Any], news: dict[str, Any], preview: bool,
                     ) -> dict[str, Any]:
        if self.install_unfinished(olds):
            if preview:
                return _preview_state(news, None, deploys=True).to_properties()
            self.ctx.info(urn, "the installation did not finish last time: checking the host before installing again")
            m = MachineInputs.parse(news)
            goal = self._goal(urn, m, olds, pinned=None, install=True)
            return await self._converge(urn, ident, goal, MachineState.record_of(olds), news, olds, m)
        if preview and olds.get("install") is not None and not same(olds.get("install"), news.get("install")):
            self.ctx.info(urn, "`install` applies only when the machine is created: the change is recorded, "
                               "nothing is reinstalled")
        deploys = self.needs_deploy(olds, news)
        if preview:
            return (await self._preview_update(urn, olds, news, deploys)).to_properties()
        m = MachineInputs.parse(news)
        pinned = m.connection.get("hostKey") or olds.get("hostKey")
        goal = self._goal(urn, m, olds, pinned=pinned, deploys=deploys)
        return await self._converge(urn, ident, goal, MachineState.record_of(olds), news, olds, m)

    def _goal(self, urn: str, m: MachineInputs, olds: dict[str, Any], *, pinned: str | None, install: bool = False,
              deploys: bool = True) -> MachineGoal:
        remote = self._remote_of(m.connection, host_key=pinned)
        nix = self._deploy_nix(m.settings)
        build_host_key = _build_host_key(olds, m.raw)
        return MachineGoal(
            remote=remote,
            source=FleetSource(self.ctx, urn, m.closure, nix, nixos=True),
            request=deploy_request(remote, SYSTEM, m.settings, action=m.action,
                                   binary_cache=m.binary_cache or self.ctx.binary_cache),
            build_host=None if m.build_host is None else self._remote_of(m.build_host, build_host_key),
            build_host_key=build_host_key,
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
        report, nix = self.ctx.report(urn), self._deploy_nix(m.settings)
        try:
            record = await self.ctx.engine.converge_machine(goal, recorded, nix, report)
        except ConvergeFailed as e:
            assert isinstance(e.record, MachineRecord)
            self._created(urn, recorded, e.record)
            inputs = news if e.with_new_inputs else MachineState.inputs_of(olds)
            raise PartialFailure(str(e), ident, MachineState(inputs, e.record).to_properties(), news) from e
        self._created(urn, recorded, record)
        return MachineState(news, record).to_properties()

    def _created(self, urn: str, recorded: MachineRecord | None, record: MachineRecord) -> None:
        """A machine this process reached for the first time: where it lives, for a replacement's delete."""
        if recorded is None and record.host_key:
            self.ctx.created_on[urn] = (record.host_key, SYSTEM_PROFILE)

    # -- Preview --------------------------------------------------------------------------

    async def _preview_update(self, urn: str, olds: dict[str, Any], news: dict[str, Any],
                              deploys: bool) -> MachineState:
        state = _preview_state(news, olds, deploys=deploys)
        self._note_secret_files(urn, olds, news)
        if not deploys:
            return state
        changes = await self._pending_changes(urn, olds, news)
        record = replace(state.record, pending_changes=changes.to_output() if changes else None)
        reboots = _reboots(news, changes)
        if reboots:
            self.ctx.info(urn, f"  reboots into it once, and keeps it only when it boots and passes its health "
                               f"checks (reboot: {news.get('reboot')})")
        if changes is None or changes.note:
            return MachineState(news, record, state.unknown)
        # Predicted (from the closures or the derivations): a new kernel, initrd or modules run only after a
        # reboot, and one that was already due stays due, unless this deployment reboots.
        due = not reboots and (bool(changes.boot_changes) or bool(reveal(olds.get("needsReboot"))))
        return MachineState(news, replace(record, needs_reboot=due), state.unknown - {"needsReboot"})

    async def _pending_changes(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> ClosureChanges | None:
        """Preview: what the new system changes, package by package (from the closures or the derivations)."""
        old, new = olds.get("systemPath"), news.get("systemPath")
        if not isinstance(old, str) or not isinstance(new, str) or contains_unknown(news.get("connection")):
            return None
        nix = self._nix(news)
        sources = [news.get(k) for k in SOURCE_KEYS if news.get(k) is not None]
        known = bool(sources) and not contains_unknown([*sources, news.get("nixOptions")])
        build_host = news.get("buildHost")
        goal = PreviewGoal(
            remote=self._remote(news, host_key=reveal(news["connection"]).get("hostKey") or olds.get("hostKey")),
            current=old, current_derivation=MachineState.record_of(olds).system_derivation, new=new,
            source=FleetSource(self.ctx, urn, Closure.parse(news, "systemPath"), nix, nixos=True) if known else None,
            build_on_preview=bool(news.get("buildOnPreview")), built_elsewhere=_built_elsewhere(news),
            build_host=(self._remote_of(build_host, _build_host_key(olds, news))
                        if build_host is not None and not contains_unknown(build_host) else None),
            dry_activate=bool(news.get("dryActivate")))
        # For people, the lines the engine reports; for programs, the `pendingChanges` output of this previewed
        # update, which Pulumi's streaming JSON (`PULUMI_ENABLE_STREAMING_JSON_PREVIEW=1 pulumi preview --json`)
        # carries in its resOutputsEvent (the digest of a plain `--json` leaves a preview's outputs out).
        return await self.ctx.engine.pending_changes(goal, nix, self.ctx.report(urn))

    def _note_secret_files(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> None:
        """Preview: which secret files an up writes or removes (paths only, never contents)."""
        if contains_unknown(news.get("secretFiles")):
            self.ctx.info(urn, "secret files: contents not known yet; they are compared during the update")
            return
        key = MachineState.record_of(olds).secret_files_key or b""
        plan = files.plan(conversion.recorded_files(olds.get("secretFiles")),
                          conversion.to_secret_files(news.get("secretFiles")), key)
        if plan.changed_paths():
            self.ctx.info(urn, f"secret files to write: {', '.join(plan.changed_paths())}")
        if plan.remove:
            self.ctx.info(urn, f"secret files to remove: {', '.join(plan.remove)}")

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
        now = await self.ctx.engine.read_state(remote, SYSTEM)
        record = replace(
            recorded.record,
            system_path=now.current_system,
            # The recorded derivation describes the recorded system only (drift makes it unknown).
            system_derivation=recorded.record.system_derivation if now.current_system == state.get("systemPath")
            else None,
            generation=now.generation.number if now.generation else None,
            host_key=now.host_key,
            nixos_version=now.nixos_version,
            needs_reboot=bool(now.reboot_for),
        )
        if not importing:
            record = replace(record, secret_files=await self.ctx.engine.read_secret_files(
                remote, recorded.record, self.ctx.report(urn)))
            if now.current_system and inputs.get("systemPath") not in (None, now.current_system):
                # Drift: the inputs say what runs, so refresh shows the running system and the next preview
                # `running => declared`.
                inputs = {**inputs, "systemPath": now.current_system}
            return _id(remote), MachineState(recorded.inputs, record).to_properties(), inputs
        return _id(remote), *self._imported(remote, recorded, record, inputs, now.current_system)

    def _imported(self, remote: Remote, recorded: MachineState, record: MachineRecord, inputs: dict[str, Any],
                  running: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Import: what runs now is the baseline to return to on destroy, and the inputs describe it, so the
        generated code deploys nothing. No secret file is recorded yet (the next up writes them), and outputs never
        carry their contents."""
        record = replace(record, secret_files=(), secret_files_key=None, baseline_generation=record.generation,
                         baseline_system_path=running)
        outputs = {"action": "switch", "onDestroy": "rollback", **recorded.inputs}
        new_inputs = {k: inputs[k] for k in INPUT_KEYS if inputs.get(k) is not None}
        new_inputs["connection"] = normalized.normalize_connection(inputs["connection"], self.ctx.default_user)
        # The defaults Check fills in, so the generated code's Check adds nothing to diff against.
        new_inputs.setdefault("action", "switch")
        new_inputs.setdefault("onDestroy", "rollback")
        if not Closure.parse(new_inputs, "systemPath").evaluated and new_inputs.get("systemPath") is None:
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


# -- preview's state, secret files in diffs ---------------------------------------------------


def _preview_state(news: dict[str, Any], olds: dict[str, Any] | None, *, deploys: bool) -> MachineState:
    """What a preview shows: the old record (none for a new machine) with what the update would change unknown."""
    system = news.get("systemPath")
    unknown = set() if isinstance(system, str) else {"systemPath"}
    if olds is None:
        record = MachineRecord(system_path=system if isinstance(system, str) else None)
        unknown |= set(COMPUTED)
    else:
        old = MachineState.record_of(olds)
        key = _build_host_key(olds, news)
        record = replace(old, system_path=system if isinstance(system, str) else None, build_host_key=key,
                         last_changes=None, pending_changes=None)
        if deploys:
            unknown |= DEPLOYED
            if news.get("buildHost") is not None and not key:
                unknown.add("buildHostKey")  # pinned by the deployment
    record, files_unknown = _files_preview(record, olds, news)
    return MachineState(news, record, frozenset(unknown | files_unknown))
def _built_elsewhere(news: dict[str, Any]) -> bool:
    """Whether the deployment builds the system on the target (`buildOn: remote`) or a build host, not here."""
    return news.get("buildOn") == "remote" or news.get("buildHost") is not None


def _reboots(news: dict[str, Any], changes: ClosureChanges | None) -> bool:
    """Whether the previewed deployment reboots the host (`reboot`; for ifNeeded, the predicted boot changes)."""
    mode = news.get("reboot")
    if mode == "always":
        return news.get("action") in (None, "switch", "boot")
    return mode == "ifNeeded" and changes is not None and not changes.note and bool(changes.boot_changes)


def _files_preview(record: MachineRecord, olds: dict[str, Any] | None,
                   news: dict[str, Any]) -> tuple[MachineRecord, set[str]]:
    """The secret files a preview shows: their hashes where the key and contents are known (else unknown), and
    the key state keeps."""
    old = MachineState.record_of(olds or {})
    key, wanted = old.secret_files_key, news.get("secretFiles")
    if wanted is None:
        return replace(record, secret_files=(), secret_files_key=key), set()
    if key is None or contains_unknown(wanted):
        return replace(record, secret_files=(), secret_files_key=key), {"secretFiles"} | (
            set() if key else {"secretFilesKey"})
    records = tuple(f.record(key) for f in conversion.to_secret_files(wanted))
    return replace(record, secret_files=records, secret_files_key=key), set()


def _secret_files_diff(olds: dict[str, Any], news: dict[str, Any]) -> dict[str, str]:
    """Which secret files change, by their index in the new list; contents are compared by HMAC."""
    wanted = news.get("secretFiles")
    if contains_unknown(wanted):
        return {"secretFiles": "UPDATE"}
    recorded = {r.path: r for r in conversion.recorded_files(olds.get("secretFiles"))}
    key = MachineState.record_of(olds).secret_files_key or b""
    out: dict[str, str] = {}
    new_files = conversion.to_secret_files(wanted)
    for i, f in enumerate(new_files):
        old = recorded.get(f.path)
        if old is None:
            out[f"secretFiles[{i}]"] = "ADD"
        elif old != f.record(key):
            out[f"secretFiles[{i}]"] = "UPDATE"
    if set(recorded) - {f.path for f in new_files}:
        out["secretFiles"] = "UPDATE"
    return out
