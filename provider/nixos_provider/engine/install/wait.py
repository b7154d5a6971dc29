"""After nixos-anywhere: waiting for the host to come back running the installed system."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from ..errors import ConnectError, EngineError, HostKeyMismatch, InstallError
from ..models import Remote
from .probe import HostProbe, probe
from .run import OutputFn, _noop


async def wait_for_system(remote: Remote, system_path: str, timeout: float, *, status: OutputFn = _noop,
                          interval: float = 2.0) -> HostProbe:
    """Poll until the host answers over SSH (with remote.host_key pinned, if set) running system_path."""
    deadline = time.monotonic() + timeout
    quick = replace(remote, retries=1, connect_timeout=min(remote.connect_timeout, 10.0))
    last = "it did not answer"
    while True:
        try:
            seen = await probe(quick)
            if seen.installed and seen.current_system == system_path:
                return seen
            last = f"it {seen.describe()}"
        except HostKeyMismatch as e:
            last = str(e)  # maybe still the installer; a lasting mismatch is reported below
        except (ConnectError, EngineError) as e:
            last = str(e)
        if time.monotonic() >= deadline:
            raise InstallError(f"{remote.target} did not come back running {system_path} within {timeout:.0f}s "
                               f"after the reboot: {last}", phase="wait", state=last)
        status(f"waiting for {remote.target} to come back from the reboot")
        await asyncio.sleep(interval)


async def describe_state(remote: Remote) -> str:
    """Best effort, after a failure: what the host runs now, in words."""
    try:
        return f"the host {(await probe(replace(remote, retries=2, connect_timeout=10.0))).describe()}"
    except EngineError as e:
        return f"the host could not be inspected ({e})"
