"""Push once through a Nix binary cache: upload a closure once, let every target substitute it.

Without a cache the deployer sends each machine its own copy of the closure:
N machines of one system cost N closures of upload. With `binaryCache` the
deployer copies the closure once to a cache store (`nix copy --to`, signed
with the cache's key), and each target fetches it from there with its own
Nix (`nix-store --realise` with that cache as its only substituter and that
key as its only trusted key). Whatever the target could not substitute is
then pushed directly, as without a cache.

Uploads are shared by everything one provider process deploys: concurrent
deployments of one store path to one cache wait for a single `nix copy`, and
uploads to one cache run one at a time, so a dependency that several systems
share is written once (`nix copy` skips what the cache already has).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import EngineError
from ..models import BinaryCache
from ..nix.cli import Nix
from ..nix.versions import SIGNING_KEY_STORE_SETTING, error_summary, substituter_options
from ..transport.process import Target


@dataclass(frozen=True)
class CacheUpload:
    """What making one store path available in a cache took."""

    store_path: str
    paths: int  # uploaded now (0: the cache had them all)
    bytes: int  # NAR bytes of those paths, before the cache's compression
    seconds: float
    shared: bool = False  # another deployment of this process uploaded it


def _with_setting(url: str, name: str, value: str) -> str:
    """url with one more store setting in its query (`?name=value` or `&name=value`)."""
    return f"{url}{'&' if '?' in url else '?'}{name}={value}"


class CacheUploads:
    """The uploads of one provider process, keyed by (cache, store path)."""

    def __init__(self) -> None:
        self._uploads: dict[tuple[str, str], asyncio.Future[CacheUpload]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def upload(self, nix: Nix, cache: BinaryCache, store_path: str) -> CacheUpload:
        """Make store_path's closure available in the cache: upload it, or wait for the upload under way."""
        key = (cache.write_url, store_path)
        known = self._uploads.get(key)
        if known is not None:
            first = await asyncio.shield(known)
            return CacheUpload(store_path, 0, 0, 0.0, shared=first.paths > 0 or first.shared)
        future: asyncio.Future[CacheUpload] = asyncio.get_running_loop().create_future()
        self._uploads[key] = future
        try:
            async with self._locks.setdefault(cache.write_url, asyncio.Lock()):
                result = await _copy(nix, cache, store_path)
        except BaseException as e:
            # Those waiting learn why; the next deployment tries again.
            del self._uploads[key]
            future.set_exception(e if isinstance(e, Exception) else EngineError("the upload was cancelled"))
            future.exception()  # retrieved: nobody else may be waiting
            raise
        future.set_result(result)
        return result


async def _copy(nix: Nix, cache: BinaryCache, store_path: str) -> CacheUpload:
    started = time.monotonic()
    what = f"uploading {store_path} to the binary cache {cache.write_url}"
    key = cache.signing_key
    if key is None and cache.signing_key_file is not None:
        try:
            key = Path(cache.signing_key_file).read_text().strip()
        except OSError as e:
            raise EngineError(f"{what}: cannot read the signing key file {cache.signing_key_file}: "
                              f"{e.strerror or e}") from e
    if key is None:
        copied = await nix.copy_to(cache.write_url, [store_path], what=what)
    else:
        # Nix reads the key from a file named in the store URL: a private
        # file of ours, so neither the key nor a path with characters a URL
        # would mangle ever reaches the command line.
        with tempfile.TemporaryDirectory(prefix="pulumi-nixos-cache-") as tmp:
            key_file = os.path.join(tmp, "signing-key")
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(key)
            url = _with_setting(cache.write_url, SIGNING_KEY_STORE_SETTING, key_file)
            copied = await nix.copy_to(url, [store_path], what=what)
    sizes = {p.path: p.nar_size for p in await nix.closure(store_path)} if copied else {}
    return CacheUpload(store_path, len(copied), sum(sizes.get(p, 0) for p in copied), time.monotonic() - started)


async def substitute(target: Target, store_path: str, cache: BinaryCache, timeout: float = 1800) -> str | None:
    """Let the target fetch store_path's closure from the cache; None when it did, else why not."""
    argv = ["nix-store", "--realise", store_path, *substituter_options(cache.url, cache.public_key)]
    res = await target.run(argv, check=False, timeout=timeout)
    if res.exit_status == 0:
        return None
    return error_summary(res.stderr)
