"""One deployment, start to finish (DESIGN §3).

connect (pinned host key) -> push (only what the target lacks) -> register
the generation -> activate under the target-side supervisor -> confirm over a
new connection -> health checks. Any failure after registering rolls back to
the previous generation, and the error says where the machine is now.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .closures import binary_cache
from .closures.build_host import BuildHost
from .closures.push import PushProgress, choose_compression, missing_paths, push_closure
from .errors import ConnectError, DeployError, EngineError, HostBusy, HostRebooted
from .models import (
    ACTIVATION_TIMEOUT,
    BinaryCache,
    DeployRequest,
    DeployResult,
    Generation,
    HealthCheck,
    Profile,
    PushStats,
    Remote,
)
from .nix.cli import Nix
from .nix.versions import build_failure
from .target import profiles, reboot
from .target.activation import ActivationOutcome, Supervisor
from .target.health import run_health_checks
from .target.supervisor_protocol import ActivationSpec, Cause, Phase, RollbackSpec, SupervisorState
from .timeline import Step, Steps
from .transport.process import Target
from .transport.ssh import Connection, connect

StatusFn = Callable[[str], None]
OUTPUT_TAIL_LINES = 20
SUPERVISOR_SAYS = "pulumi-nixos: "  # how supervisor.sh's own log lines begin


def _noop(_: str) -> None:
    pass


@dataclass(frozen=True)
class TargetState:
    """What a target runs now, as read over SSH."""

    host_key: str
    generation: Generation | None
    current_system: str | None
    nixos_version: str | None
    generations: tuple[Generation, ...] = ()
    reboot_for: tuple[str, ...] = ()  # boot files (kernel, initrd, kernel-modules) that wait for a reboot


async def open_target(remote: Remote, profile: Profile, *, compress: bool = False) -> Target:
    """Connect, and make sure sudo lets the SSH user act as the profile's user before anything else runs."""
    conn = await connect(remote, compress=compress)
    target = Target.for_profile(conn, profile)
    try:
        await target.check_elevation()
    except BaseException:
        await conn.close()
        raise
    return target


async def read_state(remote: Remote, profile: Profile, *, with_generations: bool = False) -> TargetState:
    """Read the profile's current generation, /run/current-system and the host key."""
    target = await open_target(remote, profile)
    try:
        return await read_target_state(target, profile, with_generations)
    finally:
        await target.conn.close()


async def read_target_state(target: Target, profile: Profile, with_generations: bool = False) -> TargetState:
    """What runs on an open connection: the profile's generation, /run/current-system, its version."""
    reading = await profiles.read_host(target, profile.path, system=profile.is_system)
    gens = tuple(await profiles.list_generations(target, profile.path)) if with_generations else ()
    return TargetState(target.conn.host_key, reading.generation, reading.current_system, reading.nixos_version, gens,
                       reading.pending_boot_files)


async def check_health(remote: Remote, checks: tuple[HealthCheck, ...], status: StatusFn = _noop) -> None:
    """Run health checks on a host outside a deployment (after installation)."""
    target = await open_target(remote, Profile())
    try:
        await run_health_checks(target, checks, status)
    finally:
        await target.conn.close()


def _tail(text: str, n: int = OUTPUT_TAIL_LINES) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


