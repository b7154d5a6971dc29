"""Copy closures to a target: ask what it lacks, stream only that.

`nix-store --export` on the deployer is piped chunk by chunk into
`nix-store --import` on the target over one SSH channel, so memory stays flat
whatever the closure size. Nothing is registered as a generation here: an
interrupted push leaves only complete, valid paths behind (import is
per-path), and the next push sends what is still missing.

With zstd (when both sides have it, as NixOS systems do) the stream is
compressed on the deployer by a multi-threaded `zstd` at a fast level and
decompressed on the target before the import: on a slow link it sends a
fraction of the bytes, at a CPU cost far below SSH's zlib.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConnectError, EngineError, NixError
from .lazy import lazy_module
from .models import PushStats
from .nix import Nix, PathInfo
from .process import LOCAL, ByteSink, ByteSource, Process, Stderr, Target

if TYPE_CHECKING:
    import asyncssh
else:
    asyncssh = lazy_module("asyncssh")

CHUNK = 256 * 1024
QUERY_BATCH = 400  # paths per remote validity query (keeps command lines short)
# Level 1 with one thread per core: measured in bench/ as the fastest setting
# on every link speed tried; higher levels cost more CPU than they save.
ZSTD_COMPRESS = ["-1", "-T0", "-q", "-c"]
# A constant script: nothing but the stream reaches it.
ZSTD_IMPORT = ["sh", "-c", "zstd -d -q -c | nix-store --import"]


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


async def choose_compression(target: Target, wanted: str, status: Callable[[str], None] | None = None) -> str:
    """What a push will use: "zstd" when asked for (or "auto") and both sides have zstd, else "none" or "ssh"."""
    if wanted in ("ssh", "none"):
        return wanted
    local = shutil.which("zstd") is not None
    res = await target.run(["sh", "-c", "command -v zstd"], check=False)
    if local and res.exit_status == 0:
        return "zstd"
    if wanted == "zstd" and status is not None:
        where = "the deployer" if not local else target.target
        status(f"compress: zstd is not installed on {where}; sending uncompressed")
    return "none"


async def push_closure(nix: Nix, target: Target, store_path: str, *, substitute_on_destination: bool = False,
                       progress: ProgressFn | None = None, compression: str = "none") -> PushStats:
    """Copy store_path's closure to the target and say what it took.

    compression is what choose_compression said: "zstd" compresses the
    stream here; "ssh" means the connection itself compresses.
    """
    started = time.monotonic()
    closure: list[PathInfo] = await nix.closure(store_path)
    order = [p.path for p in closure]
    missing = await missing_paths(target, order)
    missing_before = len(missing)
    if missing and substitute_on_destination:
        await substitute_on_target(target, missing)
        missing = await missing_paths(target, missing)
    if not missing:
        return PushStats(0, 0, time.monotonic() - started, missing_before, 0, compression)
    sizes = {p.path: p.nar_size for p in closure}
    total = sum(sizes[p] for p in missing)
    sent, wire = await _stream_export(nix, target, missing, total, progress, zstd=compression == "zstd")
    still = await missing_paths(target, missing)
    if still:
        raise EngineError(f"after copying, {len(still)} paths are still missing on {target.target} (first: {still[0]})")
    return PushStats(len(missing), sent, time.monotonic() - started, missing_before, wire, compression)


async def _stream_export(nix: Nix, target: Target, paths: list[str], total: int,
                         progress: ProgressFn | None, *, zstd: bool) -> tuple[int, int]:
    """Pipe the export into the target's import; (bytes exported, bytes sent over SSH)."""
    export = await LOCAL.start(nix.store_argv("--export", *paths), stdin=False)
    compressor: Process | None = None
    try:
        compressor = await LOCAL.start(["zstd", *ZSTD_COMPRESS], stderr=Stderr.DISCARD) if zstd else None
        remote = await target.start(ZSTD_IMPORT if zstd else ["nix-store", "--import"])
    except BaseException:
        # What did start must not outlive a push that could not begin.
        for started in (export, compressor):
            if started is not None:
                await started.close()
        raise
    counts = [0, 0]  # exported, sent
    last_report = [0.0]

    def report() -> None:
        now = time.monotonic()
        if progress and now - last_report[0] > 0.5:
            last_report[0] = now
            done = counts[0]
            done_paths = min(len(paths), int(len(paths) * done / total)) if total else 0
            progress(PushProgress(done_paths, len(paths), min(done, total), total))

    async def pump(source: ByteSource, sink: ByteSink, index: int) -> None:
        while chunk := await source.read(CHUNK):
            sink.write(chunk)
            await sink.drain()
            counts[index] += len(chunk)
            report()

    try:
        if compressor is None:
            await pump(export.stdout, remote.stdin, 0)
            counts[1] = counts[0]
        else:
            async def feed(into: Process) -> None:
                try:
                    await pump(export.stdout, into.stdin, 0)
                finally:
                    into.stdin.write_eof()

            await asyncio.gather(feed(compressor), pump(compressor.stdout, remote.stdin, 1))
        remote.stdin.write_eof()
        result = await remote.wait()
    except (ConnectionError, asyncssh.Error) as e:
        # nix-store --import registers a path only once all of it arrived:
        # what came in full stays, the rest is copied by the next deploy.
        raise ConnectError(
            f"the connection to {target.target} was lost while copying {len(paths)} store paths "
            f"({counts[1] / 1048576:.1f} MiB sent): {e or type(e).__name__}. Nothing was registered or activated; "
            "paths that arrived in full stay, and the next deploy copies the rest") from e
    finally:
        await remote.close()
        exported = await export.close()
        if compressor is not None:
            await compressor.close()
    # Killed (-9) only when it had already written everything: close() stops
    # a process that has not been reaped yet.
    if exported.exit_status not in (0, -9):
        raise NixError(f"nix-store --export failed: {exported.stderr.strip()[-500:]}")
    if result.exit_status != 0:
        raise remote.failure(result)
    if progress:
        progress(PushProgress(len(paths), len(paths), total, total))
    return counts[0], counts[1]
