"""Engine errors: each carries a one-line, human message, never a traceback.

Messages speak in the engine's terms. When an error blames one of the
request's settings, it names it by its `Setting` phrase and says which in
`blames`; a caller with its own names for settings (the Pulumi layer's
property paths) puts them in its place.
"""

from __future__ import annotations

from enum import Enum


class Setting(Enum):
    """A setting of the engine's requests an error can blame; the value is how the engine's messages name it."""

    HOST_KEY = "the pinned host key"
    PRIVATE_KEY = "the private key"
    PRIVATE_KEY_PASSWORD = "the passphrase of the private key"
    CREDENTIALS = "the credentials (private key, password or agent)"
    PROXY = "a jump host"
    NIXOS_ANYWHERE_COMMAND = "the nixos-anywhere command"
    NIX_COMMAND = "the nix command"
    SUDO_PASSWORD = "the sudo password"


class EngineError(Exception):
    """Something the user can act on. str(err) is the whole message; `blames` the setting it names, if any."""

    def __init__(self, message: str, *, blames: Setting | None = None) -> None:
        super().__init__(message)
        self.blames = blames


class ConnectError(EngineError):
    """The target could not be reached or would not let us in."""


class HostKeyMismatch(ConnectError):
    """The target presented a host key other than the pinned one."""

    def __init__(self, target: str, expected: str, seen: str) -> None:
        super().__init__(
            f"host key mismatch for {target}: the pinned key is {expected} but the host presented {seen}; "
            f"refusing to connect (if the host was reinstalled on purpose, update {Setting.HOST_KEY.value})",
            blames=Setting.HOST_KEY,
        )
        self.expected = expected
        self.seen = seen


class BuildHostError(EngineError):
    """The build host could not be reached, or could not build: nothing on the target was changed.

    A setting it blames is the build host's own: `blames` names the connection's field, and the caller knows it
    is the build host's."""


class ElevationError(EngineError):
    """sudo would not run a command as another user (a wrong or missing connection.sudoPassword, no rule)."""


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

    def __init__(self, program: str, why: str, *, blames: Setting | None = None) -> None:
        super().__init__(f"`{program}` {why}" + (" on PATH" if why == "was not found" else ""), blames=blames)
        self.program = program
        self.why = why


class HostRebooted(EngineError):
    """The target booted again while a supervisor ran (or its work directory vanished): the supervisor, its lock
    and its work directory are gone, so nothing on the host will confirm, roll back or finish that deployment."""

    def __init__(self, message: str, *, booted_again: bool) -> None:
        super().__init__(message)
        self.booted_again = booted_again  # False: the same boot, the work directory removed


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


class InstallError(EngineError):
    """nixos-anywhere failed, or the host did not come back as installed.

    `phase` is the nixos-anywhere phase that failed (kexec, disko, install,
    reboot) or a step of ours (connect, wait); `state` says what the host runs
    afterwards, as far as we could tell.
    """

    def __init__(self, message: str, *, phase: str, output_tail: str = "", state: str = "",
                 blames: Setting | None = None) -> None:
        super().__init__(message, blames=blames)
        self.phase = phase
        self.output_tail = output_tail
        self.state = state


class NotNixos(EngineError):
    """The host runs no NixOS to adopt (no system profile and no /run/current-system)."""

    def __init__(self, target: str) -> None:
        super().__init__(f"{target} does not run NixOS (no /nix/var/nix/profiles/system and no /run/current-system)")


class NoNixosConfiguration(EngineError):
    """The flake reference names no NixOS configuration, so there is no disko script to build beside it."""

    def __init__(self, ref: object) -> None:
        super().__init__(f"cannot find the NixOS configuration of `{ref}` for nixos-anywhere")
        self.ref = ref


class DiskoScriptFailed(EngineError):
    """Building the configuration's disko script failed (the configuration may lack disko's module)."""

    def __init__(self, cause: EngineError) -> None:
        super().__init__(str(cause), blames=cause.blames)
