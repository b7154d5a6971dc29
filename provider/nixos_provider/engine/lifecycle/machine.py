"""A NixOS machine brought to its declared system, start to finish (DESIGN §3, §install).

install or adopt -> build -> secret files needed before activation -> the deployment -> the other secret files
-> health checks (after an install; a deployment runs its own). Each step that fails raises `ConvergeFailed`
with the record of what the host runs then, and which secret files are in place.
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import replace

from .. import install as installer
from ..closures.build_host import BuildHost
from ..closures.push import push_closure
from ..deploy import check_health, read_state
from ..errors import DeployError, EngineError, NoNixosConfiguration, NotNixos
from ..install import source as install_sources
from ..models import INSTALL_PHASES, SYSTEM_PROFILE, InstallRequest, Profile, Remote
from ..nix.cli import DISKO_SCRIPT, Evaluation, Nix
from ..nix.closure_diff import ClosureChanges, closure_changes, derivation_changes
from ..target import secret_files as files
from ..transport.process import Target
from .deployment import keeping_baseline, run_deployment
from .models import ConvergeFailed, Limits, MachineGoal, MachineRecord, Report, SystemSource, now_rfc3339

SYSTEM = Profile(SYSTEM_PROFILE)


async def converge(limits: Limits, goal: MachineGoal, recorded: MachineRecord | None, nix: Nix,
                   report: Report) -> MachineRecord:
    """Bring the machine to the goal. recorded: the machine as recorded (None: it is new to us)."""
    if goal.install is not None:
        return await _install(limits, goal, goal.install, recorded or MachineRecord(), nix, report)
    if recorded is None:
        return await _adopt(limits, goal, nix, report)
    pinned = goal.remote.host_key
    base = replace(recorded, host_key=pinned, build_host_key=goal.build_host_key, pending_changes=None)
    placement = _placement(goal, recorded, pinned)
    if not goal.deploys:
        return await _place_files(limits, base, placement, report)
    # Until the new system is confirmed, the record goes with the previous inputs.
    kept = replace(recorded, host_key=pinned)
    return await _deploy(limits, goal, base, placement, nix, report, kept=kept)


async def _adopt(limits: Limits, goal: MachineGoal, nix: Nix, report: Report) -> MachineRecord:
    """A host that runs NixOS already: its system now is the baseline a destroy returns to."""
    remote = goal.remote
    report.status(f"connecting to {remote.target}")
    # Build while the host is read: the build does not need it, and the machines created together then share one
    # `nix build`.
    building = _start_build(goal)
    try:
        async with limits.ssh_slots:
            baseline = await read_state(remote, SYSTEM)
        if baseline.generation is None and baseline.current_system is None:
            raise NotNixos(remote.target)
    except BaseException:
        if building is not None:
            building.cancel()
        raise
    gen = baseline.generation
    base = MachineRecord(
        host_key=baseline.host_key,
        baseline_generation=gen.number if gen else None,
        baseline_system_path=baseline.current_system or (gen.store_path if gen else None),
        system_path=baseline.current_system,
        generation=gen.number if gen else None,
        nixos_version=baseline.nixos_version,
        needs_reboot=bool(baseline.reboot_for),
        build_host_key=goal.build_host_key,
    )
    placement = _placement(goal, MachineRecord(), baseline.host_key)
    return await _deploy(limits, replace(goal, remote=replace(remote, host_key=baseline.host_key)), base, placement,
                         nix, report, building=building)


def _start_build(goal: MachineGoal) -> asyncio.Task[str] | None:
    """Start building the system now, if it is built here (not on the target or a build host)."""
    if goal.build_on_target or goal.build_host is not None:
        return None
    task = asyncio.ensure_future(goal.source.build())
    task.add_done_callback(lambda t: t.cancelled() or t.exception())  # awaited later, or dropped
    return task


# -- secret files --------------------------------------------------------------------------


def _placement(goal: MachineGoal, recorded: MachineRecord, pinned: str | None) -> files.Placement:
    """What the secret files need on this run: compared with the records (hashes) kept so far."""
    key = recorded.secret_files_key or base64.b64decode(files.new_key())
    return files.Placement(replace(goal.remote, host_key=pinned), recorded.secret_files, goal.secret_files, key)


def _with_files(record: MachineRecord, placement: files.Placement) -> MachineRecord:
    """The record with the secret files as placed (hashes, never contents); no files, no key to keep."""
    records = placement.records()
    return replace(record, secret_files=records, secret_files_key=placement.key if records else None)


async def _place_files(limits: Limits, record: MachineRecord, placement: files.Placement, report: Report, *,
                       after_switch: bool = False) -> MachineRecord:
    """Write what is left to write and remove what was dropped; no activation follows."""
    plan = placement.plan
    if plan.after or plan.remove or (plan.before and not after_switch):
        report.status(f"placing secret files: {', '.join(plan.changed_paths()) or 'none'}"
                      + (f"; removing {', '.join(plan.remove)}" if plan.remove else ""))
    try:
        async with limits.ssh_slots:
            await (placement.after_activation() if after_switch else placement.all_stages())
    except EngineError as e:
        done = "the system is deployed, but " if after_switch else "the system was not changed; "
        raise ConvergeFailed(f"{done}{report.describe(e)}", _with_files(record, placement),
                             with_new_inputs=True) from e
    return _with_files(record, placement)


# -- install -------------------------------------------------------------------------------


async def _install_source(goal: MachineGoal, req: InstallRequest, nix: Nix, report: Report,
                          ) -> install_sources.InstallSource:
    """The disko script and flake for nixos-anywhere: built here when they can be, so a broken configuration
    fails before the host is touched. A system without a flake goes as a store path, with the request's disko
    script."""
    return await install_sources.install_source(
        nix, build_system=goal.source.build, status=report.status, disko_script=req.disko_script,
        build_on_target=req.build_on == "remote", flake=goal.source.flake, phases=req.phases)


async def _install_source_on_build_host(limits: Limits, goal: MachineGoal, req: InstallRequest, nix: Nix,
                                        report: Report) -> install_sources.InstallSource:
    """With a build host, what the deployer would build is built there: the system and the disko script (unless
    the request brings its own). Both are then copied here, where nixos-anywhere takes them from."""
    assert goal.build_host is not None
    flake = goal.source.flake
    builds = [await goal.source.evaluation()]
    disko = req.disko_script
    if disko is None:
        disko_ref = flake.build_product(DISKO_SCRIPT) if flake is not None and flake.system is not None else None
        if flake is None or disko_ref is None:
            raise NoNixosConfiguration(flake)
        if "disko" in (req.phases or INSTALL_PHASES):
            builds.append(await nix.evaluate(disko_ref))
    if any(b.drv_path is None for b in builds):
        return await _install_source(goal, req, nix, report)  # nothing to build there (an impure evaluation)
    report.status(f"connecting to the build host {goal.build_host.target}")
    async with limits.ssh_slots:
        builder = await BuildHost.open(goal.build_host, goal.remote)
        try:
            for built in builds:
                assert built.drv_path is not None
                await push_closure(nix, Target(builder.conn), built.drv_path)
                report.status(f"building {built.drv_path} on the build host {goal.build_host.target}")
                await builder.build(built.drv_path, built.out_path, req.timeout)
            report.status(f"copying {', '.join(b.out_path for b in builds)} from the build host to the deployer, "
                          "for nixos-anywhere")
            await builder.copy_here(nix, [b.out_path for b in builds], req.timeout)
        finally:
            await builder.close()
    if disko is None and len(builds) > 1:
        disko = builds[1].out_path
    elif disko is not None and not await nix.is_valid(disko):
        report.status(f"realising {disko}")
        await nix.build(disko)
    return install_sources.InstallSource(disko_script=disko) if disko else install_sources.InstallSource(
        flake=str(flake.system if flake is not None else goal.source.store_path))


async def _install(limits: Limits, goal: MachineGoal, req: InstallRequest, recorded: MachineRecord, nix: Nix,
                   report: Report) -> MachineRecord:
    """Install NixOS with nixos-anywhere (or adopt the host if it already runs NixOS), then manage it.

    Secret files are placed once the installed system runs (both stages: nixos-anywhere's activation has
    passed); files the first boot needs belong in the install's extra files.
    """
    remote = goal.remote
    base = MachineRecord(install_status="failed", secret_files=recorded.secret_files,
                         secret_files_key=recorded.secret_files_key)

    def failed(message: str, error: str) -> ConvergeFailed:
        return ConvergeFailed(message, replace(base, install_error=error), with_new_inputs=True)

    try:
        on_build_host = goal.build_host is not None and req.build_on != "remote" and goal.source.evaluated
        source = await (_install_source_on_build_host(limits, goal, req, nix, report) if on_build_host
                        else _install_source(goal, req, nix, report))
    except EngineError as e:
        raise failed(f"{report.describe(e)}; nothing was installed and the host was not touched",
                     f"build: {report.describe(e)}") from e
    system = str(goal.source.store_path)
    req = replace(req, system_path=system, disko_script=source.disko_script, flake=source.flake)
    try:
        async with limits.ssh_slots:
            result = await installer.install(req, status=report.status, output=report.info)
    except installer.InstallError as e:
        raise failed(f"installing NixOS on {remote.target} failed: {report.describe(e)}",
                     f"{e.phase}: {report.describe(e).splitlines()[0]}") from e
    except EngineError as e:
        raise failed(f"installing NixOS on {remote.target} failed before nixos-anywhere ran: {report.describe(e)}",
                     f"connect: {report.describe(e)}") from e
    gen, now = result.generation, now_rfc3339()
    installed = replace(
        base,
        install_status="installed" if result.installed else "adopted",
        installed_at=now if result.installed else None,
        host_key=result.host_key,
        baseline_generation=gen.number if gen else None,
        baseline_system_path=result.current_system,
        system_path=result.current_system,
        generation=gen.number if gen else None,
        nixos_version=result.nixos_version,
        deployed_at=now if result.installed else None,
    )
    if result.current_system == system and goal.source.evaluated:
        installed = replace(installed, system_derivation=await _derivation_of(goal.source, system))
    if result.installed:
        report.info(f"installed {result.current_system} as generation {installed.generation}; "
                    f"host key pinned from {result.host_key_source}")
    goal = replace(goal, remote=replace(remote, host_key=result.host_key))
    placement = _placement(goal, recorded, result.host_key)
    if result.current_system != system:
        # Adopted a NixOS host that runs something else: deploy as for any adopted machine.
        return await _deploy(limits, goal, installed, placement, nix, report)
    if goal.request.health_checks:
        try:
            async with limits.ssh_slots:
                await check_health(goal.remote, goal.request.health_checks, status=report.status)
        except EngineError as e:
            raise ConvergeFailed(f"{report.describe(e)}; the host runs the installed system {system} (generation "
                                 f"{installed.generation}), which has no earlier generation to roll back to",
                                 installed, with_new_inputs=True) from e
    return await _place_files(limits, installed, placement, report)


async def _derivation_of(source: SystemSource, system: str) -> str | None:
    """The derivation of the installed system, for the next preview's package diff (never fails the install)."""
    try:
        evaluation = await source.evaluation()
    except (EngineError, ValueError):
        return None
    return evaluation.drv_path if evaluation.out_path == system else None


