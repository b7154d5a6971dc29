"""Copy closures to a target: ask what it lacks, stream only that.

`nix-store --export` on the deployer is piped chunk by chunk into
`nix-store --import` on the target over one SSH channel, so memory stays flat
whatever the closure size. Nothing is registered as a generation here: an
interrupted push leaves only complete, valid paths behind (import is
per-path), and the next push sends what is still missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import EngineError, NixError, RemoteCommandError
from .models import PushStats
from .nix import Nix, PathInfo
from .process import Target

CHUNK = 256 * 1024
QUERY_BATCH = 400  # paths per remote validity query (keeps command lines short)


@dataclass(frozen=True)
class PushProgress:
    paths_done: int
    paths_total: int
    bytes_done: int
    bytes_total: int

    @property
    def percent(self) -> int:
        return 100 if self.bytes_total == 0 else min(100, self.bytes_done * 100 // self.bytes_total)

    def describe(self) -> str:
        return (f"copying {self.paths_total} paths, {_mib(self.bytes_total)}, {self.percent}%")


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


ProgressFn = Callable[[PushProgress], None]


async def missing_paths(target: Target, paths: Sequence[str]) -> list[str]:
    """The subset of paths that are not valid in the target's store, in the given order."""
    invalid: set[str] = set()
    for i in range(0, len(paths), QUERY_BATCH):
        batch = list(paths[i:i + QUERY_BATCH])
        res = await target.run(["nix-store", "--check-validity", "--print-invalid", *batch])
        invalid.update(res.stdout.split())
    return [p for p in paths if p in invalid]


async def substitute_on_target(target: Target, paths: Sequence[str]) -> None:
    """Let the target fetch what it can from its own binary caches; failures are fine."""
    if paths:
        await target.run(["nix-store", "--realise", *paths], check=False, timeout=1800)


async def push_closure(nix: Nix, target: Target, store_path: str, *, substitute_on_destination: bool = False,
                       progress: ProgressFn | None = None) -> PushStats:
    """Copy store_path's closure to the target and say what it took."""
    started = time.monotonic()
    closure: list[PathInfo] = await nix.closure(store_path)
    order = [p.path for p in closure]
    missing = await missing_paths(target, order)
    missing_before = len(missing)
    if missing and substitute_on_destination:
        await substitute_on_target(target, missing)
        missing = await missing_paths(target, missing)
    if not missing:
        return PushStats(0, 0, time.monotonic() - started, missing_before)
    sizes = {p.path: p.nar_size for p in closure}
    total = sum(sizes[p] for p in missing)
    sent = await _stream_export(nix, target, missing, total, progress)
    still = await missing_paths(target, missing)
    if still:
        raise EngineError(f"after copying, {len(still)} paths are still missing on {target.target} (first: {still[0]})")
    return PushStats(len(missing), sent, time.monotonic() - started, missing_before)


async def _stream_export(nix: Nix, target: Target, paths: list[str], total: int,
                         progress: ProgressFn | None) -> int:
    export = await asyncio.create_subprocess_exec(
        *nix.store_argv("--export", *paths),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )
    remote = await target.conn.start(target.argv(["nix-store", "--import"]))
    sent = 0
    last_report = 0.0
    assert export.stdout is not None
    try:
        while True:
            chunk = await export.stdout.read(CHUNK)
            if not chunk:
                break
            remote.stdin.write(chunk)
            await remote.stdin.drain()
            sent += len(chunk)
            now = time.monotonic()
            if progress and now - last_report > 0.5:
                last_report = now
                done_paths = min(len(paths), int(len(paths) * sent / total)) if total else 0
                progress(PushProgress(done_paths, len(paths), min(sent, total), total))
        remote.stdin.write_eof()
        result = await remote.wait(check=False)
    finally:
        remote.close()
        if export.returncode is None:
            export.kill()
        # Read what is left so the pipes reach EOF: a paused, undrained pipe
        # would keep the subprocess transport (and wait()) from finishing.
        assert export.stderr is not None
        err_bytes = b""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(export.stdout.read(), 10)
            err_bytes = await asyncio.wait_for(export.stderr.read(), 10)
        await asyncio.wait_for(export.wait(), 10)
    err = err_bytes.decode(errors="replace")
    if export.returncode not in (0, None) and export.returncode != -9:
        raise NixError(f"nix-store --export failed: {err.strip()[-500:]}")
    if result.exit_status != 0:
        stderr = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else str(result.stderr)
        raise RemoteCommandError(target.target, ["nix-store", "--import"], result.exit_status, stderr)
    if progress:
        progress(PushProgress(len(paths), len(paths), total, total))
    return sent
