"""One deployment inside a lifecycle operation: the engine's failures become `ConvergeFailed` with what runs now."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from ..deploy import deploy
from ..errors import BuildHostError, ConnectError, DeployError, EngineError, HostBusy
from ..models import DeployRequest, DeployResult
from ..nix.cli import Nix
from .models import ConvergeFailed, Limits, MachineRecord, ProfileRecord, Report

R = TypeVar("R", MachineRecord, ProfileRecord)



async def run_deployment(limits: Limits, req: DeployRequest, nix: Nix, report: Report, *, failed: R,
                         with_new_inputs: bool, after_failure: Callable[[R, DeployError], R],
                         observe: Callable[[R], Awaitable[R]] | None = None) -> DeployResult:
    """Deploy req; on failure raise ConvergeFailed recording what the host runs now.

    failed: the record when the deployment changed nothing; a DeployError says what it left running
    (after_failure); another deployment holding the lock (HostBusy), a build host that failed before anything
    reached the target, or a host never reached changed nothing; any other failure is observed when the
    caller can, else recorded as failed.
    """
    def failure(e: EngineError, record: R, message: str | None = None) -> ConvergeFailed:
        return ConvergeFailed(message or report.describe(e), record, with_new_inputs=with_new_inputs)

    try:
        async with limits.ssh_slots:
            return await deploy(req, nix, status=report.status, output=report.info, warn=report.warn,
                                uploads=limits.uploads, transfers=limits.transfer_slots)
    except DeployError as e:
        raise failure(e, after_failure(failed, e)) from e
    except HostBusy as e:
        raise failure(e, failed) from e  # nothing changed: what runs is another deployment's business
    except BuildHostError as e:
        runs = failed.generation
        now = f"it still runs generation {runs} ({_path_of(failed)})" if runs is not None else "it runs what it ran"
        raise failure(e, failed, f"{report.describe(e)}; {req.remote.target} was not changed: {now}") from e
    except ConnectError as e:
        # Not reached (or lost before the lock was taken): nothing changed, and a host that did not answer the
        # deployment's attempts would make observing it wait as long again.
        raise failure(e, failed) from e
    except EngineError as e:
        raise failure(e, await observe(failed) if observe is not None else failed) from e


def keeping_baseline(req: DeployRequest, baseline: int | None) -> DeployRequest:
    """req whose retention never deletes the baseline generation (a destroy returns to it)."""
    protect = (baseline,) if baseline is not None and baseline >= 1 else ()
    return replace(req, retention=replace(req.retention, protect=protect))


def _path_of(record: MachineRecord | ProfileRecord) -> str | None:
    return record.system_path if isinstance(record, MachineRecord) else record.store_path