# -- the deployment --------------------------------------------------------------------------


async def _deploy(limits: Limits, goal: MachineGoal, base: MachineRecord, placement: files.Placement, nix: Nix,
                  report: Report, *, kept: MachineRecord | None = None,
                  building: asyncio.Task[str] | None = None) -> MachineRecord:
    """Deploy the goal's system with its secret files around the activation. On failure, the record is `kept`
    (the previous inputs' record; else base) updated to what runs and which files are in place."""
    failed = _with_files(kept if kept is not None else base, placement)
    with_new_inputs = kept is None
    source = goal.source
    evaluation: Evaluation | None = None
    try:
        if source.evaluated:
            evaluation = await source.evaluation()
        if (goal.build_on_target or goal.build_host is not None) and evaluation is not None:
            store_path = source.store_path or evaluation.out_path
        else:
            store_path = await (building or source.build())
    except (EngineError, ValueError) as e:
        raise ConvergeFailed(report.describe(e), failed, with_new_inputs=with_new_inputs) from e
    drv = evaluation.drv_path if evaluation is not None and evaluation.out_path == store_path else None
    if placement.plan.before:
        report.status(f"placing secret files before activation: {', '.join(f.path for f in placement.plan.before)}")
        try:
            async with limits.ssh_slots:
                await placement.before_activation()
        except EngineError as e:
            raise ConvergeFailed(f"{report.describe(e)}; the new system was not activated",
                                 _with_files(failed, placement), with_new_inputs=with_new_inputs) from e
    failed = _with_files(failed, placement)
    # Without the derivation of what it deploys (an impure evaluation), nothing can be built remotely.
    builder = None if goal.build_host is None or drv is None else goal.build_host
    req = keeping_baseline(replace(goal.request, remote=goal.remote, store_path=store_path, profile=SYSTEM,
                                   build_drv=drv if goal.build_on_target or builder is not None else None,
                                   build_host=builder), base.baseline_generation)

    async def observe(record: MachineRecord) -> MachineRecord:
        return await _observed(record, goal.remote)

    result = await run_deployment(limits, req, nix, report, failed=failed, with_new_inputs=with_new_inputs,
                                  after_failure=_now_running, observe=observe)
    # The deployment is confirmed: the new system runs. Nothing from here on may fail the operation, or the
    # record would fall behind the host.
    deployed_drv = drv if result.store_path == store_path else None
    last = await _last_changes_or_note(nix, report, (base.system_path, base.system_derivation),
                                       (result.store_path, deployed_drv))
    deployed = replace(
        base,
        pending_changes=None,
        last_changes=last.to_output() if last else None,
        system_path=result.store_path,
        generation=result.generation,
        previous_generation=result.previous_generation,
        host_key=result.host_key or goal.remote.host_key,
        deployed_at=now_rfc3339(),
        pushed_paths=result.push.paths,
        pushed_bytes=result.push.bytes,
        substituted_paths=result.push.substituted,
        system_derivation=deployed_drv,
        nixos_version=result.nixos_version,
        needs_reboot=bool(result.reboot_for),
        build_host_key=result.build_host_key,
    )
    return await _place_files(limits, deployed, placement, report, after_switch=True)


