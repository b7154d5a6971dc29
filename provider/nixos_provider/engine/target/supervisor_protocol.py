"""The protocol between the deployer and supervisor.sh, typed on the deployer's side.

Three channels, each with one type here:
- the supervisor's command line: named options (`supervisor_argv`);
- control files the deployer writes into the deployment's directory
  (`Control`; `go` carries a `Go`);
- the one-line `state` file the supervisor writes, parsed once
  (`SupervisorState.parse`) and read by activation.py and deploy.py alike,
  and the `registered` file it writes once it made the generation
  (`Registered.parse`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class ActivationSpec:
    mode: str  # "system" | "profile"
    profile: str
    new_path: str
    # What the supervisor registered (`Registered`): None until it has.
    new_gen: int | None
    prev_gen: int | None
    prev_path: str | None
    action: str
    magic_rollback: bool
    confirm_timeout: float
    auto_rollback: bool
    activation_timeout: float
    activate_command: str | None = None
    # How long the supervisor waits for the deployer's go after its last sign of life.
    ready_timeout: float = 30.0


    @property
    def subject(self) -> str:
        """What this supervisor brings to the profile, for status lines."""
        return self.new_path


@dataclass(frozen=True)
class RollbackSpec:
    """destroy's rollback: return a profile to one of its generations and re-activate it.

    When that generation was garbage-collected, `to_path` (its store path, if
    the target's store still has it) is registered as a new generation instead.
    """

    mode: str  # "system" | "profile"
    profile: str
    to_gen: int
    to_path: str | None
    activation_timeout: float
    activate_command: str | None = None

    @property
    def subject(self) -> str:
        return f"generation {self.to_gen}"


def supervisor_argv(task: str, workdir: str, token: str, spec: ActivationSpec | RollbackSpec) -> list[str]:
    """supervisor.sh's options for one deployment (or rollback); an unset optional value is left out."""
    if isinstance(spec, RollbackSpec):
        return _rollback_argv(workdir, token, spec)
    argv = ["--task", task, "--dir", workdir, "--token", token, "--mode", spec.mode, "--profile", spec.profile,
            "--new-path", spec.new_path]
    argv += ["--action", spec.action, "--magic-rollback", _flag(spec.magic_rollback),
             "--confirm-timeout", str(int(spec.confirm_timeout)), "--auto-rollback", _flag(spec.auto_rollback),
             "--activation-timeout", str(int(spec.activation_timeout)), "--ready-timeout", str(int(spec.ready_timeout))]
    if spec.activate_command is not None:
        argv += ["--activate-command", spec.activate_command]
    return argv


def _rollback_argv(workdir: str, token: str, spec: RollbackSpec) -> list[str]:
    argv = ["--task", "rollback-to", "--dir", workdir, "--token", token, "--mode", spec.mode, "--profile",
            spec.profile, "--to-gen", str(spec.to_gen)]
    if spec.to_path is not None:
        argv += ["--to-path", spec.to_path]
    argv += ["--activation-timeout", str(int(spec.activation_timeout))]
    if spec.activate_command is not None:
        argv += ["--activate-command", spec.activate_command]
    return argv


def _flag(value: bool) -> str:
    return "1" if value else "0"


class Control(Enum):
    """Files the deployer writes into the deployment's directory; the supervisor polls for them."""

    GO = "go"  # register the generation and activate it: a Go
    CONFIRM = "confirm"  # the token, written over a new connection (magic rollback)
    FINISH = "finish"  # keep the new generation
    ABORT = "abort"  # roll back at the next step
    ALIVE = "alive"  # touched while the deployer reads the host before go: it is still there


@dataclass(frozen=True)
class Go:
    """The deployer's go: register the generation and activate it."""

    hold: float  # how long, after activation, the deployer's last word may take (its health checks)

    def text(self) -> str:
        return f"{int(self.hold)}\n"


@dataclass(frozen=True)
class Registered:
    """What the supervisor registered, under the lock: the new generation (None when nothing new: `test`, or the
    same path again), the one before it (None then too, or when the profile is new) and what ran before."""

    new_gen: int | None
    prev_gen: int | None
    prev_path: str | None

    @classmethod
    def parse(cls, text: str) -> Registered | None:
        """None until the file is there (it is written whole, then moved into place)."""
        lines = text.split("\n")
        if len(lines) < 4:
            return None

        def number(value: str) -> int | None:
            return int(value) if value.isdigit() else None

        return cls(number(lines[0]), number(lines[1]), lines[2] or None)


class Phase(Enum):
    """The first word of the state line."""

    STARTING = ""  # no state written yet
    READY = "ready"  # holds the profile's lock; waits for Control.GO
    REGISTERING = "registering"  # nix-env makes the new generation, under the lock
    ACTIVATING = "activating"
    WAITING_CONFIRM = "waiting-confirm"
    CONFIRMED = "confirmed"  # waits for Control.FINISH
    ROLLING_BACK = "rolling-back"
    DONE = "done"
    FAILED = "failed"  # stopped without rolling back (autoRollback off, or it could not start)
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"
    LOCKED_OUT = "locked-out"  # another deployment holds the lock; nothing was changed
    UNKNOWN = "?"  # a line this deployer does not know (never written by its own supervisor)

    @property
    def terminal(self) -> bool:
        """The supervisor has exited."""
        return self in (Phase.DONE, Phase.FAILED, Phase.ROLLED_BACK, Phase.ROLLBACK_FAILED, Phase.LOCKED_OUT)


class Cause(Enum):
    """Why the supervisor rolled back or stopped."""

    ACTIVATION_FAILED = "activation-failed"  # with the activation's exit status (124: it timed out)
    UNCONFIRMED = "unconfirmed"  # magic rollback: no token within confirmTimeout
    REQUESTED = "requested"  # Control.ABORT after confirmation (a health check failed, or a cancel)
    ABORTED = "aborted"  # Control.ABORT before or right after activation
    NO_WORD = "no-word-from-the-deployer"  # neither GO nor FINISH came in time
    LOCK = "lock"  # the lock file could not be opened
    REGISTER = "register"  # nix-env could not make the new generation; nothing was activated
    GONE = "gone"  # rollback-to: the generation and its store path are gone
    SWITCH = "switch"  # rollback-to: nix-env could not re-point the profile
    USAGE = "usage"  # the command line was malformed
    OTHER = "?"


_REASON = re.compile(r"^(?P<cause>[a-z-]+)(?::(?P<status>\d+))?(?::\s*(?P<detail>.*))?$", re.DOTALL)


@dataclass(frozen=True)
class SupervisorState:
    """One reading of the state file.

    `cause` says why it rolled back or stopped, with the activation's
    `exit_status` when that failed; `detail` is the rest of the line (why a
    rollback failed, who holds the lock, the usage error).
    """

    phase: Phase
    cause: Cause | None = None
    exit_status: int | None = None
    detail: str = ""
    line: str = ""

    @classmethod
    def parse(cls, line: str) -> SupervisorState:
        line = line.strip()
        word, _, rest = line.partition(" ")
        try:
            phase = Phase(word)
        except ValueError:
            return cls(Phase.UNKNOWN, detail=line, line=line)
        rest = rest.strip()
        if phase is Phase.LOCKED_OUT:
            return cls(phase, detail=rest, line=line)
        if not rest or phase not in (Phase.ROLLING_BACK, Phase.FAILED, Phase.ROLLED_BACK, Phase.ROLLBACK_FAILED):
            return cls(phase, detail=rest, line=line)
        m = _REASON.match(rest)
        if m is None:
            return cls(phase, Cause.OTHER, detail=rest, line=line)
        try:
            cause = Cause(m["cause"])
        except ValueError:
            return cls(phase, Cause.OTHER, detail=rest, line=line)
        status = int(m["status"]) if m["status"] is not None else None
        return cls(phase, cause, status, (m["detail"] or "").strip(), line)

    @property
    def terminal(self) -> bool:
        return self.phase.terminal

    @property
    def timed_out(self) -> bool:
        """The activation was stopped by its timeout (`timeout` exits 124)."""
        return self.cause is Cause.ACTIVATION_FAILED and self.exit_status == 124

    @property
    def failed_step(self) -> str | None:
        """Which step of the deployment the supervisor saw fail, when it says."""
        if self.cause is Cause.ACTIVATION_FAILED:
            return "activation"
        if self.cause is Cause.UNCONFIRMED:
            return "confirmation"
        return None

    def __str__(self) -> str:
        return self.line or self.phase.value
