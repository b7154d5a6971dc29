"""Secret files on a target: written over SSH, never through the Nix store.

A secret file is content (a key for agenix or sops-nix, a credential) placed
at a path with an owner, group and mode, either before the new system is
activated (its activation needs the file) or after a successful switch.

Each file is written atomically by a constant shell script run as root: a
temporary file is made in the target's directory with mode 0600 (mktemp),
filled from stdin, given its owner and mode, and renamed over the target.
A reader sees the old file or the new one, never part of one, and the file
is never readable by anyone but root and its owner, not even for an instant.
The content travels only on stdin: argv (which `ps` shows and the runner
logs) carries the path, owner, group and mode.

State records a `RecordedFile` per file: its settings and an HMAC-SHA256 of
its content under a per-machine key that state keeps as a secret. A plain
SHA-256 of a short secret (a PIN, a word) could be found by hashing guesses;
the HMAC cannot be checked without the key, and the key is encrypted like
every other Pulumi secret.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal

from ..errors import EngineError
from ..lazy import lazy_module
from ..models import Profile, Remote

if TYPE_CHECKING:
    from ..transport import process, ssh
    from ..transport.process import Target
else:
    # SSH is imported when a file is first written: Check and Diff need only the models.
    process = lazy_module("nixos_provider.engine.transport.process")
    ssh = lazy_module("nixos_provider.engine.transport.ssh")

Stage = Literal["before-activation", "after-activation"]
STAGES: tuple[Stage, ...] = ("before-activation", "after-activation")

# Positional arguments: path owner group mode; the content is stdin.
# mktemp makes the temporary file 0600 and owned by root, so it is private
# from its first byte; chown and chmod happen before the rename publishes it.
# Missing parent directories are made 0755: the names are not secret, the
# files' own modes guard their contents.
WRITE_SCRIPT = r"""set -eu
path=$1 owner=$2 group=$3 mode=$4
dir=$(dirname -- "$path")
mkdir -p -m 0755 -- "$dir"
umask 077
tmp=$(mktemp -- "$dir/.${path##*/}.XXXXXXXX")
trap 'rm -f -- "$tmp"' EXIT
cat > "$tmp"
chown -- "$owner:$group" "$tmp"
chmod -- "$mode" "$tmp"
sync -- "$tmp" 2>/dev/null || true
mv -f -T -- "$tmp" "$path"
trap - EXIT
"""

# Positional arguments: the recorded paths. For each, one line: `missing`, or
# `file UID USER GID GROUP MODE` followed by a line with its content in base64
# (the content goes to the deployer only, over the same SSH channel it was
# written through, and is turned into the HMAC there). A symlink or anything
# but a regular file is not what the deployer wrote: `missing`.
READ_SCRIPT = r"""set -u
for path do
  if [ -f "$path" ] && [ ! -L "$path" ] && [ -r "$path" ]; then
    printf 'file %s\n' "$(stat -c '%u %U %g %G %a' -- "$path")"
    base64 -w 0 -- "$path" || exit 1
    echo
  else
    echo missing
  fi
done
"""


@dataclass(frozen=True, kw_only=True)
class FileSettings:
    """Where a secret file goes and how: what SecretFile and RecordedFile share."""

    path: str
    owner: str = "root"
    group: str = "root"
    mode: str = "0400"
    stage: Stage = "before-activation"
    keep_on_destroy: bool = False

    def settings(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(FileSettings)}


@dataclass(frozen=True, kw_only=True)
class SecretFile(FileSettings):
    """One file to place on the target, content included."""

    content: bytes = field(repr=False)

    def record(self, key: bytes) -> RecordedFile:
        return RecordedFile(content_hash=content_hash(key, self.content), **self.settings())  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class RecordedFile(FileSettings):
    """What state keeps about a written file: everything but the content, which is an HMAC."""

    content_hash: str

    def placed_like(self, other: RecordedFile) -> bool:
        """The same file on the host: content, owner, group and mode (stage and keep are the deployer's)."""
        return (self.content_hash, self.owner, self.group, self.mode) == (
            other.content_hash, other.owner, other.group, other.mode)


@dataclass(frozen=True)
class SecretFilePlan:
    """What one `pulumi up` does: files to write, per stage, and paths to remove after the switch."""

    before: tuple[SecretFile, ...] = ()
    after: tuple[SecretFile, ...] = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.before or self.after or self.remove)

    def changed_paths(self) -> list[str]:
        return [f.path for f in (*self.before, *self.after)]