class Deployment:
    """Deploys one store path to one profile on one host."""

    def __init__(self, req: DeployRequest, nix: Nix, *, status: StatusFn = _noop, output: StatusFn = _noop,
                 warn: StatusFn = _noop, uploads: binary_cache.CacheUploads | None = None,
                 transfers: asyncio.Semaphore | None = None) -> None:
        self.req = req
        self.nix = nix
        self.status = status
        self.output = output
        self.warn = warn
        self.uploads = uploads or binary_cache.CacheUploads()
        self.transfers = transfers
        self.host_key: str | None = req.remote.host_key
        self.build_host_key: str | None = None
        self._new_gen: Generation | None = None
        # The generation before this deployment, and what it runs: where a rollback returns to.
        self._prev_gen: int | None = None
        self._prev_path: str | None = None
        self.steps = Steps(req.remote.target)

    def _pinned_remote(self) -> Remote:
        # Every later connection (confirmation, reconnects) must present the key
        # the first one pinned.
        return replace(self.req.remote, host_key=self.host_key, retries=1)

    async def _connect_again(self) -> Connection:
        return await connect(self._pinned_remote())

    def _on_phase(self, phase: Phase) -> None:
        """The supervisor's state, as steps of the timeline."""
        step = {Phase.ACTIVATING: Step.ACTIVATE, Phase.WAITING_CONFIRM: Step.CONFIRM,
                Phase.ROLLING_BACK: Step.ROLLBACK}.get(phase)
        if step is not None:
            self.steps.mark(step)

    async def run(self) -> DeployResult:
        req = self.req
        self.status(f"connecting to {req.remote.target}")
        self.steps.mark(Step.CONNECT)
        target = await open_target(req.remote, req.profile, compress=req.compress == "ssh")
        self.host_key = target.conn.host_key
        self._supervisor: Supervisor | None = None
        try:
            return await self._run(target)
        except BaseException:
            # Cancelled or failed: drop the connection at once, so remote
            # commands (an import mid-stream) see EOF instead of waiting on us.
            target.conn.abort()
            raise
        finally:
            self.steps.end()
            await target.conn.close()
            # The supervisor may have reconnected during activation.
            if self._supervisor is not None:
                await self._supervisor.close()

    async def _run(self, target: Target) -> DeployResult:
        """The steps of DESIGN §3, from the push on; each is one method below."""
        if self.req.build_host is not None and self.req.build_drv is not None:
            push = await self._build_on_build_host(target, self.req.build_host)
        else:
            push = await self._push(target)
            if self.req.build_drv:
                await self._build_on_target(target)
        if self.req.action == "dry-activate":
            return await self._dry_activate(target, push)
        if await self._reboots(target):
            return await self._reboot(target, push)
        supervisor = await self._take_lock(target)
        try:
            return await self._activate(supervisor, push)
        except asyncio.CancelledError:
            # A cancelled `pulumi up`: the host must not be left to a
            # supervisor nobody waits for. Roll back now, wait, report.
            raise await self._abort(supervisor, "the deployment was cancelled", step="cancel") from None
        except DeployError:
            raise
        except EngineError as e:
            raise await self._abort(supervisor, str(e), step="activation") from e

    async def _reboots(self, target: Target) -> bool:
        """Whether this deployment boots the new system once instead of switching to it (reboot.py)."""
        req = self.req
        if req.reboot == "never" or not req.profile.is_system or req.action not in ("switch", "boot"):
            return False
        return req.reboot == "always" or await reboot.needs_reboot(target, req.store_path)

    async def _reboot(self, target: Target, push: PushStats) -> DeployResult:
        """Boot the new system once; keep it once it booted and is healthy (engine/target/reboot.py)."""
        req = self.req
        self.steps.mark(Step.REBOOT)
        booting = reboot.RebootDeployment(req, target, connect=lambda: open_target(self._pinned_remote(), req.profile),
                                          status=self.status, output=self.output)
        try:
            running = await booting.run()
            assert booting.new is not None and booting.prev is not None
            self._new_gen = booting.new
            await self._retain(running)
            version: str | None = None
            reboot_for: tuple[str, ...] = ()
            with contextlib.suppress(EngineError):
                reading = await profiles.read_host(running, req.profile.path, system=True, version_of=req.store_path)
                version, reboot_for = reading.nixos_version, reading.pending_boot_files
            return DeployResult(store_path=req.store_path, generation=booting.new.number,
                                previous_generation=booting.prev.number, previous_store_path=booting.prev.store_path,
                                host_key=self.host_key or "", push=push, nixos_version=version, output="",
                                reboot_for=reboot_for, build_host_key=self.build_host_key)
        finally:
            if booting.target is not target:
                await booting.target.conn.close()

    async def _push(self, target: Target) -> PushStats:
        """Copy the closure (or, for a remote build, the derivation's) to the host's store, when a slot is free."""
        pusher = target.for_store()
        if self.transfers is None:
            self.steps.mark(Step.PUSH)
            return await self._copy(pusher)
        if self.transfers.locked():
            self.steps.mark(Step.WAIT_TRANSFER)
            self.status("waiting for other machines' copies to finish (maxParallelTransfers)")
        async with self.transfers:
            self.steps.mark(Step.PUSH)
            try:
                return await self._copy(pusher)
            finally:
                self.steps.end()  # the slot is free from here: the timeline shows the copies one after another

    async def _copy(self, pusher: Target) -> PushStats:
        """Through the binary cache when there is one, then directly: whatever the host still lacks."""
        req = self.req

        def on_progress(p: PushProgress) -> None:
            self.status(p.describe())

        # A remote build copies a derivation's closure, which is not what the cache holds.
        if req.binary_cache is not None and req.build_drv is None:
            await self._through_cache(pusher, req.binary_cache)
        compression = await choose_compression(pusher, req.compress, self.status)
        push = await push_closure(
            self.nix, pusher, req.build_drv or req.store_path,
            substitute=req.substitute_on_destination, progress=on_progress, compression=compression,
            status=self.status,
        )
        if push.paths:
            sent = f", {push.wire_bytes / 1048576:.1f} MiB sent with zstd" if push.compression == "zstd" else ""
            self.status(f"copied {push.paths} paths ({push.bytes / 1048576:.1f} MiB{sent}) in {push.seconds:.1f}s")
        return push

    async def _through_cache(self, target: Target, cache: BinaryCache) -> None:
        """Upload the closure to the cache (once per process) and let the target substitute it.

        Any failure here only costs the cache's benefit: the direct push that
        follows copies whatever the target still lacks, and a warning says why.
        """
        path = self.req.store_path
        if not await missing_paths(target, [path]):
            return  # a valid path has its whole closure: nothing to fetch
        self.status(f"uploading the closure of {path} to the binary cache {cache.write_url}")
        try:
            upload = await self.uploads.upload(self.nix, cache, path)
        except EngineError as e:
            self.warn(f"binaryCache: {e}; pushing directly over SSH instead")
            return
        if upload.paths:
            self.status(f"uploaded {upload.paths} paths ({upload.bytes / 1048576:.1f} MiB) to {cache.write_url} "
                        f"in {upload.seconds:.1f}s")
        self.status(f"{target.target} is fetching {path} from the binary cache {cache.url}")
        try:
            why = await binary_cache.substitute(target, path, cache, timeout=self.req.activation_timeout * 10)
        except ConnectError:
            raise  # the host is gone: a direct push could not help
        except EngineError as e:
            why = str(e)
        if why is not None:
            self.warn(f"binaryCache: {target.target} could not fetch {path} from {cache.url} ({why}); "
                      "pushing directly over SSH instead")

    async def _build_on_target(self, target: Target) -> None:
        req = self.req
        assert req.build_drv is not None
        self.steps.mark(Step.BUILD)
        self.status(f"building {req.build_drv} on {target.target}")
        res = await target.for_store().run(["nix-store", "--realise", req.build_drv], check=False,
                                           timeout=req.activation_timeout * 10)
        if res.exit_status != 0 or req.store_path not in res.stdout.split():
            why = build_failure(res.stderr).replace("\n", "\n  ")
            raise EngineError(f"building {req.build_drv} on {target.target} failed (exit {res.exit_status}):\n  {why}")

    async def _build_on_build_host(self, target: Target, remote: Remote) -> PushStats:
        """The derivations to the build host, the build there, the system from there to the target (build_host.py).

        What the deployer sent (the derivations, and what it relayed) is the push's account."""
        req = self.req
        assert req.build_drv is not None  # _run's condition
        self.status(f"connecting to the build host {remote.target}")
        builder = await BuildHost.open(remote, target.conn.remote)
        try:
            self.build_host_key = builder.host_key
            sent = await self._push(Target(builder.conn))
            self.steps.mark(Step.BUILD)
            self.status(f"building {req.build_drv} on the build host {remote.target}")
            await builder.build(req.build_drv, req.store_path, req.activation_timeout * 10)
            self.steps.mark(Step.COPY)
            copied = await builder.copy_to(target.for_store(), req.store_path, self.host_key or target.conn.host_key,
                                           substitute=req.substitute_on_destination,
                                           timeout=req.activation_timeout * 10, status=self.status, warn=self.warn)
        finally:
            await builder.close()
        self.status(f"{target.target} has the {copied.closure} paths of {req.store_path}: {copied.had} it had, "
                    f"{copied.substituted} from its binary caches, {copied.direct} from the build host directly, "
                    f"{copied.relayed} relayed by the deployer ({copied.seconds:.1f}s)")
        return replace(sent, paths=sent.paths + copied.relayed, bytes=sent.bytes + copied.relayed_bytes,
                       wire_bytes=sent.wire_bytes + copied.relayed_bytes,
                       substituted=sent.substituted + copied.substituted)

    async def _dry_activate(self, target: Target, push: PushStats) -> DeployResult:
        """Ask the new system what switching to it would do; nothing is registered or activated."""
        req = self.req
        before = await profiles.current_generation(target, req.profile.path)
        res = await target.run([f"{req.store_path}/bin/switch-to-configuration", "dry-activate"], check=False,
                               timeout=req.activation_timeout)
        return DeployResult(req.store_path, before.number if before else 0, None, None, self.host_key or "",
                            push, None, res.stdout + res.stderr)

    def _activation_spec(self) -> ActivationSpec:
        req = self.req
        return ActivationSpec(
            mode="system" if req.profile.is_system else "profile",
            profile=req.profile.path,
            new_path=req.store_path,
            new_gen=None,
            prev_gen=None,
            prev_path=None,
            action=req.action,
            magic_rollback=req.magic_rollback and req.action != "boot",
            confirm_timeout=req.confirm_timeout,
            auto_rollback=req.auto_rollback,
            activation_timeout=req.activation_timeout,
            activate_command=req.activate_command,
        )

    async def _take_lock(self, target: Target) -> Supervisor:
        """Start the supervisor; it holds the profile's lock until the deployment is finished or rolled back.

        One deployment per profile per host: nothing is registered before the
        lock is ours.
        """
        await profiles.ensure_profile_dir(target, self.req.profile.path)
        supervisor = Supervisor(target, self._connect_again, self._activation_spec(), status=self.status,
                                output=self.output, phase=self._on_phase)
        self._supervisor = supervisor
        self.steps.mark(Step.LOCK)
        await supervisor.upload()
        await supervisor.start()
        try:
            await supervisor.wait_ready(time.monotonic() + 60)
        except HostBusy:
            await supervisor.cleanup()
            raise
        except EngineError:
            await supervisor.stop_quietly()
            raise
        except asyncio.CancelledError:
            raise await self._abort(supervisor, "the deployment was cancelled", step="cancel") from None
        return supervisor

    async def _activate(self, supervisor: Supervisor, push: PushStats) -> DeployResult:
        """Under the lock: register the generation, activate, confirm, check health, finish."""
        try:
            spec, before = await self._register(supervisor)
            deadline = time.monotonic() + self.req.activation_timeout + self.req.confirm_timeout + 60
            outcome = await supervisor.follow(deadline)
            if not outcome.ok:
                raise await self._failure(supervisor, outcome, self._new_gen, step="activation")
            await self._health_checks(supervisor)
            outcome = await self._finish(supervisor)
        except HostRebooted as e:
            raise await self._after_reboot(supervisor, e) from e
        await self._retain(supervisor.target)
        return await self._result(supervisor.target, spec, before, push, outcome)

    async def _after_reboot(self, supervisor: Supervisor, e: HostRebooted) -> DeployError:
        """The host booted again before the deployment was finished, and its supervisor is gone. Whatever it came
        back on was never confirmed: return it to the generation before, deliberately, as the supervisor would
        have, and say what it runs now."""
        req = self.req
        prev_gen = self._prev_gen
        self.status("the activation supervisor is gone: waiting for the host")
        try:
            target, e = await supervisor.back(time.monotonic() + req.activation_timeout + req.confirm_timeout + 60)
            # sshd may answer before the boot has finished activating what it booted: a rollback now would race it.
            self.status("waiting for the host to finish booting")
            with contextlib.suppress(EngineError):  # a boot that never settles: roll back all the same
                await target.run(["sh", "-c", "test ! -d /run/systemd/system || systemctl is-system-running --wait"],
                                 check=False, timeout=req.activation_timeout + 60)
            booted = await read_target_state(target, req.profile)
        except EngineError as unreadable:
            return DeployError(f"deploying {req.store_path} failed: {e}; the host cannot be read now ({unreadable}). "
                               "Run `pulumi refresh` once it answers", phase="activation")
        # Early in a boot /run/current-system may not be there yet: the profile's generation is what it boots.
        path = (booted.current_system if req.profile.is_system else None) or (
            booted.generation.store_path if booted.generation else None)
        gen = booted.generation.number if booted.generation and booted.generation.store_path == path else None
        came_back = f"generation {gen} ({path})" if gen is not None else (path or "a system it does not name")
        first = f"deploying {req.store_path} failed: {e}. It came back on {came_back}, unconfirmed"
        # What the profile holds now decides, not what this process saw: the reboot may have cut the answer to
        # `nix-env --set` short after the generation was made.
        made = booted.generation if booted.generation and booted.generation.store_path == req.store_path else None
        if made is None or prev_gen is None or made.number == prev_gen:
            running = booted.current_system if req.profile.is_system else None
            return DeployError(f"{first}; no generation of it was made, so nothing is rolled back",
                               phase="activation", now_running=running,
                               generation=booted.generation.number if booted.generation else None)
        new_gen = made
        self.status(f"the host rebooted during activation: rolling back to generation {prev_gen}")
        self.steps.mark(Step.ROLLBACK)
        try:
            now = await rollback_to(self._pinned_remote(), req.profile, prev_gen, status=self.status,
                                    output=self.output, activate_command=req.activate_command,
                                    timeout=req.activation_timeout, fallback_path=self._prev_path)
            target = await supervisor.connected()
            await target.run(["nix-env", "-p", req.profile.path, "--delete-generations", str(new_gen.number)])
        except EngineError as failed:
            return DeployError(f"{first}; rolling it back to generation {prev_gen} failed: {failed}. Run "
                               "`pulumi refresh` to see what it runs", phase="rollback")
        running = now.current_system if req.profile.is_system else (now.generation.store_path if now.generation else None)
        gen_now = now.generation.number if now.generation else None
        return DeployError(f"{first}. Rolled back: {_describe_now(running, gen_now, req.profile)}; generation "
                           f"{new_gen.number} was removed.", phase="activation", now_running=running,
                           generation=gen_now, rolled_back=True)

    async def _register(self, supervisor: Supervisor) -> tuple[ActivationSpec, Generation | None]:
        """Say go: the supervisor registers the generation under its lock, then activates it. (The spec as
        registered, the generation before.)

        The deployer only reads the host first. Registering here would race the supervisor: one that gave up
        waiting while a slow `nix-env --set` was still running would leave the profile a generation ahead.
        """
        req = self.req
        target = supervisor.target
        async with supervisor.kept_alive():
            now = await profiles.read_host(target, req.profile.path, system=req.profile.is_system)
            before, prev_system = now.generation, now.current_system
            # Where a rollback returns to, known before anything is registered (a reboot may come at any moment).
            self._prev_gen = before.number if before is not None else None
            self._prev_path = prev_system if req.profile.is_system else (before.store_path if before else None)
            self.steps.mark(Step.REGISTER)
            if req.action != "test":
                self.status(f"registering generation for {req.store_path}")
            await supervisor.go(_health_check_budget(req))
        try:
            spec = await supervisor.registration(time.monotonic() + 120)
        except HostRebooted:
            raise
        except EngineError as e:
            raise DeployError(f"deploying {req.store_path} to {req.remote.target} failed: {e}", phase="register",
                              now_running=self._prev_path, generation=self._prev_gen) from e
        self.steps.mark(Step.ACTIVATE)
        self._new_gen = Generation(spec.new_gen, req.store_path) if spec.new_gen is not None else None
        return spec, before

    async def _health_checks(self, supervisor: Supervisor) -> None:
        """After confirmation: the deployer's checks decide, and a failure rolls back (unless autoRollback is off)."""
        req = self.req
        if not req.health_checks or req.action == "boot":
            return
        self.steps.mark(Step.HEALTH_CHECK)
        new_gen = self._new_gen
        try:
            await run_health_checks(supervisor.target, req.health_checks, status=self.status)
        except EngineError as e:
            if not req.auto_rollback:
                await supervisor.finish(time.monotonic() + 60)
                await supervisor.cleanup()
                kept = f"generation {new_gen.number} ({req.store_path})" if new_gen else req.store_path
                raise DeployError(
                    f"{e}; autoRollback is off, so {kept} stays active on {supervisor.target.target}",
                    phase="health-check", now_running=req.store_path,
                    generation=new_gen.number if new_gen else None) from e
            self.status("health check failed: rolling back")
            self.steps.mark(Step.ROLLBACK)
            outcome = await supervisor.abort(time.monotonic() + 2 * req.activation_timeout + 60)
            raise await self._failure(supervisor, outcome, new_gen, reason=str(e), step="health-check") from e

    async def _finish(self, supervisor: Supervisor) -> ActivationOutcome:
        """The deployer's last word: keep the new generation."""
        self.steps.mark(Step.FINISH)
        outcome = await supervisor.finish(time.monotonic() + 60)
        if outcome.state.phase is not Phase.DONE:
            # Rolled back after confirmation: the deployer's last word came too late.
            raise await self._failure(supervisor, outcome, self._new_gen, step="health-check")
        # Confirmed and healthy: from here on nothing may turn the deployment
        # into a failure.
        await supervisor.cleanup()
        return outcome

    async def _retain(self, target: Target) -> None:
        """keepGenerations and collectGarbage, once the deployment is confirmed: what fails here is a warning, never
        the deployment's failure (the new system runs, and the next deployment tries again)."""
        retention, profile = self.req.retention, self.req.profile.path
        try:
            doomed = (profiles.doomed_generations(await profiles.list_generations(target, profile), retention)
                      if retention.keep is not None else [])
            if doomed:
                self.status(f"deleting {len(doomed)} older generations of {profile}")
                if await profiles.delete_generations(target, profile, doomed, boot_entries=self.req.profile.is_system):
                    protected = f", and generation {_listed(retention.protect)} to return to" if retention.protect else ""
                    self.output(f"deleted {_generations(doomed)} of {profile} "
                                f"(keepGenerations {retention.keep}{protected})")
                else:
                    self.warn(f"another deployment of {profile} is under way: {_generations(doomed)} "
                              "left until the next deployment")
            if retention.collect_garbage:
                self.status(f"collecting garbage on {target.target}")
                gc = await profiles.collect_garbage(target, retention.gc_timeout)
                self.output(f"garbage collection on {target.target}: {gc.paths} store paths deleted, {gc.freed} freed")
        except EngineError as e:
            self.warn(f"{self.req.store_path} is deployed and confirmed, but cleaning up after it failed "
                      f"(the next deployment tries again): {e}")

    async def _result(self, target: Target, spec: ActivationSpec, before: Generation | None, push: PushStats,
                      outcome: ActivationOutcome) -> DeployResult:
        """The outputs of a finished deployment; what cannot be read afterwards is left out, not fatal."""
        req = self.req
        version: str | None = None
        reboot_for: tuple[str, ...] = ()
        after = self._new_gen if self._new_gen is not None else before
        try:
            reading = await profiles.read_host(target, req.profile.path, system=req.profile.is_system,
                                               version_of=req.store_path)
            version, reboot_for = reading.nixos_version, reading.pending_boot_files
            after = reading.generation or after
        except EngineError as e:
            self.status(f"{req.store_path} is deployed and confirmed; reading the host afterwards failed: {e}")
        return DeployResult(
            store_path=req.store_path,
            generation=after.number if after else 0,
            previous_generation=before.number if before else None,
            previous_store_path=spec.prev_path,
            host_key=self.host_key or "",
            push=push,
            nixos_version=version,
            output=outcome.output,
            reboot_for=reboot_for,
            build_host_key=self.build_host_key,
        )

    async def _abort(self, supervisor: Supervisor, why: str, *, step: str) -> DeployError:
        """Tell the supervisor to roll back now, wait a bounded time for it, and say what the host runs."""
        req = self.req
        self.status(f"{why}: rolling back")
        self.steps.mark(Step.ROLLBACK)
        try:
            outcome = await supervisor.abort(time.monotonic() + 2 * req.activation_timeout + 60)
        except EngineError as e:
            return DeployError(
                f"deploying {req.store_path} to {req.remote.target} failed: {why}; telling the target to roll back "
                f"failed too ({e}). The supervisor in {supervisor.workdir} rolls back by itself unless the "
                "deployment is finished; run `pulumi refresh` to see what the host runs",
                phase="cancel", now_running=None)
        return await self._failure(supervisor, outcome, self._new_gen, reason=why, step=step)

    async def _failure(self, supervisor: Supervisor, outcome: ActivationOutcome, new_gen: Generation | None, *,
                       reason: str | None = None, step: str) -> DeployError:
        """Build the error: what failed, the output tail, and what runs now.

        step is where the deployer was; the supervisor's own cause, when it
        names one (activation, confirmation), says it more exactly.
        """
        req = self.req
        state = outcome.state
        if state.phase in (Phase.ROLLED_BACK, Phase.ROLLBACK_FAILED, Phase.FAILED, Phase.DONE):
            # Finished: its workdir (token included) has nothing more to say.
            await supervisor.cleanup()
        what = reason or _describe_reason(state, req)
        try:
            target = await supervisor.connected()
            now = await read_target_state(target, req.profile)
            running = now.current_system if req.profile.is_system else (now.generation.store_path if now.generation else None)
            gen_now = now.generation.number if now.generation else None
        except EngineError:
            running, gen_now = None, None
        where = _describe_now(running, gen_now, req.profile)
        if state.phase is Phase.ROLLED_BACK:
            removed = f"; generation {new_gen.number} was removed" if new_gen and gen_now != new_gen.number else ""
            msg = f"deploying {req.store_path} to {req.remote.target} failed: {what}. Rolled back: {where}{removed}."
        elif state.phase is Phase.ROLLBACK_FAILED:
            msg = (f"deploying {req.store_path} to {req.remote.target} failed: {what}, and the rollback failed too "
                   f"({state.detail or state.line}). Now: {where}.")
        else:
            msg = f"deploying {req.store_path} to {req.remote.target} failed: {what}; autoRollback is off. Now: {where}."
        tail = _tail(outcome.output)
        if tail:
            msg += f"\nactivation output (last lines):\n{tail}"
        return DeployError(msg, phase=state.failed_step or step, now_running=running, generation=gen_now,
                           rolled_back=state.phase is Phase.ROLLED_BACK, output_tail=tail)


