"""nixos:index:NixosMachine: one NixOS host kept at the declared system."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..engine.errors import DeployError, EngineError
from ..engine.lazy import lazy_module
from ..engine.models import SYSTEM_PROFILE, DeployRequest, Profile, Remote
from ..engine.nix.cli import Evaluation, FlakeRef, Nix
from ..engine.nix.closure_diff import ClosureChanges, closure_changes, derivation_changes
from ..engine.target import secret_files as files
from ..engine.target.dry_activate import parse_dry_activate
from . import conversion, input_rules, normalized, secrecy
from .engine_calls import build_closure, deploy_request, deployed_outputs, run_deploy
from .error_text import describe
from .properties import UNKNOWN, Secret, contains_unknown, reveal
from .resource import CheckFailed, DeployedResource, DiffResult, PartialFailure, diff_inputs, now_rfc3339, same
from .typed_inputs import SOURCE_KEYS, Closure, MachineInputs, RecordedMachine

if TYPE_CHECKING:
    from ..engine import deploy as engine
    from ..engine import install as installer
    from ..engine.install import source as install_sources
else:
    engine = lazy_module("nixos_provider.engine.deploy")
    install_sources = lazy_module("nixos_provider.engine.install.source")
    installer = lazy_module("nixos_provider.engine.install")

TYPE = input_rules.MACHINE
INPUT_KEYS = input_rules.MACHINE_INPUTS
# A change to one of these means the machine must be deployed again.
DEPLOY_KEYS = ["systemPath", "action", "triggers"]
COMPUTED = [
    "systemDerivation", "generation", "previousGeneration", "baselineGeneration", "baselineSystemPath", "hostKey", "nixosVersion",
    "deployedAt", "pushedPaths", "pushedBytes", "substitutedPaths", "installStatus", "installedAt", "installError", "needsReboot",
    "buildHostKey",
]
# The outputs that report package changes: set by preview (pending) and by a deployment (last), not copied over.
CHANGE_REPORTS = ["pendingChanges", "lastChanges"]
SYSTEM = Profile(SYSTEM_PROFILE)
# The per-machine HMAC key of the secret files' content hashes: state keeps it as a secret.
FILES_KEY = "secretFilesKey"


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

    # -- Create / Update ------------------------------------------------------------

    def _preview_outputs(self, news: dict[str, Any], olds: dict[str, Any] | None, deploys: bool) -> dict[str, Any]:
        out = secrecy.secret_fields({**({k: olds.get(k) for k in COMPUTED} if olds else {}), **news})
        out["buildHostKey"] = _build_host_key(olds or {}, news)
        if deploys and news.get("buildHost") is not None and not out["buildHostKey"]:
            out["buildHostKey"] = UNKNOWN  # pinned by the deployment
        for k in COMPUTED:
            if olds is None or (deploys and k in ("generation", "previousGeneration", "nixosVersion", "deployedAt",
                                                  "pushedPaths", "pushedBytes", "substitutedPaths", "needsReboot",
                                                  "systemDerivation")):
                out[k] = UNKNOWN
        if olds is not None and olds.get("hostKey"):
            out["hostKey"] = olds["hostKey"]
        return {**out, **_files_preview(olds, news)}

    async def create(self, urn: str, news: dict[str, Any], preview: bool) -> tuple[str, dict[str, Any]]:
        if preview:
            ident = f"{reveal(news['connection']).get('host')}:{reveal(news['connection']).get('port', 22)}"
            if news.get("install") is not None:
                self.ctx.info(urn, "will install NixOS with nixos-anywhere unless the host already runs NixOS "
                                   "(which would be adopted)")
            return ident, self._preview_outputs(news, None, True)
        m = MachineInputs.parse(news)
        remote = self._remote_of(m.connection)
        if m.install is not None:  # `install: {}` installs with every default
            installed = await self._install(urn, _id(remote), m, {})
            if installed.get("hostKey"):
                self.ctx.created_on[urn] = (installed["hostKey"], SYSTEM_PROFILE)
            return _id(remote), installed
        self.ctx.status(urn, f"connecting to {remote.target}")
        # Build while the host is read: the build does not need it, and the
        # machines created together then share one `nix build`.
        building = self._start_build(urn, m)
        try:
            async with self.ctx.ssh_slots:
                baseline = await engine.read_state(remote, SYSTEM)
        except BaseException:
            if building is not None:
                building.cancel()
            raise
        if baseline.generation is None and baseline.current_system is None:
            if building is not None:
                building.cancel()
            raise EngineError(f"{remote.target} does not run NixOS (no {SYSTEM_PROFILE} and no /run/current-system); "
                              "set `install` to install it with nixos-anywhere")
        pinned = baseline.host_key
        self.ctx.created_on[urn] = (pinned, SYSTEM_PROFILE)
        base = {
            **secrecy.secret_fields(news),
            "secretFiles": None,
            "hostKey": pinned,
            "baselineGeneration": baseline.generation.number if baseline.generation else None,
            "baselineSystemPath": baseline.current_system or (baseline.generation.store_path if baseline.generation else None),
            "systemPath": baseline.current_system,
            "generation": baseline.generation.number if baseline.generation else None,
            "nixosVersion": baseline.nixos_version,
            "needsReboot": bool(baseline.reboot_for),
        }
        ident = _id(remote)
        placement = self._placement({}, m, pinned)
        return ident, await self._deploy(urn, ident, base, m, pinned, placement, building=building)

    async def update(self, urn: str, ident: str, olds: dict[str, Any], news: dict[str, Any], preview: bool,
                     ) -> dict[str, Any]:
        if self.install_unfinished(olds):
            if preview:
                return self._preview_outputs(news, None, True)
            self.ctx.info(urn, "the installation did not finish last time: checking the host before installing again")
            return await self._install(urn, ident, MachineInputs.parse(news), olds)
        if preview and olds.get("install") is not None and not same(olds.get("install"), news.get("install")):
            self.ctx.info(urn, "`install` applies only when the machine is created: the change is recorded, "
                               "nothing is reinstalled")
        deploys = self.needs_deploy(olds, news)
        if preview:
            out = self._preview_outputs(news, olds, deploys)
            self._note_secret_files(urn, olds, news)
            if deploys:
                changes = await self._pending_changes(urn, olds, news)
                out["pendingChanges"] = changes.to_output() if changes else None
                reboots = _reboots(news, changes)
                if reboots:
                    self.ctx.info(urn, f"  reboots into it once, and keeps it only when it boots and passes its "
                                       f"health checks (reboot: {news.get('reboot')})")
                if changes is not None and not changes.note:
                    # Predicted (from the closures or the derivations): a new kernel, initrd or modules run only
                    # after a reboot, and one that was already due stays due, unless this deployment reboots.
                    out["needsReboot"] = not reboots and (bool(changes.boot_changes) or bool(olds.get("needsReboot")))
            return out
        m = MachineInputs.parse(news)
        pinned = m.connection.get("hostKey") or olds.get("hostKey")
        base = {**{k: olds.get(k) for k in [*COMPUTED, "lastChanges"]}, **secrecy.secret_fields(news),
                "systemPath": olds.get("systemPath"), "hostKey": pinned,
                "buildHostKey": _build_host_key(olds, news)}
        placement = self._placement(olds, m, pinned)
        if not deploys:
            return await self._place_files(urn, ident, base, news, placement)
        # If the deploy fails, the engine keeps the old inputs: the recorded
        # outputs must then describe the old configuration plus what runs now.
        kept = {**secrecy.secret_fields(olds), "hostKey": pinned}
        return await self._deploy(urn, ident, base, m, pinned, placement, kept)

    # -- Secret files ---------------------------------------------------------------------

    def _placement(self, olds: dict[str, Any], m: MachineInputs, pinned: str | None) -> files.Placement:
        """What the secret files need on this up: compared with the records (hashes) in the old state."""
        key = _files_key(olds) or base64.b64decode(files.new_key())
        return files.Placement(self._remote_of(m.connection, host_key=pinned),
                               conversion.recorded_files(olds.get("secretFiles")), m.secret_files, key)

    async def _place_files(self, urn: str, ident: str, outputs: dict[str, Any], news: dict[str, Any],
                           placement: files.Placement, *, after_switch: bool = False) -> dict[str, Any]:
        """Write what is left to write and remove what was dropped; no activation follows."""
        plan = placement.plan
        if plan.after or plan.remove or (plan.before and not after_switch):
            self.ctx.status(urn, f"placing secret files: {', '.join(plan.changed_paths()) or 'none'}"
                                 + (f"; removing {', '.join(plan.remove)}" if plan.remove else ""))
        try:
            async with self.ctx.ssh_slots:
                await (placement.after_activation() if after_switch else placement.all_stages())
        except EngineError as e:
            done = "the system is deployed, but " if after_switch else "the system was not changed; "
            raise PartialFailure(f"{done}{describe(e)}", ident, _with_files(outputs, placement), news) from e
        return _with_files(outputs, placement)

    async def _files_before_activation(self, urn: str, ident: str, failed: dict[str, Any], news: dict[str, Any],
                                       placement: files.Placement) -> None:
        if not placement.plan.before:
            return
        self.ctx.status(urn, f"placing secret files before activation: "
                             f"{', '.join(f.path for f in placement.plan.before)}")
        try:
            async with self.ctx.ssh_slots:
                await placement.before_activation()
        except EngineError as e:
            raise PartialFailure(f"{describe(e)}; the new system was not activated", ident,
                                 _with_files(failed, placement), news) from e

    def _note_secret_files(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> None:
        """Preview: which secret files an up writes or removes (paths only, never contents)."""
        if contains_unknown(news.get("secretFiles")):
            self.ctx.info(urn, "secret files: contents not known yet; they are compared during the update")
            return
        key = _files_key(olds) or b""
        plan = files.plan(conversion.recorded_files(olds.get("secretFiles")),
                          conversion.to_secret_files(news.get("secretFiles")), key)
        if plan.changed_paths():
            self.ctx.info(urn, f"secret files to write: {', '.join(plan.changed_paths())}")
        if plan.remove:
            self.ctx.info(urn, f"secret files to remove: {', '.join(plan.remove)}")

    # -- Install ------------------------------------------------------------------------

    async def _install_source(self, urn: str, m: MachineInputs, nix: Nix) -> tuple[str | None, str | None]:
        """(disko script, flake) for nixos-anywhere: both built here when we can, so a
        broken configuration fails before the host is touched. A system without a flake goes as a store path,
        like `systemPath`, with `install.diskoScript` (Check requires it)."""
        inst, ref = m.install or {}, m.closure.ref(self.ctx.project_dir, nixos=True)
        try:
            source = await install_sources.install_source(
                nix, build_system=lambda: self._build(urn, m.closure, nix), status=lambda s: self.ctx.status(urn, s),
                disko_script=inst.get("diskoScript"), build_on_target=inst.get("buildOn") == "remote",
                flake=ref if isinstance(ref, FlakeRef) else None, phases=inst.get("phases") or ())
        except install_sources.NoNixosConfiguration as e:
            raise EngineError(f"{e}: use a flake reference like `.#web` (or `.#nixosConfigurations.<name>.config."
                              "system.build.toplevel`), or set `install.diskoScript`") from e
        except install_sources.DiskoScriptFailed as e:
            raise EngineError(f"{e} (the configuration needs disko's NixOS module for `config.system.build."
                              "diskoScript`; or set `install.diskoScript`, or leave `disko` out of `install.phases`)",
                              blames=e.blames) from e
        return source.disko_script, source.flake

    async def _install(self, urn: str, ident: str, m: MachineInputs, olds: dict[str, Any]) -> dict[str, Any]:
        """Install NixOS with nixos-anywhere (or adopt the host if it already runs NixOS), then manage it.

        Secret files are placed once the installed system runs (both stages:
        nixos-anywhere's activation has passed); files the first boot needs
        belong in `install.extraFiles`.
        """
        news = m.raw
        nix = self._deploy_nix(m.settings)
        remote = self._remote_of(m.connection)
        base = {
            **secrecy.secret_fields(news),
            **{k: None for k in COMPUTED},
            "installStatus": "failed",
            "systemPath": None,
            "secretFiles": conversion.secret_files_output(conversion.recorded_files(olds.get("secretFiles"))),
            FILES_KEY: olds.get(FILES_KEY),
        }
        try:
            disko, flake = await self._install_source(urn, m, nix)
        except EngineError as e:
            raise PartialFailure(f"{describe(e)}; nothing was installed and the host was not touched", ident,
                                 {**base, "installError": f"build: {describe(e)}"}, news) from e
        system = str(m.closure.store_path)
        req = conversion.to_install_request(m.install or {}, remote, system,
                                            command=self.ctx.nixos_anywhere_command, disko_script=disko, flake=flake,
                                            nix_opts=list(m.settings.nix_options))
        try:
            async with self.ctx.ssh_slots:
                result = await installer.install(req, status=lambda s: self.ctx.status(urn, s),
                                                 output=lambda s: self.ctx.info(urn, s))
        except installer.InstallError as e:
            raise PartialFailure(f"installing NixOS on {remote.target} failed: {describe(e)}", ident,
                                 {**base, "installError": f"{e.phase}: {describe(e).splitlines()[0]}"}, news) from e
        except EngineError as e:
            raise PartialFailure(f"installing NixOS on {remote.target} failed before nixos-anywhere ran: {describe(e)}",
                                 ident, {**base, "installError": f"connect: {describe(e)}"}, news) from e
        gen = result.generation
        now = now_rfc3339()
        outputs = {
            **base,
            "installStatus": "installed" if result.installed else "adopted",
            "installedAt": now if result.installed else None,
            "installError": None,
            "hostKey": result.host_key,
            "baselineGeneration": gen.number if gen else None,
            "baselineSystemPath": result.current_system,
            "systemPath": result.current_system,
            "generation": gen.number if gen else None,
            "nixosVersion": result.nixos_version,
            "deployedAt": now if result.installed else None,
        }
        if result.current_system == system and m.closure.evaluated:
            outputs["systemDerivation"] = await self._installed_derivation(urn, m, nix, system)
        if result.installed:
            self.ctx.info(urn, f"installed {result.current_system} as generation {outputs['generation']}; "
                               f"host key pinned from {result.host_key_source}")
        placement = self._placement(olds, m, result.host_key)
        if result.current_system != system:
            # Adopted a NixOS host that runs something else: deploy as for any adopted machine.
            return await self._deploy(urn, ident, outputs, m, result.host_key, placement)
        health_checks = m.settings.health_checks
        if health_checks:
            try:
                async with self.ctx.ssh_slots:
                    await engine.check_health(self._remote_of(m.connection, host_key=result.host_key), health_checks,
                                              status=lambda s: self.ctx.status(urn, s))
            except EngineError as e:
                raise PartialFailure(f"{describe(e)}; the host runs the installed system {system} (generation "
                                     f"{outputs['generation']}), which has no earlier generation to roll back to",
                                     ident, outputs, news) from e
        return await self._place_files(urn, ident, outputs, news, placement)

    async def _pending_changes(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> ClosureChanges | None:
        """Preview: what the new system changes, package by package, when both closures are local."""
        old, new = olds.get("systemPath"), news.get("systemPath")
        if not isinstance(old, str) or not isinstance(new, str) or contains_unknown(news.get("connection")):
            return None
        nix = self._nix(news)
        # A system built on the target or a build host is not built here, in preview either (this machine may not
        # be able to: another architecture); its package diff comes from the derivations.
        if not await nix.is_valid(new) and news.get("buildOnPreview") and not _built_elsewhere(news) \
                and Closure.parse(news, "systemPath").evaluated:
            self.ctx.info(urn, f"building {new} for the preview (buildOnPreview)")
            try:
                await self._build(urn, Closure.parse(news, "systemPath"), nix)
            except EngineError as e:
                self.ctx.warn(urn, f"preview build failed: {describe(e)}")
        missing = [label for label, path in (("new", new), ("current", old)) if not await nix.is_valid(path)]
        if missing:
            changes = await self._derivation_changes(urn, olds, news, nix)
            if changes is None:
                note = (f"no package diff: the {' and '.join(missing)} system is not in the local store"
                        + (" (set `buildOnPreview: true` to build it during preview)" if "new" in missing else ""))
                self.ctx.info(urn, note)
                return ClosureChanges(before=old, after=new, note=note)
        else:
            changes = await closure_changes(nix, old, new)
        if news.get("dryActivate"):
            changes = await self._dry_activate(urn, olds, news, changes)
        # For people, these lines; for programs, the `pendingChanges` output of this previewed update, which
        # Pulumi's streaming JSON (`PULUMI_ENABLE_STREAMING_JSON_PREVIEW=1 pulumi preview --json`) carries in its
        # resOutputsEvent (the digest of a plain `--json` leaves a preview's outputs out).
        for line in changes.lines():
            self.ctx.info(urn, line)
        return changes

    async def _derivation_changes(self, urn: str, olds: dict[str, Any], news: dict[str, Any],
                                  nix: Nix) -> ClosureChanges | None:
        """The package diff from the derivation closures (nothing built), when both derivations are here:
        the old one recorded at deploy, the new one from Check's evaluation (this process, or kept from an
        earlier run: then its derivation is still in the store)."""
        before = olds.get("systemDerivation")
        sources = [news.get(k) for k in SOURCE_KEYS if news.get(k) is not None]
        if not isinstance(before, str) or not sources or contains_unknown(sources):
            return None
        try:
            evaluation = await self._evaluation(urn, news, nix)
        except (EngineError, ValueError):
            return None
        after = evaluation.drv_path
        if after is None or evaluation.out_path != news.get("systemPath"):
            return None
        if not await nix.is_valid(before) or not await nix.is_valid(after):
            return None
        try:
            return await derivation_changes(nix, before, after, str(olds.get("systemPath")), evaluation.out_path)
        except EngineError as e:
            self.ctx.warn(urn, f"no package diff: reading the derivations failed: {describe(e)}")
            return None

    async def _installed_derivation(self, urn: str, m: MachineInputs, nix: Nix, system: str) -> str | None:
        """The installed system's derivation, for the next preview's package diff (never fails the install)."""
        try:
            evaluation = await self._evaluation(urn, m.raw, nix)
        except (EngineError, ValueError):
            return None
        return evaluation.drv_path if evaluation.out_path == system else None

    async def _evaluation(self, urn: str, news: dict[str, Any], nix: Nix) -> Evaluation:
        """The source's evaluation, as Check made it (a lookup in this process; for a system without a flake, Check's
        evaluation of this run when it is the same process, else a new one)."""
        ref = self._source(news, nixos=True)
        if ref is None:
            raise ValueError("the machine names no source to evaluate")
        return await self.ctx.evaluate(ref, nix, urn=urn, remember=False)

    async def _dry_activate(self, urn: str, olds: dict[str, Any], news: dict[str, Any],
                            changes: ClosureChanges) -> ClosureChanges:
        """Copy the new system to the target and ask `switch-to-configuration dry-activate`. A system built on the
        target or a build host, and not here, is built there first, as the deployment would."""
        remote = self._remote(news, host_key=reveal(news["connection"]).get("hostKey") or olds.get("hostKey"))
        system, nix = str(news["systemPath"]), self._nix(news)
        build_drv, build_host = None, None
        if _built_elsewhere(news) and not await nix.is_valid(system):
            try:
                evaluation = await self._evaluation(urn, news, nix)
            except (EngineError, ValueError) as e:
                self.ctx.warn(urn, f"dry-activate skipped: {describe(e)}")
                return changes
            build_drv = evaluation.drv_path if evaluation.out_path == system else None
            if news.get("buildHost") is not None:
                build_host = self._remote_of(news["buildHost"], _build_host_key(olds, news))
        req = DeployRequest(remote=remote, store_path=system, profile=SYSTEM, action="dry-activate",
                            build_drv=build_drv, build_host=build_host)
        try:
            async with self.ctx.ssh_slots:
                result = await engine.deploy(req, nix, status=lambda s: self.ctx.status(urn, s),
                                             warn=lambda s: self.ctx.warn(urn, s), transfers=self.ctx.transfer_slots)
        except EngineError as e:
            self.ctx.warn(urn, f"dry-activate failed: {describe(e)}")
            return changes
        return replace(changes, would_restart=parse_dry_activate(result.output).restart)

    async def _build(self, urn: str, closure: Closure, nix: Nix) -> str:
        return await build_closure(self.ctx, urn, nix, closure, nixos=True, check_evaluated=True)

    def _start_build(self, urn: str, m: MachineInputs) -> asyncio.Task[str] | None:
        """Start building the system now, if it is built here (not on the target)."""
        if m.build_on_target or m.build_host is not None:
            return None
        task = asyncio.ensure_future(self._build(urn, m.closure, self._deploy_nix(m.settings)))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # awaited later, or dropped
        return task

    async def _deploy(self, urn: str, ident: str, base: dict[str, Any], m: MachineInputs,
                      pinned: str | None, placement: files.Placement, kept: dict[str, Any] | None = None,
                      building: asyncio.Task[str] | None = None) -> dict[str, Any]:
        """Deploy the inputs, with their secret files around the activation; on failure raise PartialFailure
        with `kept` (or base) updated to what runs and which files are in place."""
        outputs = await self._deploy_system(urn, ident, base, m, pinned, placement, kept, building)
        return await self._place_files(urn, ident, outputs, m.raw, placement, after_switch=True)

    async def _deploy_system(self, urn: str, ident: str, base: dict[str, Any], m: MachineInputs,
                             pinned: str | None, placement: files.Placement, kept: dict[str, Any] | None,
                             building: asyncio.Task[str] | None) -> dict[str, Any]:
        failed = _with_files(kept if kept is not None else base, placement)
        remote = self._remote_of(m.connection, host_key=pinned)
        nix = self._deploy_nix(m.settings)
        evaluation: Evaluation | None = None
        try:
            if m.closure.evaluated:
                evaluation = await self._evaluation(urn, m.raw, nix)
            if (m.build_on_target or m.build_host is not None) and evaluation is not None:
                store_path = m.closure.store_path or evaluation.out_path
            else:
                store_path = await (building or self._build(urn, m.closure, nix))
        except (EngineError, ValueError) as e:
            raise PartialFailure(describe(e), ident, failed, m.raw) from e
        drv = evaluation.drv_path if evaluation is not None and evaluation.out_path == store_path else None
        await self._files_before_activation(urn, ident, failed, m.raw, placement)
        failed = _with_files(failed, placement)
        # Without the derivation of what it deploys (an impure evaluation), nothing can be built remotely.
        builder = None if m.build_host is None or drv is None else self._remote_of(m.build_host, base.get("buildHostKey"))
        req = deploy_request(remote, store_path, SYSTEM, m.settings, action=m.action,
                             build_drv=drv if m.build_on_target or builder is not None else None,
                             build_host=builder, binary_cache=m.binary_cache or self.ctx.binary_cache,
                             baseline=base.get("baselineGeneration"))
        result = await run_deploy(self.ctx, urn, req, nix, ident=ident, inputs=m.raw, failed=failed,
                                  after_failure=_now_running, observe=lambda out: self._observed(out, remote))
        # The deployment is confirmed: the new system runs. Nothing from here on
        # may fail the update, or the state would fall behind the host.
        deployed_drv = drv if result.store_path == store_path else None
        last = await self._last_changes_or_note(urn, nix, (base.get("systemPath"), base.get("systemDerivation")),
                                                (result.store_path, deployed_drv))
        return {
            **base,
            "pendingChanges": None,
            "lastChanges": last.to_output() if last else None,
            **deployed_outputs(result, "systemPath", pinned),
            "systemDerivation": deployed_drv,
            "nixosVersion": result.nixos_version,
            "needsReboot": bool(result.reboot_for),
            "buildHostKey": result.build_host_key,
        }

    async def _last_changes_or_note(self, urn: str, nix: Nix, old: tuple[Any, Any],
                                    new: tuple[str, str | None]) -> ClosureChanges | None:
        """lastChanges after a confirmed deployment, from (system, derivation) before and after; a failure becomes a
        note and a warning, never an error."""
        (before, before_drv), (after, after_drv) = old, new
        try:
            return await self._last_changes(nix, before, after, before_drv, after_drv)
        except asyncio.CancelledError:
            # Cancelled after the deployment finished: record it all the same.
            return ClosureChanges(before=str(before), after=after, note="no package diff: cancelled")
        except Exception as e:  # any failure here must not undo a confirmed deploy
            note = f"no package diff: comparing {before} with {after} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
            self.ctx.warn(urn, f"{after} is deployed and confirmed; {note}")
            return ClosureChanges(before=str(before), after=after, note=note)

    async def _last_changes(self, nix: Nix, before: Any, after: str, before_drv: Any,
                            after_drv: str | None) -> ClosureChanges | None:
        if not isinstance(before, str) or before == after:
            return None
        if await nix.is_valid(before) and await nix.is_valid(after):
            return await closure_changes(nix, before, after)
        # Built elsewhere (a build host, the target): the derivations name the same packages, as preview's do.
        if isinstance(before_drv, str) and after_drv is not None and await nix.is_valid(before_drv) \
                and await nix.is_valid(after_drv):
            return await derivation_changes(nix, before_drv, after_drv, before, after)
        return ClosureChanges(before=before, after=after,
                              note="no package diff: both systems (or their derivations) must be in the deployer's "
                                   "store")

    async def _observed(self, base: dict[str, Any], remote: Remote) -> dict[str, Any]:
        """Best effort: what the machine runs after a failure we could not classify."""
        try:
            state = await engine.read_state(remote, SYSTEM)
        except EngineError:
            return base
        same = state.current_system == base.get("systemPath")
        return {**base, "systemPath": state.current_system,
                "systemDerivation": base.get("systemDerivation") if same else None,
                "generation": state.generation.number if state.generation else base.get("generation")}

    # -- Read / Delete ----------------------------------------------------------

    async def read(self, urn: str, ident: str, state: dict[str, Any], inputs: dict[str, Any],
                   ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        # `pulumi import`: no state yet. With only an ID (host:port), the
        # connection comes from the ID; with --properties or `import` in the
        # program, from the inputs the engine passes.
        importing = not state
        if not state.get("connection") and not inputs.get("connection"):
            host, _, rest = ident.rpartition(":") if ident.count(":") == 1 else (ident, "", "22")
            inputs = {**inputs, "connection": {"host": host, "port": int(rest or 22),
                                               "user": self.ctx.default_user or "root"}}
        props = {**inputs, **state} if state else dict(inputs)
        props["connection"] = state.get("connection") or inputs.get("connection")
        remote = self._remote(props, host_key=state.get("hostKey"))
        async with self.ctx.ssh_slots:
            now = await engine.read_state(remote, SYSTEM)
        outputs = {
            **secrecy.secret_fields(props),
            "systemPath": now.current_system,
            # The recorded derivation describes the recorded system only (drift makes it unknown).
            "systemDerivation": state.get("systemDerivation") if now.current_system == state.get("systemPath") else None,
            "generation": now.generation.number if now.generation else None,
            "hostKey": now.host_key,
            "nixosVersion": now.nixos_version,
            "needsReboot": bool(now.reboot_for),
        }
        if not importing:
            outputs["secretFiles"] = await self._refresh_files(urn, remote, state)
            if now.current_system and inputs.get("systemPath") not in (None, now.current_system):
                # Drift: the inputs say what runs, so refresh shows the running
                # system and the next preview `running => declared`.
                inputs = {**inputs, "systemPath": now.current_system}
            return _id(remote), outputs, inputs
        # Import: what runs now is the baseline to return to on destroy, and
        # the inputs describe it, so the generated code deploys nothing.
        # No secret file is recorded yet (the next up writes them), and
        # outputs never carry their contents.
        outputs["secretFiles"] = None
        outputs["baselineGeneration"] = outputs["generation"]
        outputs["baselineSystemPath"] = now.current_system
        outputs.setdefault("action", "switch")
        outputs.setdefault("onDestroy", "rollback")
        new_inputs = {k: inputs[k] for k in INPUT_KEYS if inputs.get(k) is not None}
        new_inputs["connection"] = normalized.normalize_connection(inputs["connection"], self.ctx.default_user)
        # The defaults Check fills in, so the generated code's Check adds nothing to diff against.
        new_inputs.setdefault("action", "switch")
        new_inputs.setdefault("onDestroy", "rollback")
        if not Closure.parse(new_inputs, "systemPath").evaluated and new_inputs.get("systemPath") is None:
            if now.current_system is None:
                raise EngineError(f"cannot import {remote.target}: it has no /run/current-system, so there is no "
                                  "system to describe (is it running NixOS?)")
            new_inputs["systemPath"] = now.current_system
            outputs["systemPath"] = now.current_system
        return _id(remote), outputs, new_inputs

    async def _refresh_files(self, urn: str, remote: Remote, state: dict[str, Any]) -> Any:
        """The secretFiles records as the host has the files now: a file changed or removed on the host is
        recorded as it is, so the next up writes it again (the preview names it)."""
        recorded, key = conversion.recorded_files(state.get("secretFiles")), _files_key(state)
        if not recorded or key is None:
            return state.get("secretFiles")
        try:
            async with self.ctx.ssh_slots:
                found = await files.read_placed(remote, recorded, key)
        except EngineError as e:
            self.ctx.warn(urn, f"{describe(e)}; the secret files' records are kept as they were")
            return state.get("secretFiles")
        for f in found:
            drift = f.drift()
            if drift:
                self.ctx.warn(urn, f"secret file {f.recorded.path} on the host: {drift} since it was written; "
                                   "the next `pulumi up` writes it again")
        return conversion.secret_files_output(tuple(f.now for f in found if f.now is not None))

    async def delete(self, urn: str, ident: str, state: dict[str, Any]) -> None:
        recorded = RecordedMachine.parse(state)
        if recorded.on_destroy == "retain":
            self.ctx.info(urn, "onDestroy is `retain`: leaving the machine as it is, secret files included")
            return
        if self.ctx.replaced_in_place(urn, recorded.host_key, SYSTEM_PROFILE):
            self.ctx.info(urn, "its replacement manages the same machine (the same host key): leaving the system "
                               "and secret files the replacement deployed")
            return
        remote = self._remote_of(recorded.connection, recorded.host_key)
        baseline = recorded.baseline_generation
        if baseline is None:
            self.ctx.warn(urn, "no baseline generation was recorded; leaving the system as it is")
        else:
            self.ctx.status(urn, f"rolling back to the baseline generation {baseline}")
            async with self.ctx.ssh_slots:
                await engine.rollback_to(remote, SYSTEM, baseline, status=lambda s: self.ctx.status(urn, s),
                                         output=lambda s: self.ctx.info(urn, s), fallback_path=recorded.baseline_path)
        await self._remove_secret_files(urn, remote, recorded.secret_files)

    async def _remove_secret_files(self, urn: str, remote: Remote, recorded: tuple[files.RecordedFile, ...]) -> None:
        """After the rollback: the baseline system predates these files, so nothing running needs them."""
        if not recorded:
            return
        self.ctx.status(urn, "removing secret files")
        async with self.ctx.ssh_slots:
            kept = await files.remove_for_destroy(remote, recorded)
        if kept:
            self.ctx.info(urn, f"secret files kept (keepOnDestroy): {', '.join(kept)}")


# -- secret files in state and diffs ---------------------------------------------------


def _now_running(failed: dict[str, Any], e: DeployError) -> dict[str, Any]:
    """After a failed deployment: the system and generation the engine says the host runs."""
    after = {**failed}
    if e.now_running:
        after["systemPath"] = e.now_running
        if e.now_running != failed.get("systemPath"):
            after["systemDerivation"] = None  # not the system whose derivation was recorded
    if e.generation is not None:
        after["generation"] = e.generation
    return after


def _files_key(olds: dict[str, Any]) -> bytes | None:
    key = reveal(olds.get(FILES_KEY))
    return base64.b64decode(key) if isinstance(key, str) and key else None


def _with_files(outputs: dict[str, Any], placement: files.Placement) -> dict[str, Any]:
    """Outputs with the secret files as recorded (hashes, never contents) and the HMAC key as a secret."""
    records = placement.records()
    key = Secret(base64.b64encode(placement.key).decode()) if records else None  # no files, no key to keep
    return {**outputs, "secretFiles": conversion.secret_files_output(records), FILES_KEY: key}


def _built_elsewhere(news: dict[str, Any]) -> bool:
    """Whether the deployment builds the system on the target (`buildOn: remote`) or a build host, not here."""
    return news.get("buildOn") == "remote" or news.get("buildHost") is not None


def _reboots(news: dict[str, Any], changes: ClosureChanges | None) -> bool:
    """Whether the previewed deployment reboots the host (`reboot`; for ifNeeded, the predicted boot changes)."""
    mode = news.get("reboot")
    if mode == "always":
        return news.get("action") in (None, "switch", "boot")
    return mode == "ifNeeded" and changes is not None and not changes.note and bool(changes.boot_changes)


def _files_preview(olds: dict[str, Any] | None, news: dict[str, Any]) -> dict[str, Any]:
    """The secretFiles outputs a preview shows: the hashes where the key and contents are known."""
    key = _files_key(olds or {})
    wanted = news.get("secretFiles")
    if wanted is None:
        return {"secretFiles": None, FILES_KEY: (olds or {}).get(FILES_KEY)}
    if key is None or contains_unknown(wanted):
        return {"secretFiles": UNKNOWN, FILES_KEY: (olds or {}).get(FILES_KEY) or UNKNOWN}
    records = tuple(f.record(key) for f in conversion.to_secret_files(wanted))
    return {"secretFiles": conversion.secret_files_output(records), FILES_KEY: (olds or {}).get(FILES_KEY)}


def _secret_files_diff(olds: dict[str, Any], news: dict[str, Any]) -> dict[str, str]:
    """Which secret files change, by their index in the new list; contents are compared by HMAC."""
    wanted = news.get("secretFiles")
    if contains_unknown(wanted):
        return {"secretFiles": "UPDATE"}
    recorded = {r.path: r for r in conversion.recorded_files(olds.get("secretFiles"))}
    key = _files_key(olds) or b""
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