def _now_running(failed: MachineRecord, e: DeployError) -> MachineRecord:
    """After a failed deployment: the system and generation the engine says the host runs."""
    after = failed
    if e.now_running:
        after = replace(after, system_path=e.now_running,
                        # not the system whose derivation was recorded
                        system_derivation=after.system_derivation if e.now_running == failed.system_path else None)
    if e.generation is not None:
        after = replace(after, generation=e.generation)
    return after


async def _observed(record: MachineRecord, remote: Remote) -> MachineRecord:
    """Best effort: what the machine runs after a failure the engine could not classify."""
    try:
        state = await read_state(remote, SYSTEM)
    except EngineError:
        return record
    same = state.current_system == record.system_path
    return replace(record, system_path=state.current_system,
                   system_derivation=record.system_derivation if same else None,
                   generation=state.generation.number if state.generation else record.generation)


async def _last_changes_or_note(nix: Nix, report: Report, old: tuple[str | None, str | None],
                                new: tuple[str, str | None]) -> ClosureChanges | None:
    """The package diff after a confirmed deployment, from (system, derivation) before and after; a failure
    becomes a note and a warning, never an error."""
    (before, before_drv), (after, after_drv) = old, new
    try:
        return await _last_changes(nix, before, after, before_drv, after_drv)
    except asyncio.CancelledError:
        # Cancelled after the deployment finished: record it all the same.
        return ClosureChanges(before=str(before), after=after, note="no package diff: cancelled")
    except Exception as e:  # any failure here must not undo a confirmed deploy
        note = (f"no package diff: comparing {before} with {after} failed: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        report.warn(f"{after} is deployed and confirmed; {note}")
        return ClosureChanges(before=str(before), after=after, note=note)


async def _last_changes(nix: Nix, before: str | None, after: str, before_drv: str | None,
                        after_drv: str | None) -> ClosureChanges | None:
    if before is None or before == after:
        return None
    if await nix.is_valid(before) and await nix.is_valid(after):
        return await closure_changes(nix, before, after)
    # Built elsewhere (a build host, the target): the derivations name the same packages, as preview's do.
    if before_drv is not None and after_drv is not None and await nix.is_valid(before_drv) \
            and await nix.is_valid(after_drv):
        return await derivation_changes(nix, before_drv, after_drv, before, after)
    return ClosureChanges(before=before, after=after,
                          note="no package diff: both systems (or their derivations) must be in the deployer's store")
