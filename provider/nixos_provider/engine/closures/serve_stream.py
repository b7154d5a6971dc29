"""The stream a target's `nix-store --serve --write` reads: each NAR straight into its store.

Why this and not `nix-store --export | nix-store --import`: the import reads
each path's whole NAR into memory and parses it twice before it writes
anything (a 1 GiB path costs the target 1 GiB of RAM), while the serve
protocol's AddToStoreNar streams the NAR into the store as it arrives, with
the path's registration (hash, references, deriver, content address) sent
ahead of it. It is what `nix copy --to ssh://` speaks, in every Nix the
project supports (2.8 to 2.34).

The deployer still reads one `nix-store --export` of all the missing paths (a
single local process, however many paths) and rewrites it on the fly: an
export is, per path, `1`, the NAR, then a trailer (magic, path, references,
deriver); the NAR's length is the path's narSize, known beforehand. The NAR
bytes themselves are moved with splice(2), never through Python's buffers.

The stream is written blind: greeting, then one AddToStoreNar per path, then
EOF, with no reply awaited in between, so it can pass through zstd. The
replies (the server's greeting and one `1` per path) are read at the end.

Wire format (Nix's serialisation): integers are unsigned 64-bit little
endian; a string is its length, its bytes, and zero padding to 8 bytes; a
list of strings is its length, then each string.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence

from ..nix.versions import PathInfo

SERVE_MAGIC_1 = 0x390C9DEB  # client -> server
SERVE_MAGIC_2 = 0x5452EECB  # server -> client
# 2.5: the first version with AddToStoreNar. The server speaks the lower of
# the two versions; nothing this stream sends changed after 2.5.
CLIENT_VERSION = 0x205
ADD_TO_STORE_NAR = 9
EXPORT_MAGIC = 0x4558494E  # `nix-store --export`'s trailer after each NAR
SPLICE_CHUNK = 1 << 20


class StreamError(Exception):
    """The export did not read as expected (it ended early, or its shape is not an export's)."""


def u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def string(s: str | bytes) -> bytes:
    data = s.encode() if isinstance(s, str) else s
    return u64(len(data)) + data + b"\0" * (-len(data) % 8)


def strings(items: Sequence[str]) -> bytes:
    return u64(len(items)) + b"".join(string(i) for i in items)


def greeting() -> bytes:
    return u64(SERVE_MAGIC_1) + u64(CLIENT_VERSION)


def add_to_store_nar(info: PathInfo) -> bytes:
    """The AddToStoreNar command for info's path; its NAR (nar_size bytes) follows."""
    return (u64(ADD_TO_STORE_NAR) + string(info.path) + string(info.deriver) + string(info.nar_hash)
            + strings(sorted(info.references)) + u64(info.registration_time) + u64(info.nar_size)
            + u64(1 if info.ultimate else 0) + strings(sorted(info.signatures)) + string(info.ca))


def replies_done(data: bytes, paths: int) -> int:
    """How many paths the server's replies say it added (raises StreamError if they are not the server's)."""
    if len(data) < 16 or struct.unpack_from("<Q", data)[0] != SERVE_MAGIC_2:
        if data:
            raise StreamError(f"the target's `nix-store --serve` answered {data[:16]!r}, not its greeting")
        return 0
    done = 0
    for offset in range(16, min(len(data), 16 + 8 * paths) - 7, 8):
        if struct.unpack_from("<Q", data, offset)[0] != 1:
            raise StreamError("the target's `nix-store --serve` answered something other than success")
        done += 1
    return done


class _Reader:
    """Exact reads from a blocking pipe."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def exactly(self, n: int) -> bytes:
        parts: list[bytes] = []
        while n:
            chunk = os.read(self.fd, n)
            if not chunk:
                raise StreamError("the export ended early")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.exactly(8))[0])

    def string(self) -> str:
        n = self.u64()
        return self.exactly(n + (-n % 8))[:n].decode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _splice_exactly(src: int, dst: int, n: int, sent: Callable[[int], None]) -> None:
    while n:
        moved = os.splice(src, dst, min(n, SPLICE_CHUNK))
        if moved == 0:
            raise StreamError("the export ended inside a NAR")
        n -= moved
        sent(moved)


def relay_export(export_fd: int, out_fd: int, infos: Sequence[PathInfo], preamble: bytes,
                 sent: Callable[[int], None]) -> None:
    """Rewrite the export on export_fd (of exactly infos, in order) as a serve stream on out_fd.

    Blocking: it runs in a thread. preamble goes first (the elevation's
    stdin, see process.Elevator). sent(n) is called for every n NAR bytes
    moved. out_fd is not closed here.
    """
    export = _Reader(export_fd)
    _write_all(out_fd, preamble + greeting())
    for info in infos:
        if export.u64() != 1:
            raise StreamError(f"the export has no entry for {info.path}")
        _write_all(out_fd, add_to_store_nar(info))
        _splice_exactly(export_fd, out_fd, info.nar_size, sent)
        if export.u64() != EXPORT_MAGIC:
            raise StreamError(f"the export of {info.path} is not {info.nar_size} bytes long, as its narSize says")
        path = export.string()
        if path != info.path:
            raise StreamError(f"the export has {path} where {info.path} was expected")
        for _ in range(export.u64()):  # references: sent above, from the path's registration
            export.string()
        export.string()  # deriver, likewise
        export.u64()  # no legacy signature
    if export.u64() != 0:
        raise StreamError("the export has more paths than were asked for")