def _listed(numbers: Sequence[int]) -> str:
    return ", ".join(str(n) for n in numbers)


def _generations(numbers: Sequence[int]) -> str:
    return f"generation{'s' if len(numbers) > 1 else ''} {_listed(numbers)}"


def _health_check_budget(req: DeployRequest) -> float:
    """How long the supervisor waits, after activation, for the deployer's health checks to decide."""
    if req.action == "boot":
        return 60
    return 60 + sum((c.retries + 1) * (c.timeout + 10 + c.interval) for c in req.health_checks)


def _describe_reason(state: SupervisorState, req: DeployRequest) -> str:
    if state.timed_out:
        return f"activation timed out after {req.activation_timeout:.0f}s"
    if state.cause is Cause.ACTIVATION_FAILED:
        return f"activation exited with status {state.exit_status}"
    if state.cause is Cause.UNCONFIRMED:
        return (f"the deployer could not reach the host again within confirmTimeout ({req.confirm_timeout:.0f}s) "
                "after activation, so the target rolled itself back (magic rollback)")
    if state.cause is Cause.REQUESTED:
        return "rollback requested"
    if state.cause is not None and state.cause is not Cause.OTHER:
        return str(state.cause.value) + (f": {state.detail}" if state.detail else "")
    return state.detail or state.phase.value


