"""The deployer's side of supervised activation and magic rollback.

The supervisor (supervisor.sh) runs on the target; this module uploads it,
starts it detached, follows its state file and output, and confirms the
deployment over a new connection, the way deploy-rs does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from importlib import resources

from ..errors import ConnectError, EngineError, HostBusy, HostRebooted
from ..transport.process import Target
from ..transport.ssh import Connection
from .supervisor_protocol import ActivationSpec, Control, Go, Phase, Registered, RollbackSpec, SupervisorState, supervisor_argv

__all__ = ["ActivationOutcome", "ActivationSpec", "RollbackSpec", "Supervisor"]

SUPERVISOR = resources.files(__package__).joinpath("supervisor.sh").read_text()
POLL_INTERVAL = 0.3
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# The exit status of a control write that found no work directory: the supervisor is gone.
NO_WORKDIR = 75
VANISHED_GRACE = 30.0
# How often the deployer says it is alive while it reads the host before go;
# supervisor.sh waits 30 s after the last time.
KEEPALIVE_INTERVAL = 5.0

StatusFn = Callable[[str], None]
OutputFn = Callable[[str], None]
ConnectFn = Callable[[], Awaitable[Connection]]
PhaseFn = Callable[[Phase], None]


@dataclass(frozen=True)
class ActivationOutcome:
    state: SupervisorState  # where follow() stopped: confirmed (its default), or a terminal state
    output: str
    workdir: str

    @property
    def ok(self) -> bool:
        return self.state.phase in (Phase.CONFIRMED, Phase.DONE)


class Supervisor:
    """One deployment's supervisor on one target."""

    def __init__(self, target: Target, connect: ConnectFn, spec: ActivationSpec | RollbackSpec,
                 status: StatusFn | None = None, output: OutputFn | None = None,
                 phase: PhaseFn | None = None) -> None:
        self.target = target
        self.connect = connect
        self.spec = spec
        self.token = secrets.token_hex(16)
        self.workdir = f"/tmp/pulumi-nixos.{secrets.token_hex(8)}"
        self._status = status or (lambda s: None)
        self._output = output or (lambda s: None)
        self._phase = phase or (lambda p: None)
        self._log = ""
        self._partial = ""
        self._uses_systemd: bool | None = None
        # The connection this supervisor opened to replace a lost one; the
        # first connection belongs to the caller.
        self._own: Connection | None = None
        # The boot this supervisor runs in: another one means the host rebooted and the supervisor died with it.
        self.boot_id: str | None = None
        # What it registered, once it has (read with its state).
        self.registered: Registered | None = None

    def _args(self, task: str) -> list[str]:
        return supervisor_argv(task, self.workdir, self.token, self.spec)

    async def upload(self) -> None:
        res = await self.target.run(
            ["sh", "-c", 'umask 077 && mkdir -- "$1" && cat > "$1/supervisor.sh" && : > "$1/log" && cat "$2"',
             "sh", self.workdir, BOOT_ID],
            input=SUPERVISOR,
        )
        self.boot_id = res.stdout.strip() or None
        if self._uses_systemd is None:
            res = await self.target.run(["sh", "-c", "test -d /run/systemd/system && command -v systemd-run"], check=False)
            self._uses_systemd = res.exit_status == 0

    async def _write(self, control: Control, content: str) -> None:
        """Write one control file into the workdir, atomically (the supervisor polls for it)."""
        argv = ["sh", "-c", f'test -d "$1" || exit {NO_WORKDIR}; printf %s "$3" > "$1/$2.tmp" && mv -f "$1/$2.tmp" "$1/$2"',
                "sh", self.workdir, control.value, content]
        try:
            res = await self.target.run(argv, timeout=10, check=False)
        except EngineError:
            # The connection may have died with the old system's sshd: once
            # more over a new one (the write is idempotent).
            await self._replace(await self.connect())
            res = await self.target.run(argv, timeout=30, check=False)
        if res.exit_status == NO_WORKDIR:
            raise await self._gone()
        if res.exit_status != 0:
            raise EngineError(f"cannot tell the activation supervisor on {self.target.target} to {control.value}: "
                              f"{res.stderr.strip() or f'exit status {res.exit_status}'}")

    async def _gone(self) -> HostRebooted:
        """The work directory is gone: say whether the host booted again (the usual reason) or it was removed."""
        res = await self.target.run(["cat", BOOT_ID], check=False, timeout=10)
        return self._vanished(res.stdout.strip())

    async def back(self, deadline: float) -> tuple[Target, HostRebooted]:
        """After the supervisor vanished: the host once it answers in another boot, and why the supervisor is gone.

        A host going down loses /tmp before sshd stops, so a missing work directory in the same boot is taken
        for a removal only once the host has kept that boot for VANISHED_GRACE seconds.
        """
        same_boot_since: float | None = None
        while True:
            try:
                target = await self.connected()
                why = await self._gone()
            except ConnectError:
                target = await self._reconnect(deadline)
                continue
            now = time.monotonic()
            same_boot_since = same_boot_since or now
            if why.booted_again or now - same_boot_since > VANISHED_GRACE or now > deadline:
                return target, why
            await asyncio.sleep(1.0)

    def _vanished(self, boot_id: str) -> HostRebooted:
        if self.boot_id and boot_id and boot_id != self.boot_id:
            return HostRebooted(f"{self.target.target} rebooted during the deployment (its boot id changed), "
                                "and the activation supervisor with it", booted_again=True)
        return HostRebooted(f"the activation supervisor's work directory {self.workdir} on {self.target.target} "
                            "vanished during the deployment", booted_again=False)

    async def connected(self) -> Target:
        """The target, over a new connection if the current one no longer answers."""
        try:
            await self.target.run(["true"], timeout=10)
        except EngineError:
            await self._replace(await self.connect())
        return self.target

    async def _replace(self, conn: Connection) -> None:
        """Use conn from now on, and close the connection it replaces if it was ours."""
        old, self._own = self._own, conn
        self.target = self.target.on(conn)
        if old is not None:
            old.abort()  # it stopped answering: do not wait for a goodbye
            await old.close()

    async def close(self) -> None:
        """Close the connection this supervisor opened, if any (the caller closes its own)."""
        own, self._own = self._own, None
        if own is not None:
            await own.close()

    async def wait_ready(self, deadline: float) -> None:
        """Wait until the supervisor holds the profile's lock; fail naming who holds it otherwise."""
        while True:
            state = await self._poll(self.target)
            if state.phase is Phase.READY:
                return
            if state.phase is Phase.LOCKED_OUT:
                raise self._busy(state)
            if state.terminal:
                raise EngineError(f"the activation supervisor on {self.target.target} stopped before it began: {state}"
                                  + (f"\n{self._log.strip()}" if self._log.strip() else "") + "; nothing was changed")
            if time.monotonic() > deadline:
                raise EngineError(f"the activation supervisor on {self.target.target} did not start in time; "
                                  "nothing was changed")
            await asyncio.sleep(POLL_INTERVAL / 3)

    def _busy(self, state: SupervisorState) -> HostBusy:
        holder = state.detail or "another deployment (it did not say which)"
        return HostBusy(f"{self.spec.profile} on {self.target.target} is being deployed by someone else: "
                        f"{holder}. Nothing was changed; try again when it has finished")

    async def roll_back_to(self, deadline: float) -> ActivationOutcome:
        """Run a RollbackSpec to its end under the profile's lock (destroy's rollback).

        Detached like an activation, so a connection dropped by the
        re-activation (sshd restarting) cannot stop it halfway.
        """
        await self.upload()
        await self.start("rollback-to")
        outcome = await self.follow(deadline, until=())
        # Ended, whichever way: its workdir (token included) has nothing more to say.
        await self.cleanup()
        if outcome.state.phase is Phase.LOCKED_OUT:
            raise self._busy(outcome.state)
        return outcome

    @contextlib.asynccontextmanager
    async def kept_alive(self) -> AsyncIterator[None]:
        """While the deployer reads the host before its go, touch Control.ALIVE every few seconds.

        The supervisor gives up a fixed time after its last sign of life, so a
        deployer that died frees the profile's lock soon, while one that is
        merely slow (a busy host) is waited for.
        """
        async def beat() -> None:
            while True:
                await asyncio.sleep(KEEPALIVE_INTERVAL)
                try:
                    await self.target.run(["touch", "--", f"{self.workdir}/{Control.ALIVE.value}"], timeout=10)
                except EngineError:
                    pass  # the next beat, or the registration itself, will say more

        beating = asyncio.ensure_future(beat())
        try:
            yield
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

    async def go(self, hold: float) -> None:
        """Tell the supervisor to register the generation and activate it, and how long health checks may take."""
        await self._write(Control.GO, Go(hold).text())

    async def registration(self, deadline: float) -> ActivationSpec:
        """Wait until the supervisor has registered the generation; the spec with what it made."""
        assert isinstance(self.spec, ActivationSpec)
        while self.registered is None:
            try:
                state = await self._poll(self.target)
            except ConnectError:
                await self._reconnect(deadline)
                continue
            if self.registered is not None:
                break
            if state.terminal:
                raise EngineError(f"the activation supervisor on {self.target.target} stopped before it registered "
                                  f"{self.spec.new_path}: {state.detail or state.line}; nothing was activated")
            if time.monotonic() > deadline:
                raise EngineError(f"registering {self.spec.new_path} on {self.target.target} did not finish in time")
            await asyncio.sleep(POLL_INTERVAL / 3)
        spec = self.spec = replace(self.spec, new_gen=self.registered.new_gen, prev_gen=self.registered.prev_gen,
                                   prev_path=self.registered.prev_path)
        return spec

    async def finish(self, deadline: float) -> ActivationOutcome:
        """Keep the new generation: the supervisor records `done` and releases the lock."""
        await self._write(Control.FINISH, "")
        return await self.follow(deadline, until=())

    async def abort(self, deadline: float) -> ActivationOutcome:
        """Roll back now (cancelled, or a health check failed) and wait for the supervisor to finish.

        The request itself is not given up if this task is cancelled again
        meanwhile: the host must hear it. Waiting for the outcome may be cut short.
        """
        request = asyncio.ensure_future(self._write(Control.ABORT, ""))
        while not request.done():
            try:
                await asyncio.shield(request)
            except asyncio.CancelledError:
                if request.cancelled():
                    raise
        request.result()
        return await self.follow(deadline, until=())

    async def stop_quietly(self) -> None:
        """Best effort, before anything was registered: a supervisor that starts late stops at once."""
        try:
            await self._write(Control.ABORT, "")
        except EngineError:
            pass

    async def start(self, task: str = "activate") -> None:
        script = f"{self.workdir}/supervisor.sh"
        # systemd-run needs root; a non-root profile owner's supervisor uses setsid.
        if self._uses_systemd and self.target.user == "root":
            unit = f"pulumi-nixos-{self.workdir.rsplit('.', 1)[1]}-{task}"
            argv = ["systemd-run", f"--unit={unit}", "--collect", "--quiet", "--", "/bin/sh", script, *self._args(task)]
        else:
            argv = ["setsid", "-f", "/bin/sh", script, *self._args(task)]
        await self.target.run(["sh", "-c", ': > "$1/state" && shift && exec "$@"', "sh", self.workdir, *argv])

    async def _poll(self, conn_target: Target) -> SupervisorState:
        # The boot id and whether the work directory is there come first: a host that rebooted has neither its
        # supervisor nor its state file any more (an empty state would read as "starting" until the deadline).
        res = await conn_target.run(
            ["sh", "-c", 'cat "$3"; test -d "$1" && echo here || echo gone; echo "@@pulumi-nixos@@"; '
             'cat "$1/registered" 2>/dev/null; echo "@@pulumi-nixos@@"; '
             'cat "$1/state" 2>/dev/null; echo "@@pulumi-nixos@@"; tail -c +"$2" "$1/log" 2>/dev/null',
             "sh", self.workdir, str(len(self._log.encode()) + 1), BOOT_ID],
            check=False, timeout=30,
        )
        head, _, rest = res.stdout.partition("@@pulumi-nixos@@\n")
        boot_id, _, where = head.strip().rpartition("\n")
        if where == "gone" or (self.boot_id and boot_id and boot_id != self.boot_id):
            raise self._vanished(boot_id)
        registered, _, rest = rest.partition("@@pulumi-nixos@@\n")
        if self.registered is None:
            self.registered = Registered.parse(registered)
        state, _, new_output = rest.partition("@@pulumi-nixos@@\n")
        if new_output:
            self._log += new_output
            # Report whole lines only; `tail -c` may cut one in two.
            *complete, self._partial = (self._partial + new_output).split("\n")
            for line in complete:
                self._output(line)
        return SupervisorState.parse(state)

    async def confirm(self) -> bool:
        """Write the token over a brand-new connection. False if the host cannot be reached."""
        try:
            conn = await self.connect()
        except ConnectError as e:
            self._status(f"cannot reach the host after activation ({e}); it will roll back by itself")
            return False
        try:
            t = self.target.on(conn)
            await t.run(["sh", "-c", 'printf %s "$3" > "$1/$2"', "sh", self.workdir, Control.CONFIRM.value,
                         self.token])
            return True
        finally:
            await conn.close()

    async def follow(self, deadline: float, until: tuple[Phase, ...] = (Phase.CONFIRMED,)) -> ActivationOutcome:
        """Poll until the supervisor reaches a state in `until` or a terminal one; confirm when it waits for us."""
        target = self.target
        confirmed = False
        reported: SupervisorState | None = None
        while True:
            if time.monotonic() > deadline:
                raise EngineError(
                    f"activation on {target.target} did not finish in time; the supervisor in {self.workdir} "
                    "keeps running and rolls back by itself unless the deployment is confirmed and finished")
            try:
                state = await self._poll(target)
            except ConnectError:
                # The session we polled on died (e.g. sshd restarted): try a fresh one.
                target = await self._reconnect(deadline)
                continue
            if state != reported:
                reported = state
                self._report(state)
            if state.phase is Phase.WAITING_CONFIRM and not confirmed:
                confirmed = await self.confirm()
                if not confirmed:
                    # Give the target the confirm timeout to roll back on its own.
                    pass
            if state.phase in until or state.terminal:
                if self._partial:
                    self._output(self._partial)
                    self._partial = ""
                return ActivationOutcome(state, self._log, self.workdir)
            await asyncio.sleep(POLL_INTERVAL)

    async def _reconnect(self, deadline: float) -> Target:
        while time.monotonic() < deadline:
            try:
                await self._replace(await self.connect())
                return self.target
            except ConnectError:
                await asyncio.sleep(1.0)
        raise EngineError(f"lost the connection to {self.target.target} during activation and could not reconnect")

    def _report(self, state: SupervisorState) -> None:
        self._phase(state.phase)
        if state.phase is Phase.ACTIVATING:
            self._status(f"activating {self.spec.subject}")
        elif state.phase is Phase.WAITING_CONFIRM:
            self._status("waiting for confirmation (magic rollback)")
        elif state.phase is Phase.CONFIRMED:
            self._status(f"{self.spec.subject} is active")
        elif state.phase is Phase.ROLLING_BACK:
            self._status("rolling back")

    async def cleanup(self) -> None:
        try:
            await self.target.run(["rm", "-rf", "--", self.workdir], check=False, timeout=15)
        except (ConnectError, EngineError):
            pass

    @property
    def output(self) -> str:
        return self._log
