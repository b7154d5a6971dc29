"""The one command runner: who runs a command, where, and what its failure says.

Every command the engine runs, on the deployer or on a target, goes through a
`Runner`: `run` for a command that finishes (its output collected), `start`
for one whose streams the caller drives (a push, nixos-anywhere). A runner is
`Local()` (the deployer) or `Target(conn, run_as)` (a host over SSH); both
share the steps that matter here:

- the argv is a list of arguments; over SSH it becomes one command line by
  quoting each argument, never by pasting strings;
- an `Elevator` turns the argv into one that runs as another user (sudo).
  This is the only place that knows about sudo: errors and logs carry the argv
  the caller gave;
- every argv is logged at debug level, input never is (connection.sudoPassword
  travels there, see `PasswordSudo`).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import os
import secrets
import shlex
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Protocol

from ..errors import CommandError, CommandNotFound, ConnectError, ElevationError, LocalCommandError, NixError, RemoteCommandError, Setting
from ..lazy import lazy_module
from ..models import Profile

if TYPE_CHECKING:
    import asyncssh

    from .ssh import Connection
else:
    asyncssh = lazy_module("asyncssh")

log = logging.getLogger(__name__)

# How long a remote command may take unless its caller says otherwise; local
# commands (evaluations, builds) have no default limit.
REMOTE_TIMEOUT = 120.0
# How long closing a started process waits for each of its pipes and its exit.
CLOSE_TIMEOUT = 10.0
# Store paths per remote command: over SSH a command is one string, at most 128 KiB on the target.
PATHS_PER_COMMAND = 400


# -- who runs it -------------------------------------------------------------------


class Elevator(Protocol):
    """How a command gains another user's rights on the host that runs it.

    `argv` wraps the command; `stdin` is what the wrapper reads before the
    command's own input: nothing for non-interactive sudo, the password's line
    for sudo with connection.sudoPassword. The runner sends it first, for `run`
    and for `start`, and keeps it out of logs and errors. `probe` is a
    command that only tests the elevation (and its stdin), run once per
    connection before anything is changed; `refusal` reads the probe's
    failure: sudo's own refusal (a bad or missing password), or None. Later
    commands are not read that way: a command that ran sudo itself may fail
    with the same words.
    """

    @property
    def user(self) -> str: ...

    def argv(self, argv: Sequence[str]) -> list[str]: ...

    def stdin(self) -> bytes: ...

    def probe(self) -> tuple[list[str], bytes]: ...

    def refusal(self, exit_status: int | None, stderr: str) -> str | None: ...


def _sudo_target(user: str) -> list[str]:
    # -H: the user's own HOME, so nix-env finds its profile settings.
    return [] if user == "root" else ["-H", "-u", user]


# sudo's own words when it will not run a command for want of a (right)
# password, in lower case: sudo's, then sudo-rs's (NixOS can use either).
# sudo exits 1 then, and the command never started.
_SUDO_WRONG_PASSWORD = ("incorrect password attempt", "sorry, try again.", "no password was provided",
                        "incorrect authentication attempt", "authentication failed")
_SUDO_NEEDS_PASSWORD = ("a password is required", "a terminal is required", "interactive authentication is required")


def _sudo_said(stderr: str, phrases: tuple[str, ...]) -> bool:
    """Whether one of sudo's own lines (not, say, sshd's note about a missing home) says one of phrases."""
    lines = (line.strip().lower() for line in stderr.splitlines())
    return any(line.startswith(("sudo", "[sudo", "sorry", "authentication failed")) and any(p in line for p in phrases)
               for line in lines)


@dataclass(frozen=True)
class Sudo:
    """sudo that never asks (-n): a missing rule fails at once instead of hanging on a prompt."""

    user: str

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["sudo", "-n", *_sudo_target(self.user), "--", *argv]

    def stdin(self) -> bytes:
        return b""

    def probe(self) -> tuple[list[str], bytes]:
        return self.argv(["true"]), b""

    def refusal(self, exit_status: int | None, stderr: str) -> str | None:
        if exit_status == 1 and _sudo_said(stderr, _SUDO_NEEDS_PASSWORD):
            return f"sudo asks for a password: set {Setting.SUDO_PASSWORD.value} (a secret)"
        return None


# Runs as the elevated user between sudo and the command: it reads stdin
# line by line up to the sync line ($1) and then becomes the command, which
# reads the rest. sudo reads a password only when the policy wants one (a
# NOPASSWD rule does not), so the password's line may or may not still be
# there; either way it ends here, never in the command. `read` takes one byte
# at a time from a pipe and `[` is a shell builtin: nothing is read past the
# sync line, and the password never becomes an argument.
_SKIP_TO_SYNC = (
    'while IFS= read -r line; do [ "$line" = "$1" ] && shift && exec "$@"; done; '
    'echo "pulumi-nixos: the input of the elevated command lacks its sync line" >&2; exit 125'
)


@dataclass(frozen=True)
class PasswordSudo:
    """sudo that reads connection.sudoPassword from stdin (-S), never from argv or a terminal.

    -k makes every command authenticate afresh: sudo neither uses nor leaves a
    cached credential (its timestamp), so whether it reads the password line
    never depends on what ran before, and no later process of the SSH user
    gains root for free. -p '' keeps the prompt out of stderr. A rule that
    asks no password (NOPASSWD) leaves the line unread: the sync line after it
    (`_SKIP_TO_SYNC`) keeps it from the command all the same.
    """

    user: str
    password: str = field(repr=False)
    # Per elevator (so per command): a line the password cannot be by accident.
    sync: str = field(default_factory=lambda: f"pulumi-nixos-sync-{secrets.token_hex(16)}", repr=False)

    def _sudo(self) -> list[str]:
        return ["sudo", "-k", "-S", "-p", "", *_sudo_target(self.user), "--"]

    def argv(self, argv: Sequence[str]) -> list[str]:
        return [*self._sudo(), "sh", "-c", _SKIP_TO_SYNC, "sh", self.sync, *argv]

    def stdin(self) -> bytes:
        return f"{self.password}\n{self.sync}\n".encode()

    def probe(self) -> tuple[list[str], bytes]:
        # The password's line alone, then EOF: a wrong password is one failed
        # attempt, never a second one made of whatever line follows.
        return [*self._sudo(), "true"], f"{self.password}\n".encode()

    def refusal(self, exit_status: int | None, stderr: str) -> str | None:
        if exit_status != 1:
            return None
        if _sudo_said(stderr, _SUDO_WRONG_PASSWORD):
            return f"sudo rejected {Setting.SUDO_PASSWORD.value} (incorrect password)"
        if _sudo_said(stderr, _SUDO_NEEDS_PASSWORD):
            return f"sudo asks for a password but did not take {Setting.SUDO_PASSWORD.value}"
        return None


def elevator_for(login_user: str, run_as: str | None, sudo_password: str | None = None) -> Elevator | None:
    """The elevation needed to run as run_as when logged in as login_user (None: none needed)."""
    if run_as is None or run_as == login_user:
        return None
    if sudo_password is not None:
        return PasswordSudo(run_as, sudo_password)
    return Sudo(run_as)


# -- what comes back -----------------------------------------------------------------


@dataclass(frozen=True)
class CommandResult:
    exit_status: int
    stdout: str
    stderr: str


class Stderr(Enum):
    """Where a started command's stderr goes."""

    PIPE = "pipe"  # collected; the result of wait()/close() carries it
    STDOUT = "stdout"  # merged into stdout (local only)
    DISCARD = "discard"