def new_key() -> str:
    """A fresh per-machine HMAC key, as state keeps it (base64)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def content_hash(key: bytes, content: bytes) -> str:
    return "hmac-sha256:" + hmac.new(key, content, hashlib.sha256).hexdigest()


def plan(recorded: Sequence[RecordedFile], wanted: Sequence[SecretFile], key: bytes) -> SecretFilePlan:
    """Compare what state says is on the host with what the program wants."""
    old = {r.path: r for r in recorded}
    changed = [f for f in wanted if f.path not in old or not old[f.path].placed_like(f.record(key))]
    wanted_paths = {f.path for f in wanted}
    return SecretFilePlan(
        before=tuple(f for f in changed if f.stage == "before-activation"),
        after=tuple(f for f in changed if f.stage == "after-activation"),
        remove=tuple(r.path for r in recorded if r.path not in wanted_paths),
    )


def root_target(target: Target) -> Target:
    """Secret files are written as root, through the same sudo elevation a deployment uses."""
    return target.as_user("root")


class SecretFileError(EngineError):
    """Writing or removing a secret file failed; `written` lists the files placed before that."""

    def __init__(self, message: str, written: tuple[SecretFile, ...], removed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.written = written
        self.removed = removed


async def write_files(target: Target, files: Sequence[SecretFile]) -> None:
    """Write each file atomically, in order; raise SecretFileError naming the file that failed."""
    root = root_target(target)
    for i, f in enumerate(files):
        res = await root.run(["sh", "-c", WRITE_SCRIPT, "sh", f.path, f.owner, f.group, f.mode],
                             input=f.content, check=False)
        if res.exit_status != 0:
            detail = res.stderr.strip().splitlines()[-1:] or [f"exit {res.exit_status}"]
            raise SecretFileError(f"writing secret file {f.path} on {target.target} failed: {detail[0]}",
                                  tuple(files[:i]))


async def remove_files(target: Target, paths: Sequence[str]) -> None:
    """Remove files (a missing one is fine: it is gone either way)."""
    if not paths:
        return
    res = await root_target(target).run(["rm", "-f", "--", *paths], check=False)
    if res.exit_status != 0:
        detail = res.stderr.strip().splitlines()[-1:] or [f"exit {res.exit_status}"]
        raise SecretFileError(f"removing secret files on {target.target} failed: {detail[0]}", ())


@contextlib.asynccontextmanager
async def _on(remote: Remote) -> AsyncIterator[Target]:
    """A new connection to remote, as its SSH user, closed afterwards: each file step is one."""
    conn = await ssh.connect(remote)
    try:
        yield process.Target.for_profile(conn, Profile())
    finally:
        await conn.close()


async def apply(remote: Remote, files: Sequence[SecretFile], remove: Sequence[str] = ()) -> None:
    """On a new connection: write files, then remove paths."""
    async with _on(remote) as target:
        await write_files(target, files)
        try:
            await remove_files(target, remove)
        except SecretFileError as e:
            raise SecretFileError(str(e), tuple(files)) from e


class Placement:
    """Carries out a plan on one host and keeps track of what is there, for state.

    `records()` is always the truth as far as the deployer knows it: files
    written are recorded with their new hash, files removed are dropped, and
    after a failure the rest keep their old records, so the next `pulumi up`
    writes (or removes) them again.
    """

    def __init__(self, remote: Remote, recorded: Sequence[RecordedFile], wanted: Sequence[SecretFile],
                 key: bytes) -> None:
        self.remote = remote
        self.key = key
        self.plan = plan(recorded, wanted, key)
        self._placed = {r.path: r for r in recorded}
        # Settings the host does not see (stage, keepOnDestroy) take effect without a write.
        for f in wanted:
            old = self._placed.get(f.path)
            if old is not None and old.placed_like(f.record(key)):
                self._placed[f.path] = f.record(key)

    def records(self) -> tuple[RecordedFile, ...]:
        return tuple(self._placed.values())

    async def before_activation(self) -> None:
        await self._apply(self.plan.before, ())

    async def after_activation(self) -> None:
        await self._apply(self.plan.after, self.plan.remove)

    async def all_stages(self) -> None:
        """Everything at once: no activation happens in between (a content-only change, an install)."""
        await self._apply((*self.plan.before, *self.plan.after), self.plan.remove)

    async def _apply(self, files: Sequence[SecretFile], remove: Sequence[str]) -> None:
        if not files and not remove:
            return
        try:
            await apply(self.remote, files, remove)
        except SecretFileError as e:
            self._note(e.written, ())
            raise
        self._note(tuple(files), tuple(remove))

    def _note(self, written: tuple[SecretFile, ...], removed: tuple[str, ...]) -> None:
        for f in written:
            self._placed[f.path] = f.record(self.key)
        for path in removed:
            self._placed.pop(path, None)


async def remove_for_destroy(remote: Remote, recorded: Sequence[RecordedFile]) -> tuple[str, ...]:
    """Destroy: remove every recorded file except those marked keepOnDestroy; returns the paths kept."""
    await apply(remote, (), [r.path for r in recorded if not r.keep_on_destroy])
    return tuple(r.path for r in recorded if r.keep_on_destroy)


@dataclass(frozen=True)
class FoundFile:
    """What `pulumi refresh` finds at a recorded path: the file as the host has it now, or nothing."""

    recorded: RecordedFile
    now: RecordedFile | None  # None: missing (or not a regular file)

    def drift(self) -> str | None:
        """How the host's file differs from the record, in words; None when it does not."""
        if self.now is None:
            return "missing"
        was, now = self.recorded, self.now
        changes = [what for what, a, b in (("content", was.content_hash, now.content_hash), ("owner", was.owner, now.owner),
                                           ("group", was.group, now.group), ("mode", was.mode, now.mode)) if a != b]
        return ", ".join(f"{c} changed" for c in changes) or None


