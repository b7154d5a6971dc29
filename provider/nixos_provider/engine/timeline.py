"""Where a deployment's time goes: the steps of DESIGN §3, timed, written down when asked.

With PULUMI_NIXOS_TIMELINE=FILE in its environment, every engine process
(the provider, `nixos-deploy`) appends one JSON line per finished step to
FILE: `{"subject": ..., "step": ..., "start": ..., "end": ...}` with wall-clock
seconds, so lines from concurrent deployments and from several processes
line up. `bench/fleet_up.py` reads it to show where a fleet's `pulumi up`
spends its time. Without the variable nothing is recorded.

Lines are short and written with one `write` to a file opened for appending,
so concurrent writers do not interleave within a line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

ENV = "PULUMI_NIXOS_TIMELINE"


class Step(Enum):
    EVALUATE = "evaluate"  # nix eval of configurations (Check, preview)
    BUILD = "build"  # nix build of toplevels
    CONNECT = "connect"  # the first SSH connection, host key checked
    WAIT_TRANSFER = "wait-transfer"  # for a free copy slot (maxParallelTransfers), when none was
    PUSH = "push"  # what the host lacks, sent and imported
    COPY = "copy"  # a build host's result to the target: its own caches, the build host, or relayed
    LOCK = "lock"  # the supervisor uploaded, started, and holding the profile's lock
    REGISTER = "register"  # the new generation registered
    ACTIVATE = "activate"  # switch-to-configuration (or the profile's activate)
    CONFIRM = "confirm"  # magic rollback: the token over a new connection
    HEALTH_CHECK = "health-check"
    FINISH = "finish"  # the supervisor told to keep it, the host read back
    ROLLBACK = "rollback"  # a failure or a cancel: back to the previous generation
    REBOOT = "reboot"  # boot the new system once (reboot), wait for it, check it, keep it


def record(subject: str, step: Step, start: float, end: float) -> None:
    """Append one finished step, if a timeline was asked for."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"subject": subject, "step": step.value, "start": round(start, 3), "end": round(end, 3)})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@contextmanager
def span(subject: str, step: Step) -> Iterator[None]:
    """Time one step (recorded whether it succeeds or fails)."""
    start = time.time()
    try:
        yield
    finally:
        record(subject, step, start, time.time())


class Steps:
    """One deployment's steps, one after another: marking a step ends the one before."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self._current: tuple[Step, float] | None = None

    def mark(self, step: Step) -> None:
        if self._current is not None and self._current[0] is step:
            return
        self.end()
        self._current = (step, time.time())

    def end(self) -> None:
        if self._current is not None:
            step, start = self._current
            self._current = None
            record(self.subject, step, start, time.time())
