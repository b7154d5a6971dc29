"""Engine errors: each carries a one-line, human message, never a traceback."""

from __future__ import annotations


class EngineError(Exception):
    """Something the user can act on. str(err) is the whole message."""


class ConnectError(EngineError):
    """The target could not be reached or would not let us in."""


class HostKeyMismatch(ConnectError):
    """The target presented a host key other than the pinned one."""

    def __init__(self, target: str, expected: str, seen: str) -> None:
        super().__init__(
            f"host key mismatch for {target}: the pinned key is {expected} but the host presented {seen}; "
            "refusing to connect (if the host was reinstalled on purpose, update `connection.hostKey`)"
        )
        self.expected = expected
        self.seen = seen


class HostBusy(EngineError):
    """Another deployment holds the profile's lock on the target; nothing was changed."""


class NixError(EngineError):
    """The local nix CLI failed (evaluation, build, export)."""


class CommandError(EngineError):
    """A command exited non-zero (or timed out: exit_status None).

    `argv` is the command its caller gave: the runner (process.py) elevates
    it with sudo where needed, and nothing of that shows here.
    """

    def __init__(self, target: str, argv: list[str], exit_status: int | None, stderr: str) -> None:
        tail = stderr.strip().splitlines()[-5:]
        detail = ("\n  " + "\n  ".join(tail)) if tail else ""
        super().__init__(f"`{' '.join(argv[:3])}{' ...' if len(argv) > 3 else ''}` failed on {target} (exit {exit_status}){detail}")
        self.argv = argv
        self.exit_status = exit_status
        self.stderr = stderr


class RemoteCommandError(CommandError):
    """A command on the target exited non-zero."""


class LocalCommandError(CommandError, NixError):
    """A command on the deployer exited non-zero (a NixError, as local commands were before the runner)."""


class CommandNotFound(NixError):
    """A local program could not be started."""

    def __init__(self, program: str, why: str) -> None:
        super().__init__(f"`{program}` {why}" + (" on PATH" if why == "was not found" else ""))
        self.program = program
        self.why = why


class DeployError(EngineError):
    """A deployment failed. `now_running` says what the target runs afterwards."""

    def __init__(self, message: str, *, phase: str, now_running: str | None = None,
                 generation: int | None = None, rolled_back: bool = False, output_tail: str = "") -> None:
        super().__init__(message)
        self.phase = phase
        self.now_running = now_running
        self.generation = generation
        self.rolled_back = rolled_back
        self.output_tail = output_tail