_STDERR = {Stderr.PIPE: asyncio.subprocess.PIPE, Stderr.STDOUT: asyncio.subprocess.STDOUT,
           Stderr.DISCARD: asyncio.subprocess.DEVNULL}


@dataclass(frozen=True)
class Pipes:
    """Pipe ends a local process uses for stdin / stdout instead of its own pipes (None: its own)."""

    stdin_from: int | None = None
    stdout_to: int | None = None

    @property
    def used(self) -> bool:
        return self.stdin_from is not None or self.stdout_to is not None

    def stdin(self, wanted: bool) -> int:
        if self.stdin_from is not None:
            return self.stdin_from
        return asyncio.subprocess.PIPE if wanted else asyncio.subprocess.DEVNULL

    def stdout(self) -> int:
        return asyncio.subprocess.PIPE if self.stdout_to is None else self.stdout_to


class ByteSink(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def write_eof(self) -> None: ...


class ByteSource(Protocol):
    async def read(self, n: int = -1) -> bytes: ...

    async def readline(self) -> bytes: ...


class Process(ABC):
    """A started command: write its stdin, read its stdout, then wait or close."""

    def __init__(self, runner: Runner, argv: Sequence[str]) -> None:
        self._runner = runner
        self.argv = list(argv)  # the caller's, without elevation

    @property
    @abstractmethod
    def stdin(self) -> ByteSink: ...

    @property
    @abstractmethod
    def stdout(self) -> ByteSource: ...

    @abstractmethod
    async def wait(self) -> CommandResult:
        """Wait for the exit (never raises on a non-zero one; see `failure`)."""

    @abstractmethod
    def kill(self) -> None:
        """Stop it now (locally its whole session, when it has one)."""

    @abstractmethod
    async def close(self) -> CommandResult:
        """Kill it if it still runs, let its pipes reach EOF, reap it; bounded in time."""

    def failure(self, result: CommandResult) -> CommandError:
        return self._runner.failure(self.argv, result.exit_status, result.stderr)


# -- the runner ------------------------------------------------------------------------


class _Default:
    """The type of DEFAULT_TIMEOUT: the runner's own default, where None means no limit."""


DEFAULT_TIMEOUT = _Default()


class Runner(ABC):
    """Runs argv lists somewhere, as someone. Subclasses only move bytes."""

    run_as: str | None
    default_timeout: ClassVar[float | None] = None
    error_type: ClassVar[type[CommandError]] = CommandError

    @property
    @abstractmethod
    def target(self) -> str:
        """Where commands run, for messages: `user@host:port` or `the deployer`."""

    @property
    @abstractmethod
    def login_user(self) -> str: ...

    @property
    def sudo_password(self) -> str | None:
        """The password sudo asks the login user for (connection.sudoPassword), if any."""
        return None

    @property
    def elevator(self) -> Elevator | None:
        return elevator_for(self.login_user, self.run_as, self.sudo_password)

    @property
    def user(self) -> str:
        """Who commands run as, in the end."""
        return self.run_as or self.login_user

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The argv as it is executed: elevated when run_as is not the login user."""
        elevator = self.elevator
        return elevator.argv(argv) if elevator else list(argv)

    def elevated(self, argv: Sequence[str]) -> tuple[list[str], bytes]:
        """argv as it is executed, and what its elevation reads on stdin before the command's own input.

        For a command whose input the caller assembles (a push through zstd):
        the caller sends the elevation's input first, then runs the result as
        the login user.
        """
        elevator = self.elevator
        if elevator is None:
            return list(argv), b""
        return elevator.argv(argv), elevator.stdin()

    def _prepare(self, argv: Sequence[str]) -> tuple[list[str], bytes]:
        elevator = self.elevator
        who = f" as {elevator.user}" if elevator else ""
        log.debug("%s%s: %s", self.target, who, shlex.join(argv))
        return self.elevated(argv)

    async def run(self, argv: Sequence[str], *, input: str | bytes | None = None, check: bool = True,
                  timeout: float | None | _Default = DEFAULT_TIMEOUT, env: Mapping[str, str] | None = None,
                  cwd: str | None = None, niceness: int = 0,
                  started: Callable[[int], None] | None = None) -> CommandResult:
        """Run argv to completion and collect its output.

        check: raise the runner's CommandError on a non-zero exit. timeout:
        None means no limit, unset means the runner's default. env replaces
        the whole environment (local only); niceness lowers the priority;
        started is called with the process id once it runs (local only).
        """
        limit = self.default_timeout if isinstance(timeout, _Default) else timeout
        final, preamble = self._prepare(argv)
        data = input.encode() if isinstance(input, str) else input
        if preamble:
            data = preamble + (data or b"")
        try:
            result = await self._exec(final, list(argv), data, limit, env, cwd, niceness, started)
        except TimeoutError:
            raise self._timed_out(list(argv), limit) from None
        if check and result.exit_status != 0:
            raise self.failure(argv, result.exit_status, result.stderr)
        return result

    async def check_elevation(self) -> None:
        """Before anything changes: can the login user become run_as? Raise ElevationError naming why not.

        One cheap command through the same sudo every later command uses, so a
        wrong or missing connection.sudoPassword fails the operation before a
        push, a generation or an activation has happened.
        """
        elevator = self.elevator
        if elevator is None:
            return
        probe, data = elevator.probe()
        log.debug("%s: can it run commands as %s?", self.target, elevator.user)
        try:
            result = await self._exec(probe, ["sudo"], data or None, self.default_timeout, None, None, 0)
        except TimeoutError:
            raise self._timed_out(["sudo"], self.default_timeout) from None
        if result.exit_status == 0:
            return
        reason = elevator.refusal(result.exit_status, result.stderr)
        # A refusal names the sudo password (the Pulumi layer puts its property path there).
        blames = Setting.SUDO_PASSWORD if reason is not None else None
        if reason is None:
            tail = " ".join(result.stderr.strip().splitlines()[-2:]) or "no message"
            reason = f"exit {result.exit_status}: {tail}"
        raise ElevationError(f"sudo on {self.target} refused to run commands as {elevator.user}: {reason}. "
                             "Nothing was changed", blames=blames)

    async def start(self, argv: Sequence[str], *, stdin: bool = True, stderr: Stderr = Stderr.PIPE,
                    env: Mapping[str, str] | None = None, new_session: bool = False,
                    stdin_from: int | None = None, stdout_to: int | None = None) -> Process:
        """Start argv with streaming stdin/stdout. The caller must `close()` the process.

        stdin_from / stdout_to: a pipe's end the process reads from / writes
        to instead of a pipe of its own (local processes only), so processes
        can be chained without the provider copying bytes between them.
        """
        final, preamble = self._prepare(argv)
        if preamble and stdin_from is not None:
            raise ValueError("an elevated command reads its elevation's input first: it cannot read from a pipe")
        pipes = Pipes(stdin_from, stdout_to)
        proc = await self._spawn(final, list(argv), stdin or bool(preamble), stderr, env, new_session, pipes)
        if preamble:
            proc.stdin.write(preamble)
            await proc.stdin.drain()
            if not stdin:
                proc.stdin.write_eof()  # the command itself was to read nothing
        return proc

    def failure(self, argv: Sequence[str], exit_status: int | None, stderr: str) -> CommandError:
        """The error for a command that failed: it names the caller's argv, never the elevation."""
        return self.error_type(self.target, list(argv), exit_status, stderr)

    @abstractmethod
    def _timed_out(self, argv: list[str], timeout: float | None) -> Exception: ...

    @abstractmethod
    async def _exec(self, argv: list[str], caller: list[str], input: bytes | None, timeout: float | None,
                    env: Mapping[str, str] | None, cwd: str | None, niceness: int,
                    started: Callable[[int], None] | None = None) -> CommandResult: ...

    @abstractmethod
    async def _spawn(self, argv: list[str], caller: list[str], stdin: bool, stderr: Stderr,
                     env: Mapping[str, str] | None, new_session: bool, pipes: Pipes) -> Process: ...


def _decode(data: object) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return str(data or "")


# -- on a target, over SSH ---------------------------------------------------------------


class OnHost(Runner):
    """A runner whose commands run on the host of `conn` (its SSH login), however they get there."""

    conn: Connection
    default_timeout: ClassVar[float | None] = REMOTE_TIMEOUT
    error_type: ClassVar[type[CommandError]] = RemoteCommandError

    @property
    def target(self) -> str:
        return self.conn.target

    @property
    def login_user(self) -> str:
        return self.conn.remote.user

    def _timed_out(self, argv: list[str], timeout: float | None) -> Exception:
        return RemoteCommandError(self.target, argv, None, f"timed out after {timeout or 0:.0f}s")


@dataclass(frozen=True)
class Target(OnHost):
    """Commands on a target over one SSH connection, as run_as (None: the SSH user)."""

    conn: Connection
    run_as: str | None = None

    @property
    def sudo_password(self) -> str | None:
        return self.conn.remote.credentials.sudo_password

    @classmethod
    def for_profile(cls, conn: Connection, profile: Profile) -> Target:
        """Who runs a profile's commands: root for the system profile, else its owner."""
        return cls(conn, "root" if profile.is_system else profile.user)

    def as_user(self, run_as: str | None) -> Target:
        """The same connection, running commands as another user."""
        return Target(self.conn, run_as)

    def on(self, conn: Connection) -> Target:
        """The same user on another connection (after a reconnect)."""
        return Target(conn, self.run_as)

    def for_store(self) -> Target:
        """Who imports into the target's store (a push, a remote build).

        The store is shared by every user: import as the SSH user (which must
        be trusted), or as root when the deployment needs root anyway.
        Importing as an unprivileged profile owner would be refused for lack
        of signatures.
        """
        return self.as_user("root" if self.run_as == "root" else None)

    def _lost(self, caller: list[str], e: BaseException) -> ConnectError:
        return ConnectError(f"lost the SSH connection to {self.target} while running `{caller[0]}`: "
                            f"{self.conn.describe_error(e)}")

    async def _exec(self, argv: list[str], caller: list[str], input: bytes | None, timeout: float | None,
                    env: Mapping[str, str] | None, cwd: str | None, niceness: int,
                    started: Callable[[int], None] | None = None) -> CommandResult:
        if env is not None or cwd is not None or niceness or started is not None:
            raise ValueError("env, cwd, niceness and started apply to local commands only")
        try:
            proc = await asyncio.wait_for(
                self.conn.conn.run(shlex.join(argv), input=input, check=False, encoding=None), timeout=timeout)
        except TimeoutError:
            raise  # an OSError too, but the command's, not the connection's: run() reports it
        except (asyncssh.Error, OSError) as e:
            raise self._lost(caller, e) from e
        if proc.exit_status is None and proc.exit_signal is None:
            # asyncssh returns rather than raises when the connection drops
            # mid-command: no exit status and no signal means nobody saw it end.
            raise self._lost(caller, ConnectionResetError("the connection closed before the command exited"))
        status = proc.exit_status if proc.exit_status is not None else 255
        return CommandResult(status, _decode(proc.stdout), _decode(proc.stderr))

    async def _spawn(self, argv: list[str], caller: list[str], stdin: bool, stderr: Stderr,
                     env: Mapping[str, str] | None, new_session: bool, pipes: Pipes) -> Process:
        if env is not None or stderr is Stderr.STDOUT or pipes.used:
            raise ValueError("env, a merged stderr and given pipes apply to local commands only")
        try:
            proc: asyncssh.SSHClientProcess[bytes] = await self.conn.conn.create_process(
                shlex.join(argv), encoding=None,
                stdin=asyncssh.PIPE if stdin else asyncssh.DEVNULL,
                stderr=asyncssh.DEVNULL if stderr is Stderr.DISCARD else asyncssh.PIPE)
        except (asyncssh.Error, OSError) as e:
            raise self._lost(caller, e) from e
        return _RemoteProcess(self, caller, proc)


class _RemoteProcess(Process):
    def __init__(self, runner: Runner, argv: Sequence[str], proc: asyncssh.SSHClientProcess[bytes]) -> None:
        super().__init__(runner, argv)
        self._proc = proc

    @property
    def stdin(self) -> ByteSink:
        return self._proc.stdin

    @property
    def stdout(self) -> ByteSource:
        return self._proc.stdout

    async def wait(self) -> CommandResult:
        done = await self._proc.wait(check=False)
        status = done.exit_status if done.exit_status is not None else 255
        return CommandResult(status, _decode(done.stdout), _decode(done.stderr))

    def kill(self) -> None:
        # Closing the channel is all SSH offers: the remote side sees EOF and a hang-up.
        self._proc.close()

    async def close(self) -> CommandResult:
        self._proc.close()
        status = self._proc.exit_status
        return CommandResult(status if status is not None else 255, "", "")


# -- on the deployer ------------------------------------------------------------------


@dataclass(frozen=True)
class Local(Runner):
    """Commands on the deployer, as asyncio subprocesses: nothing blocks the event loop."""

    run_as: str | None = None
    error_type: ClassVar[type[CommandError]] = LocalCommandError

    @property
    def target(self) -> str:
        return "the deployer"

    @property
    def login_user(self) -> str:
        return getpass.getuser()

    def _timed_out(self, argv: list[str], timeout: float | None) -> Exception:
        return NixError(f"`{' '.join(argv[:3])}` timed out after {timeout or 0:.0f}s")

    async def _create(self, argv: list[str], caller: list[str], **kw: object) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(*argv, **kw)  # type: ignore[arg-type]
        except FileNotFoundError as e:
            raise CommandNotFound(caller[0], "was not found") from e
        except PermissionError as e:
            raise CommandNotFound(caller[0], "is not executable") from e

    async def _exec(self, argv: list[str], caller: list[str], input: bytes | None, timeout: float | None,
                    env: Mapping[str, str] | None, cwd: str | None, niceness: int,
                    started: Callable[[int], None] | None = None) -> CommandResult:
        proc = await self._create(
            argv, caller, cwd=cwd, env=None if env is None else dict(env), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE)
        if started is not None:
            started(proc.pid)
        if niceness:
            # Set from here, not in a preexec hook: forking a process that runs
            # gRPC's threads (the provider) and running Python before exec breaks
            # gRPC's event engine in the child.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, niceness)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout=timeout)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            raise
        except asyncio.CancelledError:
            _kill(proc)
            # Reaped before the cancellation goes on: a process left to the garbage collector outlives its loop.
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(proc.wait()), CLOSE_TIMEOUT)
            raise
        return CommandResult(proc.returncode or 0, _decode(out), _decode(err))

    async def _spawn(self, argv: list[str], caller: list[str], stdin: bool, stderr: Stderr,
                     env: Mapping[str, str] | None, new_session: bool, pipes: Pipes) -> Process:
        proc = await self._create(
            argv, caller, stdin=pipes.stdin(stdin), stdout=pipes.stdout(), stderr=_STDERR[stderr],
            env=None if env is None else dict(env), start_new_session=new_session)
        return LocalProcess(self, caller, proc, new_session)


