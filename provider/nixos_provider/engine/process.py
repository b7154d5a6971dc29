"""The process layer: who runs a remote command, and local command execution.

Every command is a list of arguments. Remote commands are quoted by
`Connection.run`; sudo is prepended here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NixError
from .ssh import CommandResult, Connection


@dataclass
class Target:
    """A connection plus the user remote commands must run as."""

    conn: Connection
    run_as: str | None = None  # None: the SSH user

    def argv(self, argv: Sequence[str]) -> list[str]:
        want = self.run_as
        if want is None or want == self.conn.remote.user:
            return list(argv)
        if want == "root":
            return ["sudo", "-n", "--", *argv]
        return ["sudo", "-n", "-H", "-u", want, "--", *argv]

    async def run(self, argv: Sequence[str], **kw: object) -> CommandResult:
        return await self.conn.run(self.argv(argv), **kw)  # type: ignore[arg-type]

    @property
    def target(self) -> str:
        return self.conn.target


@dataclass
class LocalResult:
    exit_status: int
    stdout: str
    stderr: str


async def run_local(argv: Sequence[str], *, cwd: str | None = None, timeout: float | None = None,
                    env: dict[str, str] | None = None, niceness: int = 0) -> LocalResult:
    """Run a local command without blocking the event loop; cancelling the caller kills it."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )
    except FileNotFoundError as e:
        raise NixError(f"`{argv[0]}` was not found on PATH") from e
    if niceness:
        # Set from here, not in a preexec hook: forking a process that runs
        # gRPC's threads (the provider) and running Python before exec breaks
        # gRPC's event engine in the child.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, proc.pid, niceness)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise NixError(f"`{' '.join(argv[:3])}` timed out after {timeout:.0f}s") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    return LocalResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))
