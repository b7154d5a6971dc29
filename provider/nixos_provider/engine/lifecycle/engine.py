"""The engine a resource layer is handed: every operation on a machine or profile, whole (a test hands a fake)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .. import deploy as deployments
from ..deploy import TargetState
from ..errors import EngineError
from ..models import SYSTEM_PROFILE, Profile, Remote
from ..nix.cli import Nix
from ..nix.closure_diff import ClosureChanges
from ..target import secret_files as files
from . import machine, preview, profile
from .models import Limits, MachineGoal, MachineRecord, PreviewGoal, ProfileGoal, ProfileRecord, Report


@dataclass
class Engine:
    limits: Limits = field(default_factory=Limits)

    async def converge_machine(self, goal: MachineGoal, recorded: MachineRecord | None, nix: Nix,
                               report: Report) -> MachineRecord:
        return await machine.converge(self.limits, goal, recorded, nix, report)

    async def converge_profile(self, goal: ProfileGoal, recorded: ProfileRecord | None, nix: Nix,
                               report: Report) -> ProfileRecord:
        return await profile.converge(self.limits, goal, recorded, nix, report)

    async def pending_changes(self, goal: PreviewGoal, nix: Nix, report: Report) -> ClosureChanges:
        return await preview.pending_changes(self.limits, goal, nix, report)

    async def read_state(self, remote: Remote, profile: Profile, *, with_generations: bool = False) -> TargetState:
        async with self.limits.ssh_slots:
            return await deployments.read_state(remote, profile, with_generations=with_generations)

    async def refresh_machine(self, remote: Remote, recorded: MachineRecord, report: Report, *,
                              importing: bool = False) -> MachineRecord:
        """The record as the host has it now: what runs, its generation, host key, version and a reboot due; the
        recorded derivation only while it still describes what runs; the secret files as found. An import (nothing
        recorded of this host yet) takes what runs as the baseline a destroy returns to, and records no secret file
        (the next deployment writes them)."""
        now = await self.read_state(remote, machine.SYSTEM)
        record = replace(
            recorded,
            system_path=now.current_system,
            system_derivation=recorded.system_derivation if now.current_system == recorded.system_path else None,
            generation=now.generation.number if now.generation else None,
            host_key=now.host_key,
            nixos_version=now.nixos_version,
            needs_reboot=bool(now.reboot_for),
        )
        if importing:
            return replace(record, secret_files=(), secret_files_key=None, baseline_generation=record.generation,
                           baseline_system_path=now.current_system)
        return replace(record, secret_files=await self.read_secret_files(remote, recorded, report))

    async def refresh_profile(self, remote: Remote, profile: Profile, recorded: ProfileRecord, *,
                              importing: bool = False) -> ProfileRecord:
        """The profile's record as the host has it now: its generation and store path (none: generation 0), the
        host key. An import takes them as the baseline a destroy returns to."""
        now = await self.read_state(remote, profile)
        gen = now.generation
        record = replace(recorded, profile_path=profile.path, store_path=gen.store_path if gen else None,
                         generation=gen.number if gen else 0, host_key=now.host_key)
        if importing:
            return replace(record, baseline_generation=record.generation, baseline_store_path=record.store_path)
        return record

    async def read_secret_files(self, remote: Remote, recorded: MachineRecord,
                                report: Report) -> tuple[files.RecordedFile, ...]:
        """The secret files' records as the host has the files now: a file changed or removed on the host is
        recorded as it is, so the next deployment writes it again. Unreadable: the records as they were."""
        if not recorded.secret_files or recorded.secret_files_key is None:
            return recorded.secret_files
        try:
            async with self.limits.ssh_slots:
                found = await files.read_placed(remote, recorded.secret_files, recorded.secret_files_key)
        except EngineError as e:
            report.warn(f"{report.describe(e)}; the secret files' records are kept as they were")
            return recorded.secret_files
        for f in found:
            drift = f.drift()
            if drift:
                report.warn(f"secret file {f.recorded.path} on the host: {drift} since it was written; "
                            "the next `pulumi up` writes it again")
        return tuple(f.now for f in found if f.now is not None)

    async def destroy_machine(self, remote: Remote, recorded: MachineRecord, report: Report) -> None:
        """Roll the system back to the baseline generation, then remove the secret files (the baseline predates
        them, so nothing running needs them), except those kept on destroy."""
        baseline = recorded.baseline_generation
        if baseline is None:
            report.warn("no baseline generation was recorded; leaving the system as it is")
        else:
            report.status(f"rolling back to the baseline generation {baseline}")
            async with self.limits.ssh_slots:
                await deployments.rollback_to(remote, Profile(SYSTEM_PROFILE), baseline, status=report.status,
                                              output=report.info, fallback_path=recorded.baseline_system_path)
        if not recorded.secret_files:
            return
        report.status("removing secret files")
        async with self.limits.ssh_slots:
            kept = await files.remove_for_destroy(remote, recorded.secret_files)
        if kept:
            report.info(f"secret files kept (keepOnDestroy): {', '.join(kept)}")

    async def destroy_profile(self, remote: Remote, profile: Profile, recorded: ProfileRecord, *, remove: bool,
                              activate_command: str | None, report: Report) -> None:
        """Roll the profile back to its baseline generation; remove it when asked or when it had none."""
        baseline = recorded.baseline_generation or 0
        async with self.limits.ssh_slots:
            if remove or baseline == 0:
                report.status(f"removing {profile.path}")
                await deployments.remove_profile(remote, profile)
            else:
                report.status(f"rolling {profile.path} back to generation {baseline}")
                await deployments.rollback_to(remote, profile, baseline, activate_command=activate_command,
                                              status=report.status, output=report.info,
                                              fallback_path=recorded.baseline_store_path)