def close_fds(*fds: int) -> None:
    """Close file descriptors of ours; -1 (none) and ones already closed are skipped."""
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _kill(proc: asyncio.subprocess.Process, *, group: bool = False) -> None:
    """SIGKILL, unless it is known to have exited.

    os.kill, not proc.kill(): Popen.kill() polls first, and a poll that reaps
    the process takes its exit status from asyncio's child watcher, which then
    reports 255 for a command that succeeded. A zombie takes the signal harmlessly.
    """
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)


class LocalProcess(Process):
    def __init__(self, runner: Runner, argv: Sequence[str], proc: asyncio.subprocess.Process, session: bool) -> None:
        super().__init__(runner, argv)
        self._proc = proc
        self._session = session  # it leads its own session: kill the whole group

    @property
    def stdin(self) -> ByteSink:
        assert self._proc.stdin is not None, "started without stdin"
        return self._proc.stdin

    @property
    def stdout(self) -> ByteSource:
        assert self._proc.stdout is not None
        return self._proc.stdout

    @property
    def pid(self) -> int:
        return self._proc.pid

    async def _stderr(self, timeout: float | None) -> str:
        if self._proc.stderr is None:
            return ""
        with contextlib.suppress(Exception):
            return _decode(await asyncio.wait_for(self._proc.stderr.read(), timeout))
        return ""

    async def wait(self) -> CommandResult:
        err = await self._stderr(None)
        return CommandResult(await self._proc.wait(), "", err)

    def kill(self) -> None:
        _kill(self._proc, group=self._session)

    async def close(self) -> CommandResult:
        self.kill()
        # Read what is left so the pipes reach EOF: a paused, undrained pipe
        # would keep the subprocess transport (and wait()) from finishing.
        if self._proc.stdout is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proc.stdout.read(), CLOSE_TIMEOUT)
        err = await self._stderr(CLOSE_TIMEOUT)
        status = await asyncio.wait_for(self._proc.wait(), CLOSE_TIMEOUT)
        return CommandResult(status, "", err)


LOCAL = Local()
