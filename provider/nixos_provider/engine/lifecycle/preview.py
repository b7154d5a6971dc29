"""What a machine's deployment would change, before anything changes: the package diff, the restarts."""

from __future__ import annotations

from dataclasses import replace

from ..deploy import deploy
from ..errors import EngineError
from ..models import DeployRequest
from ..nix.cli import Nix
from ..nix.closure_diff import ClosureChanges, closure_changes, derivation_changes
from ..target.dry_activate import parse_dry_activate
from .machine import SYSTEM
from .models import Limits, PreviewGoal, Report


async def pending_changes(limits: Limits, goal: PreviewGoal, nix: Nix, report: Report) -> ClosureChanges:
    """The package diff from both closures when they are here, else from both derivations; with dry-activate's
    restarts when asked. Its lines are reported; without a diff, the note saying why."""
    old, new = goal.current, goal.new
    if not await nix.is_valid(new) and goal.build_on_preview and not goal.built_elsewhere \
            and goal.source is not None and goal.source.evaluated:
        report.info(f"building {new} for the preview (buildOnPreview)")
        try:
            await goal.source.build()
        except EngineError as e:
            report.warn(f"preview build failed: {report.describe(e)}")
    missing = [label for label, path in (("new", new), ("current", old)) if not await nix.is_valid(path)]
    if missing:
        changes = await _derivation_changes(goal, nix, report)
        if changes is None:
            note = (f"no package diff: the {' and '.join(missing)} system is not in the local store"
                    + (" (set `buildOnPreview: true` to build it during preview)" if "new" in missing else ""))
            report.info(note)
            return ClosureChanges(before=old, after=new, note=note)
    else:
        changes = await closure_changes(nix, old, new)
    if goal.dry_activate:
        changes = await _dry_activate(limits, goal, nix, report, changes)
    for line in changes.lines():
        report.info(line)
    return changes


async def _derivation_changes(goal: PreviewGoal, nix: Nix, report: Report) -> ClosureChanges | None:
    """The package diff from the derivation closures (nothing built), when both derivations are here: the old one
    recorded at deploy, the new one from Check's evaluation (this process, or kept from an earlier run: then its
    derivation is still in the store)."""
    before = goal.current_derivation
    if before is None or goal.source is None:
        return None
    try:
        evaluation = await goal.source.evaluation()
    except (EngineError, ValueError):
        return None
    after = evaluation.drv_path
    if after is None or evaluation.out_path != goal.new:
        return None
    if not await nix.is_valid(before) or not await nix.is_valid(after):
        return None
    try:
        return await derivation_changes(nix, before, after, goal.current, evaluation.out_path)
    except EngineError as e:
        report.warn(f"no package diff: reading the derivations failed: {report.describe(e)}")
        return None


async def _dry_activate(limits: Limits, goal: PreviewGoal, nix: Nix, report: Report,
                        changes: ClosureChanges) -> ClosureChanges:
    """Copy the new system to the target and ask `switch-to-configuration dry-activate`. A system built on the
    target or a build host, and not here, is built there first, as the deployment would."""
    build_drv, build_host = None, None
    if goal.built_elsewhere and not await nix.is_valid(goal.new):
        if goal.source is None:
            report.warn("dry-activate skipped: the machine names no source to evaluate")
            return changes
        try:
            evaluation = await goal.source.evaluation()
        except (EngineError, ValueError) as e:
            report.warn(f"dry-activate skipped: {report.describe(e)}")
            return changes
        build_drv = evaluation.drv_path if evaluation.out_path == goal.new else None
        build_host = goal.build_host
    req = DeployRequest(remote=goal.remote, store_path=goal.new, profile=SYSTEM, action="dry-activate",
                        build_drv=build_drv, build_host=build_host)
    try:
        async with limits.ssh_slots:
            result = await deploy(req, nix, status=report.status, warn=report.warn, transfers=limits.transfer_slots)
    except EngineError as e:
        report.warn(f"dry-activate failed: {report.describe(e)}")
        return changes
    return replace(changes, would_restart=parse_dry_activate(result.output).restart)
