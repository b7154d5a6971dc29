"""Running nixos-anywhere: its output streamed and redacted, its phase followed, its failure named."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from ..errors import CommandNotFound, InstallError, Setting
from ..models import InstallRequest
from ..transport.process import LOCAL, Stderr
from .command import child_env
from .files import redact, secrets_of

OutputFn = Callable[[str], None]
OUTPUT_TAIL_LINES = 25


def _noop(_: str) -> None:
    pass


# nixos-anywhere announces every step as `### <text> ###`.
_STEP_PHASES = {
    "Uploading install SSH keys": "connect",
    "Switching system into kexec": "kexec",
    "Building disko script": "disko",
    "Formatting hard drive with disko": "disko",
    "Uploading the system closure": "install",
    "Building the system closure": "install",
    "Copying extra files": "install",
    "Installing NixOS": "install",
    "Rebooting": "reboot",
    "Waiting for the machine to become unreachable due to reboot": "reboot",
    "Done!": "done",
}


def step_of(line: str) -> str | None:
    text = line.strip()
    if text.startswith("### ") and text.endswith(" ###"):
        return text[4:-4].strip()
    return None


def phase_after(step: str, current: str) -> str:
    """The phase nixos-anywhere is in once it prints this step."""
    if step in _STEP_PHASES:
        return _STEP_PHASES[step]
    if step.startswith("Uploading ") and " to " in step:
        return "disko"  # a --disk-encryption-keys upload
    if step.startswith("Generating "):
        return "hardware-config"
    return current  # "Gathering machine facts" belongs to the step around it


def describe_phase(phase: str) -> str:
    return {
        "start": "before it reached the host (arguments or local build)",
        "connect": "while connecting to the host, before kexec",
        "hardware-config": "while generating the hardware configuration",
        "done": "after it had finished",
    }.get(phase, f"in the {phase} phase")


async def run_nixos_anywhere(req: InstallRequest, argv: list[str], *, status: OutputFn = _noop,
                             output: OutputFn = _noop) -> None:
    """Run nixos-anywhere to completion, streaming redacted lines; raise InstallError with the phase."""
    secrets = secrets_of(req)
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    phase = "start"
    try:
        # Its own session, so a timeout or a cancelled update stops every
        # process it started (ssh, nix copy), not only the script.
        proc = await LOCAL.start(argv, stdin=False, stderr=Stderr.STDOUT, env=child_env(req), new_session=True)
    except CommandNotFound as e:
        raise InstallError(f"cannot run nixos-anywhere: `{argv[0]}` {e.why} (set "
                           f"{Setting.NIXOS_ANYWHERE_COMMAND.value}); the host was not touched",
                           phase="start", state="unchanged", blames=Setting.NIXOS_ANYWHERE_COMMAND) from e

    async def follow() -> int:
        nonlocal phase
        while line_bytes := await proc.stdout.readline():
            line = redact(line_bytes.decode(errors="replace").rstrip(), secrets)
            if not line.strip():
                continue
            tail.append(line)
            step = step_of(line)
            if step is not None:
                phase = phase_after(step, phase)
                output(f"nixos-anywhere: {step}")
            else:
                status(line)
        return (await proc.wait()).exit_status

    try:
        returncode = await asyncio.wait_for(follow(), timeout=req.timeout)
    except (TimeoutError, asyncio.CancelledError) as e:
        proc.kill()
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise InstallError(f"nixos-anywhere did not finish within {req.timeout:.0f}s and was stopped "
                           f"{describe_phase(phase)}", phase=phase, output_tail="\n".join(tail)) from None
    if returncode != 0:
        last = "\n  ".join(tail)
        raise InstallError(f"nixos-anywhere failed {describe_phase(phase)} (exit {returncode}); "
                           f"its last output:\n  {last}", phase=phase, output_tail="\n".join(tail))
