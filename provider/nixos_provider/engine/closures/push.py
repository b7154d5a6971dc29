"""Copy closures to a target: ask what it lacks, stream only that.

One `nix-store --export` of the missing paths on the deployer becomes the
stream the target's `nix-store --serve --write` reads (serve_stream.py): each
NAR goes straight into the target's store, registered with the hash,
references, deriver and content address it has here. Memory stays flat on
both sides whatever the closure size. Nothing is registered as a generation
here: an interrupted push leaves only complete, valid paths behind (each path
is added whole or not at all), and the next push sends what is still missing.

The bytes travel through the OpenSSH client (`ssh`, openssh.py) when it can
reach the host as the provider's own connection does, and otherwise (or if
`ssh` fails) through that connection (asyncssh). With `ssh` and no
compression the NAR bytes never pass through Python: splice(2) moves them
from the export's pipe into the pipe `ssh` reads.

With zstd (when both sides have it, as NixOS systems do) the stream is
compressed on the deployer by a multi-threaded `zstd` at a fast level and
decompressed on the target before `nix-store --serve`: on a slow link it sends
a fraction of the bytes, at a CPU cost far below SSH's zlib.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import CommandNotFound, ConnectError, EngineError, NixError
from ..lazy import lazy_module
from ..models import PushStats, SubstitutePolicy
from ..nix.cli import Nix, PathInfo
from ..transport import openssh
from ..transport.process import LOCAL, PATHS_PER_COMMAND, ByteSink, ByteSource, CommandResult, Process, Stderr, Target, close_fds
from . import serve_stream, substitution

if TYPE_CHECKING:
    import asyncssh
else:
    asyncssh = lazy_module("asyncssh")

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux's number, where the module does not name it
CLOSE_WAIT = 10.0  # how long the relay thread may take to end once its pipes are closed
# Level 1 with one thread per core: measured in bench/ as the fastest setting
# on every link speed tried; higher levels cost more CPU than they save.
ZSTD_COMPRESS = ["-1", "-T0", "-q", "-c"]
SERVE = ["nix-store", "--serve", "--write"]


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
    for i in range(0, len(paths), PATHS_PER_COMMAND):
        batch = list(paths[i:i + PATHS_PER_COMMAND])
        res = await target.run(["nix-store", "--check-validity", "--print-invalid", *batch])
        invalid.update(res.stdout.split())
    return [p for p in paths if p in invalid]


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


async def push_closure(nix: Nix, target: Target, store_path: str, *, substitute: SubstitutePolicy = "never",
                       progress: ProgressFn | None = None, compression: str = "none",
                       status: Callable[[str], None] | None = None) -> PushStats:
    """Copy store_path's closure to the target and say what it took.

    substitute says whether the target first fetches what its own binary
    caches hold (substitution.py). compression is what choose_compression
    said: "zstd" compresses the stream here; "ssh" means the connection
    itself compresses. status hears what the caches offered, and why the push
    left `ssh` for the provider's own connection, if it did.
    """
    started = time.monotonic()
    why_not = openssh.unusable(target.conn)
    # `ssh` logs in while the closure and what the target lacks are worked
    # out: its connection costs nothing then (a tenth of a second or more).
    early = asyncio.ensure_future(_open(target, compression, use_ssh=True)) if why_not is None else None
    try:
        closure: list[PathInfo] = await nix.closure(store_path)
        order = [p.path for p in closure]
        missing_before, missing = await fetch_from_caches(target, order, substitute, status)
        substituted = missing_before - len(missing)
        if not missing:
            return PushStats(0, 0, time.monotonic() - started, missing_before, 0, compression, substituted=substituted)
        infos = {p.path: p for p in closure}
        if early is not None:
            opening, early = early, None
            try:
                channel = await opening
                sent = await _stream(nix, channel, [infos[p] for p in missing], progress)
                return PushStats(len(missing), sent.nar_bytes, time.monotonic() - started, missing_before,
                                 sent.wire_bytes, compression, "openssh", substituted)
            except (_SshFailed, CommandNotFound) as e:
                # Whatever arrived in full stays: send the rest the other way.
                missing = await missing_paths(target, missing)
                why_not = f"ssh failed ({e})"
                if status is not None:
                    status(f"copying over the provider's own SSH connection: {why_not}")
        log.debug("push to %s over the provider's connection: %s", target.target, why_not)
        channel = await _open(target, compression, use_ssh=False)
        sent = await _stream(nix, channel, [infos[p] for p in missing], progress)
        return PushStats(len(missing), sent.nar_bytes, time.monotonic() - started, missing_before, sent.wire_bytes,
                         compression, "connection", substituted)
    finally:
        if early is not None:
            await _discard(early)


async def fetch_from_caches(target: Target, closure: list[str], policy: SubstitutePolicy,
                      status: Callable[[str], None] | None) -> tuple[int, list[str]]:
    """Let the target fetch what it lacks of the closure from its binary caches: how many paths it lacked,
    and which it still lacks. With "never" it only says what it lacks."""
    if policy == "never":
        missing = await missing_paths(target, closure)
        return len(missing), missing
    started = time.monotonic()
    if status is not None:
        status(f"asking {target.target} for what it lacks of {len(closure)} paths, to fetch from its binary caches")
    done = await substitution.fetch_missing(target, closure, policy)
    # What it did not ask its caches for (they did not answer) is only checked for: later in closure order.
    unasked = await missing_paths(target, done.unasked)
    lacked, still = len(done.lacked) + len(unasked), [*done.still_missing, *unasked]
    if status is not None and lacked:
        status(_fetch_summary(target.target, done.offer, lacked, len(still), time.monotonic() - started))
    return lacked, still


def _fetch_summary(host: str, offer: substitution.Offer, missing: int, still: int, seconds: float) -> str:
    if offer.unreachable and not offer.paths:
        return f"{host}'s binary caches did not answer ({'; '.join(offer.unreachable)}); pushing all {missing} paths"
    if not offer.paths:
        return f"{host}'s binary caches offer none of the {missing} paths it lacks; pushing them"
    rest = f"; pushing the other {still}" if still else ""
    return (f"{host} fetched {missing - still} of the {missing} paths it lacked from its binary caches "
            f"({_mib(offer.download_bytes)} downloaded) in {seconds:.1f}s{rest}")


class _SshFailed(Exception):
    """`ssh` itself failed (it could not connect, or it died): the provider's connection may still carry the push."""