def _describe_now(running: str | None, gen: int | None, profile: Profile) -> str:
    if running is None and gen is None:
        return "the host could not be read"
    g = f"generation {gen}" if gen is not None else "no generation"
    return f"{g} ({running}) is running" if profile.is_system else f"{profile.path} is at {g} ({running})"


async def deploy(req: DeployRequest, nix: Nix | None = None, *, status: StatusFn = _noop,
                 output: StatusFn = _noop, warn: StatusFn = _noop,
                 uploads: binary_cache.CacheUploads | None = None,
                 transfers: asyncio.Semaphore | None = None) -> DeployResult:
    """Deploy req.store_path; raise DeployError (or ConnectError, NixError) on failure.

    uploads is shared by the deployments of one process, so each closure goes
    to a binary cache once; transfers, shared likewise, bounds how many of
    them copy closures at once (the deployer's uplink is shared); warn
    receives what the user should know but does not fail the deployment (a
    cache that could not be used).
    """
    return await Deployment(req, nix or Nix(), status=status, output=output, warn=warn, uploads=uploads,
                            transfers=transfers).run()


async def rollback_to(remote: Remote, profile: Profile, generation: int, *, status: StatusFn = _noop,
                      output: StatusFn = _noop, activate_command: str | None = None,
                      timeout: float = ACTIVATION_TIMEOUT, fallback_path: str | None = None) -> TargetState:
    """Return a profile to an existing generation and re-activate it (destroy's rollback).

    The target's supervisor does it, under the profile's lock (a deployment
    in progress is not disturbed: HostBusy) and detached from this session.
    If that generation was garbage-collected but fallback_path is still in
    the target's store, it becomes a new generation instead.
    """
    target = await open_target(remote, profile)
    pinned = replace(remote, host_key=target.conn.host_key, retries=1)
    spec = RollbackSpec(mode="system" if profile.is_system else "profile", profile=profile.path,
                        to_gen=generation, to_path=fallback_path, activation_timeout=timeout,
                        activate_command=activate_command)

    def said(line: str) -> None:
        # The supervisor's own lines are steps; the rest is the activation's output.
        if line.startswith(SUPERVISOR_SAYS):
            status(line.removeprefix(SUPERVISOR_SAYS))
        else:
            output(line)

    supervisor = Supervisor(target, lambda: connect(pinned), spec, status=status, output=said)
    try:
        outcome = await supervisor.roll_back_to(time.monotonic() + timeout + 120)
        if outcome.state.phase is not Phase.DONE:
            raise EngineError(_rollback_failure(outcome.state, spec, remote, outcome.output))
        return await read_target_state(await supervisor.connected(), profile)
    finally:
        await supervisor.close()
        await target.conn.close()


def _rollback_failure(state: SupervisorState, spec: RollbackSpec, remote: Remote, output: str) -> str:
    if state.cause is Cause.GONE:
        return (f"generation {spec.to_gen} of {spec.profile} no longer exists on {remote.target}, "
                "so there is nothing to roll back to")
    if state.cause is Cause.ACTIVATION_FAILED:
        why = (f"timed out after {spec.activation_timeout:.0f}s" if state.timed_out
               else f"exited with status {state.exit_status}")
        msg = (f"rolling {spec.profile} on {remote.target} back to generation {spec.to_gen}: its activation {why}; "
               f"the profile now points at generation {spec.to_gen}")
    else:
        msg = f"rolling {spec.profile} on {remote.target} back to generation {spec.to_gen} failed: {state}"
    tail = _tail(output)
    return msg + (f"\nactivation output (last lines):\n{tail}" if tail else "")


async def remove_profile(remote: Remote, profile: Profile) -> None:
    target = await open_target(remote, profile)
    try:
        await profiles.remove_profile(target, profile.path)
    finally:
        await target.conn.close()