def _found(recorded: RecordedFile, head: str, body: str, key: bytes) -> FoundFile:
    uid, user, gid, group, mode = head.split()[1:6]
    # The record keeps the spelling the program used (a name or an id, "0400"
    # or "400") when the host's file matches it.
    owner = recorded.owner if recorded.owner in (uid, user) else user
    group_ = recorded.group if recorded.group in (gid, group) else group
    mode_ = recorded.mode if int(recorded.mode, 8) == int(mode, 8) else f"{int(mode, 8):04o}"
    content = base64.b64decode(body, validate=True)
    now = RecordedFile(content_hash=content_hash(key, content), owner=owner, group=group_, mode=mode_,
                       stage=recorded.stage, keep_on_destroy=recorded.keep_on_destroy, path=recorded.path)
    return FoundFile(recorded, now)


async def read_placed(remote: Remote, recorded: Sequence[RecordedFile], key: bytes) -> tuple[FoundFile, ...]:
    """Refresh: each recorded file as the host has it, compared by the same HMAC state keeps."""
    if not recorded:
        return ()
    async with _on(remote) as target:
        res = await root_target(target).run(["sh", "-c", READ_SCRIPT, "sh", *(r.path for r in recorded)],
                                            check=False)
    try:
        return parse_found(recorded, res.stdout, key)
    except ValueError as e:
        # Never the output itself: it carries file contents.
        detail = res.stderr.strip().splitlines()[-1:] or [f"exit {res.exit_status}"]
        raise EngineError(f"reading the secret files on {remote.target} failed: {detail[0]}") from e


def parse_found(recorded: Sequence[RecordedFile], output: str, key: bytes) -> tuple[FoundFile, ...]:
    """READ_SCRIPT's output for `recorded`, in order; ValueError (without the output) when it is not that."""
    lines = output.splitlines()
    found: list[FoundFile] = []
    try:
        for r in recorded:
            head = lines.pop(0)
            if head == "missing":
                found.append(FoundFile(r, None))
                continue
            if not head.startswith("file ") or len(head.split()) != 6 or not lines:
                raise ValueError("not a file line")
            found.append(_found(r, head, lines.pop(0), key))
    except (IndexError, ValueError, binascii.Error) as e:
        raise ValueError("the output is not one entry per recorded file") from e
    return tuple(found)
