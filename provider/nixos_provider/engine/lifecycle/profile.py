"""A Nix profile brought to its declared store path: build, deploy (with its activate command), record."""

from __future__ import annotations

from dataclasses import replace

from ..deploy import read_state
from ..errors import DeployError, EngineError
from ..nix.cli import Nix
from .deployment import keeping_baseline, run_deployment
from .models import ConvergeFailed, Limits, ProfileGoal, ProfileRecord, Report, now_rfc3339


async def converge(limits: Limits, goal: ProfileGoal, recorded: ProfileRecord | None, nix: Nix,
                   report: Report) -> ProfileRecord:
    """Bring the profile to the goal. recorded: as recorded (None: new to us, its generation now is the baseline)."""
    req = goal.request
    if recorded is None:
        async with limits.ssh_slots:
            baseline = await read_state(req.remote, req.profile)
        gen = baseline.generation
        base = ProfileRecord(profile_path=req.profile.path, host_key=baseline.host_key,
                             baseline_generation=gen.number if gen else 0,
                             baseline_store_path=gen.store_path if gen else None,
                             store_path=gen.store_path if gen else None, generation=gen.number if gen else 0)
        req = replace(req, remote=replace(req.remote, host_key=baseline.host_key))
        failed, with_new_inputs = base, True
    else:
        failed, with_new_inputs = replace(recorded, host_key=req.remote.host_key), False
        base = replace(failed, build_host_key=goal.build_host_key)
        if not goal.deploys:
            return base
    try:
        store_path, drv = await _built(goal)
    except (EngineError, ValueError) as e:
        raise ConvergeFailed(report.describe(e), failed, with_new_inputs=with_new_inputs) from e
    req = keeping_baseline(replace(req, store_path=store_path, build_drv=drv,
                                   build_host=goal.build_host if drv else None), base.baseline_generation)
    result = await run_deployment(limits, req, nix, report, failed=failed, with_new_inputs=with_new_inputs,
                                  after_failure=_now_running)
    return replace(base, store_path=result.store_path, generation=result.generation,
                   previous_generation=result.previous_generation, host_key=result.host_key or req.remote.host_key,
                   deployed_at=now_rfc3339(), pushed_paths=result.push.paths, pushed_bytes=result.push.bytes,
                   substituted_paths=result.push.substituted, build_host_key=result.build_host_key)


async def _built(goal: ProfileGoal) -> tuple[str, str | None]:
    """(the store path, the derivation to build remotely): built here, or its derivation for the host or the
    build host to build."""
    if (goal.build_on_target or goal.build_host is not None) and goal.source.evaluated:
        evaluation = await goal.source.evaluation()
        if evaluation.drv_path is not None:
            return evaluation.out_path, evaluation.drv_path
    return await goal.source.build(), None


def _now_running(failed: ProfileRecord, e: DeployError) -> ProfileRecord:
    """After a failed deployment: the profile's generation the engine left in place (0: none)."""
    return replace(failed, store_path=e.now_running, generation=e.generation or 0)