@dataclass
class _Sent:
    nar_bytes: int = 0
    wire_bytes: int = 0


class _Fd:
    """A file descriptor with one owner at a time: closed by close(), unless handed on with take()."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def fileno(self) -> int:
        """Lend the descriptor (to a child process that dups it); it stays ours to close."""
        if self._fd < 0:
            raise ValueError("the descriptor was closed or handed on")
        return self._fd

    def take(self) -> int:
        """Hand the descriptor on: from now on its new owner closes it."""
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        close_fds(self._fd)
        self._fd = -1


@dataclass
class _Channel:
    """The target's end of a push, started: `nix-store --serve --write`, and the pipe the relay writes into.

    stream_r is the pipe's read end while something local still has to take
    it: zstd, or (over the provider's connection) Python's pump; not held
    when `ssh` reads it itself (nothing is compressed here).
    """

    target: Target
    remote: Process
    stream_w: _Fd
    stream_r: _Fd
    preamble: bytes  # the elevation's input: the first bytes of the stream
    use_ssh: bool
    zstd: bool

    async def close(self) -> CommandResult:
        self.stream_w.close()
        self.stream_r.close()
        return await self.remote.close()


async def _open(target: Target, compression: str, *, use_ssh: bool) -> _Channel:
    zstd = compression == "zstd"
    # The elevation (sudo) wraps nix-store alone; its input leads the stream.
    serve, preamble = target.elevated(SERVE)
    remote_argv = ["sh", "-c", 'zstd -d -q -c | "$@"', "sh", *serve] if zstd else serve
    stream_r, stream_w = _pipe()
    with contextlib.ExitStack() as on_failure:
        on_failure.callback(stream_r.close)
        on_failure.callback(stream_w.close)
        if use_ssh:
            runner = openssh.OpenSshTarget(target.conn, compress=compression == "ssh")
            direct = not zstd
            remote = await runner.start(remote_argv, stdin=not direct,
                                        stdin_from=stream_r.fileno() if direct else None)
            if direct:
                stream_r.close()  # ssh has its own copy
        else:
            remote = await target.as_user(None).start(remote_argv)
        on_failure.pop_all()
    return _Channel(target, remote, stream_w, stream_r, preamble, use_ssh, zstd)


async def _discard(early: asyncio.Future[_Channel]) -> None:
    """An early `ssh` that was not needed (nothing to copy, or a failure before the copy).

    Awaited, not cancelled: asyncio (3.11) can hang cancelling a process that
    is still starting, and starting `ssh` takes milliseconds.
    """
    with contextlib.suppress(Exception):
        await (await early).close()


def _pipe() -> tuple[_Fd, _Fd]:
    read, write = os.pipe()
    with contextlib.suppress(OSError):
        # A 1 MiB pipe: fewer, larger moves than the default 64 KiB.
        fcntl.fcntl(write, F_SETPIPE_SZ, PIPE_SIZE)
    return _Fd(read), _Fd(write)


class _Streaming:
    """One push's moving parts, each with one owner: the export and zstd processes, the relay thread, the pump,
    the reply reader, the pipes between them. Leaving it (`async with`) stops them all, in the order that lets
    each end: what runs is stopped first, so the relay thread meets EOF or a broken pipe and ends; only then is
    the pipe end it may still be reading closed."""

    def __init__(self, channel: _Channel, infos: list[PathInfo], progress: ProgressFn | None) -> None:
        self.channel, self.infos, self.progress = channel, infos, progress
        self.sent = _Sent()
        self.total = sum(i.nar_size for i in infos)
        self.exported: list[CommandResult] = []  # each local process's result, once closed (the export's first)
        self._export_r = _Fd(-1)
        self._procs: list[Process] = []
        self._relay: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Future[Any]] = []  # the pump and the reply reader
        self._piped: asyncio.ReadTransport | None = None  # the stream's read end, when Python pumps it
        self._last_report = 0.0

    async def __aenter__(self) -> _Streaming:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            if not task.done():
                task.cancel()
        if self._piped is not None:
            self._piped.close()
        await self.channel.close()
        self.exported = [await proc.close() for proc in self._procs]
        if self._relay is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._relay), CLOSE_WAIT)
        self._export_r.close()

    def report(self) -> None:
        paths = len(self.infos)
        done = min(paths, int(paths * self.sent.nar_bytes / self.total)) if self.total else 0
        if self.progress:
            self.progress(PushProgress(done, paths, min(self.sent.nar_bytes, self.total), self.total))

    async def run(self, nix: Nix) -> tuple[BaseException | None, bytes, CommandResult]:
        """export -> relay (a thread) -> [zstd] -> the target: (the first failure of the stream, the target's
        replies, the target's exit)."""
        loop = asyncio.get_running_loop()
        channel, remote = self.channel, self.channel.remote

        def nar_moved(n: int) -> None:  # in the relay's thread
            self.sent.nar_bytes += n
            now = time.monotonic()
            if self.progress and now - self._last_report > 0.5:
                self._last_report = now
                loop.call_soon_threadsafe(self.report)

        self._export_r, export_w = _pipe()
        try:
            self._procs.append(await LOCAL.start(nix.store_argv("--export", *(i.path for i in self.infos)),
                                                 stdin=False, stdout_to=export_w.fileno()))
        finally:
            export_w.close()
        source: ByteSource | None = None  # what Python pumps into the target, if anything
        if channel.zstd:
            compressor = await LOCAL.start(["zstd", *ZSTD_COMPRESS], stderr=Stderr.DISCARD,
                                           stdin_from=channel.stream_r.fileno())
            self._procs.append(compressor)
            source = compressor.stdout  # counted on its way: the bytes on the wire
            channel.stream_r.close()
        elif channel.stream_r.held:
            source, self._piped = await _reader(channel.stream_r.take())
        replies = asyncio.ensure_future(remote.stdout.read())
        self._tasks.append(replies)
        self._relay = loop.run_in_executor(None, _relay, self._export_r.fileno(), channel.stream_w.take(),
                                           self.infos, channel.preamble, nar_moved)
        pump = asyncio.ensure_future(_pump(source, remote.stdin, self.sent)) if source is not None else None
        if pump is not None:
            self._tasks.append(pump)
        failed = await _first_failure([self._relay] if pump is None else [self._relay, pump])
        if failed is not None:
            # The stream broke: the remote end has ended, or ends at the EOF
            # the relay left behind; its exit says which side failed.
            try:
                return failed, b"", await asyncio.wait_for(remote.wait(), CLOSE_WAIT)
            except TimeoutError:
                return failed, b"", await remote.close()
        if pump is None:
            self.sent.wire_bytes = self.sent.nar_bytes
        answer = await replies  # to EOF: the remote command has ended
        return None, answer, await remote.wait()


async def _stream(nix: Nix, channel: _Channel, infos: list[PathInfo], progress: ProgressFn | None) -> _Sent:
    """Send infos' paths through channel (which it closes), and check that the target took each of them."""
    target = channel.target
    paths = [i.path for i in infos]
    async with _Streaming(channel, infos, progress) as streaming:
        try:
            failed, answer, result = await streaming.run(nix)
        except (ConnectionError, asyncssh.Error) as e:
            raise _lost(target, paths, streaming.sent, e) from e
    sent, export_result = streaming.sent, streaming.exported[0]
    # Killed (-9) only when it had already written everything: close() stops
    # a process that has not been reaped yet.
    if export_result.exit_status not in (0, -9):
        raise NixError(f"nix-store --export failed: {export_result.stderr.strip()[-500:]}")
    if channel.use_ssh and (failed_ssh := openssh.failed_to_connect(result)) is not None:
        raise _SshFailed(str(failed_ssh))
    if not channel.use_ssh and result.exit_status == 255:  # no exit status: the connection dropped
        raise _lost(target, paths, sent, failed or ConnectionResetError("the channel closed")) from failed
    if result.exit_status != 0:
        # Named as the caller's command: no sudo or zstd wrapper in the message.
        said = result.stderr
        if re.search(r"lacks a (valid )?signature", said):  # 2.8: "a valid signature"; later: "a signature by"
            said += (f"\n{target.user} may not add unsigned store paths to the store on {target.target}: make "
                     "it a trusted Nix user (`trusted-users` in nix.conf), or deploy as root")
        raise target.failure(SERVE, result.exit_status, said)
    if failed is not None:
        raise EngineError(f"copying to {target.target} failed: {failed}")
    try:
        done = serve_stream.replies_done(answer, len(infos))
    except serve_stream.StreamError as e:
        raise EngineError(f"copying to {target.target} failed: {e}") from e
    if done != len(infos):
        raise EngineError(f"{target.target} took {done} of the {len(infos)} store paths sent (first missing: "
                          f"{paths[done]}); the rest is copied by the next deploy")
    if progress:
        progress(PushProgress(len(paths), len(paths), streaming.total, streaming.total))
    return sent


def _lost(target: Target, paths: list[str], sent: _Sent, e: BaseException) -> ConnectError:
    # Each path is registered only once all of it arrived: what came in
    # full stays, the rest is copied by the next deploy.
    return ConnectError(
        f"the connection to {target.target} was lost while copying {len(paths)} store paths "
        f"({sent.wire_bytes / 1048576:.1f} MiB sent): {e or type(e).__name__}. Nothing was registered or "
        "activated; paths that arrived in full stay, and the next deploy copies the rest")


async def _first_failure(tasks: list[asyncio.Future[None]]) -> BaseException | None:
    """Wait for all of tasks, or for the first to fail: its exception (None if all ended well)."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for task in reversed(tasks):  # the pump's error before the relay's: it says more
        if task in done and task.exception() is not None:
            return task.exception()
    return None


def _relay(export_r: int, stream_w: int, infos: list[PathInfo], preamble: bytes,
           nar_moved: Callable[[int], None]) -> None:
    """The relay thread: export -> serve stream; its end of the stream is closed however it ends."""
    try:
        serve_stream.relay_export(export_r, stream_w, infos, preamble, nar_moved)
    finally:
        close_fds(stream_w)


async def _reader(fd: int) -> tuple[ByteSource, asyncio.ReadTransport]:
    """An asyncio reader of a pipe's read end, and its transport (which owns the fd from now on)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=PIPE_SIZE, loop=loop)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                                os.fdopen(fd, "rb", buffering=0))
    return reader, transport


async def _pump(source: ByteSource, sink: ByteSink, sent: _Sent) -> None:
    while chunk := await source.read(CHUNK):
        sink.write(chunk)
        await sink.drain()
        sent.wire_bytes += len(chunk)
    sink.write_eof()
