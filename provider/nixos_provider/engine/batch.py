"""One Nix process for many machines of one flake.

Evaluating each machine in its own `nix eval` costs one full evaluation of the
flake per machine (with nixpkgs: seconds and about a GiB each). colmena and
deploy-rs evaluate a fleet in one process, where the shared parts (nixpkgs,
common modules) are evaluated once. Here:

- Evaluation (Check). Pulumi's engine sends Check for one resource at a time
  and waits for the answer, so requests never arrive together. The first
  request for `nixosConfigurations.<name>.<rest>` of a flake is evaluated
  alone (a one-machine stack pays nothing more), and at the same moment the
  same attribute of the flake's other configurations is evaluated in the
  background, in one process per chunk, at low CPU priority. The next Checks
  find their answer there. At most PREFETCH_LIMIT configurations are
  evaluated ahead, and at most MAX_CONCURRENT Nix processes run at once, so
  memory stays bounded.
- Builds (Create/Update). Pulumi runs these in parallel, so requests that
  arrive within WINDOW of the first for the same flake, Nix installation and
  options share one `nix build`.

When a batch fails, each of its requests is retried alone, so an error lands
on the machine it belongs to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .errors import NixError
from .nix import FlakeRef, Nix

# Seconds a build waits for the rest of its batch. The engine dispatches the
# creates of a stack one after another (each after its Check and Diff), and
# the wait hides behind reading the host, which create does meanwhile.
WINDOW = 1.0
MAX_CONCURRENT = 2  # Nix processes at once: evaluation memory stays bounded
PREFETCH_LIMIT = 256  # configurations evaluated ahead of their Check
PREFETCH_CHUNK = 64  # configurations per background Nix process


@dataclass
class _Batch:
    nix: Nix
    flake: str
    attrs: dict[str, list[asyncio.Future[str]]] = field(default_factory=dict)


BatchFn = Callable[[Nix, str, list[str]], Awaitable[dict[str, str]]]
SingleFn = Callable[[Nix, FlakeRef], Awaitable[str]]


class _Batcher:
    def __init__(self, many: BatchFn, one: SingleFn, window: float, max_concurrent: int) -> None:
        self._many = many
        self._one = one
        self._window = window
        self._slots = asyncio.Semaphore(max_concurrent)
        self._open: dict[tuple[tuple[str, ...], tuple[str, ...], str], _Batch] = {}

    async def get(self, nix: Nix, ref: FlakeRef) -> str:
        key = (tuple(nix.command), tuple(nix.options), ref.flake)
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(nix, ref.flake)
            asyncio.get_running_loop().call_later(self._window, self._close, key)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        batch.attrs.setdefault(ref.attr, []).append(future)
        return await future

    def _close(self, key: tuple[tuple[str, ...], tuple[str, ...], str]) -> None:
        batch = self._open.pop(key)
        task = asyncio.ensure_future(self._run_all(batch))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _run_all(self, batch: _Batch) -> None:
        try:
            await self._run(batch)
        finally:
            # Whatever went wrong, nobody waits forever.
            for futures in batch.attrs.values():
                self._fail(futures, NixError(f"building from {batch.flake} stopped unexpectedly"))

    async def _run(self, batch: _Batch) -> None:
        attrs = list(batch.attrs)
        async with self._slots:
            try:
                if len(attrs) == 1:
                    results = {attrs[0]: await self._one(batch.nix, FlakeRef(batch.flake, attrs[0]))}
                else:
                    results = await self._many(batch.nix, batch.flake, attrs)
            except (NixError, ValueError) as e:
                if len(attrs) == 1:
                    self._fail(batch.attrs[attrs[0]], e)
                    return
                results = {}
        for attr in attrs:
            if attr in results:
                self._resolve(batch.attrs[attr], results[attr])
                continue
            # The batch failed: find out which machine's configuration did, alone.
            async with self._slots:
                try:
                    self._resolve(batch.attrs[attr], await self._one(batch.nix, FlakeRef(batch.flake, attr)))
                except (NixError, ValueError) as e:
                    self._fail(batch.attrs[attr], e)

    @staticmethod
    def _resolve(futures: list[asyncio.Future[str]], value: str) -> None:
        for f in futures:
            if not f.done():
                f.set_result(value)

    @staticmethod
    def _fail(futures: list[asyncio.Future[str]], error: Exception) -> None:
        for f in futures:
            if not f.done():
                f.set_exception(error)


Key = tuple[tuple[str, ...], tuple[str, ...], str]


class _Evaluations:
    """Out paths of flake attributes, answered alone or from a background evaluation of the siblings."""

    def __init__(self, max_concurrent: int, prefetch_limit: int, chunk: int) -> None:
        self._slots = asyncio.Semaphore(max_concurrent)
        self._limit = prefetch_limit
        self._chunk = chunk
        self._known: dict[tuple[Key, str], asyncio.Future[str]] = {}
        # (flake key, attribute suffix) -> set once the siblings are listed (and their futures exist)
        self._listed: dict[tuple[Key, str], asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, nix: Nix, ref: FlakeRef) -> str:
        key: Key = (tuple(nix.command), tuple(nix.options), ref.flake)
        configuration = ref.configuration
        listed = self._listed.get((key, configuration[1])) if configuration else None
        if listed is not None:
            await listed.wait()  # listing is cheap; then this attribute's answer is on its way
        known = self._known.get((key, ref.attr))
        if known is not None:
            try:
                return await asyncio.shield(known)
            except (NixError, ValueError):
                pass  # a background batch failed; evaluate alone for this machine's own error
        self._prefetch(nix, key, ref)
        future = asyncio.get_running_loop().create_future()
        self._known[(key, ref.attr)] = future
        try:
            async with self._slots:
                path = await nix.eval_out_path(ref)
        except BaseException as e:
            del self._known[(key, ref.attr)]
            if not future.done():
                future.set_exception(e if isinstance(e, Exception) else NixError("evaluation cancelled"))
                future.exception()  # retrieved: nobody else may be waiting
            raise
        future.set_result(path)
        return path

    def _prefetch(self, nix: Nix, key: Key, ref: FlakeRef) -> None:
        configuration = ref.configuration
        if not configuration or (key, configuration[1]) in self._listed:
            return
        listed = self._listed[(key, configuration[1])] = asyncio.Event()
        task = asyncio.ensure_future(self._evaluate_siblings(nix, key, ref, listed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _evaluate_siblings(self, nix: Nix, key: Key, ref: FlakeRef, listed: asyncio.Event) -> None:
        flake = ref.flake
        try:
            names = await nix.attr_names(flake, "nixosConfigurations")
        except (NixError, ValueError):
            return  # no list, no prefetch: every Check evaluates alone
        finally:
            listed.set()
        loop = asyncio.get_running_loop()
        attrs = []
        for other in names[: self._limit]:
            attr = ref.of_configuration(other).attr
            if attr != ref.attr and (key, attr) not in self._known:
                self._known[(key, attr)] = loop.create_future()
                attrs.append(attr)
        for i in range(0, len(attrs), self._chunk):
            chunk = attrs[i:i + self._chunk]
            try:
                async with self._slots:
                    paths = await nix.eval_out_paths(flake, chunk, background=True)
            except (NixError, ValueError, asyncio.CancelledError) as e:
                for attr in chunk:
                    _settle(self._known[(key, attr)], error=e if isinstance(e, Exception) else None)
                    del self._known[(key, attr)]  # the machine's own Check evaluates it alone
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for attr in chunk:
                _settle(self._known[(key, attr)], value=paths[attr])

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _settle(future: asyncio.Future[str], value: str | None = None, error: Exception | None = None) -> None:
    if future.done():
        return
    if value is not None:
        future.set_result(value)
    else:
        future.set_exception(error or NixError("evaluation cancelled"))
        future.exception()  # nobody may be waiting for it; do not warn


class FleetNix:
    """Out paths and builds for many machines, sharing Nix processes per flake."""

    def __init__(self, window: float = WINDOW, max_concurrent: int = MAX_CONCURRENT,
                 prefetch_limit: int = PREFETCH_LIMIT, chunk: int = PREFETCH_CHUNK) -> None:
        self.evaluations = _Evaluations(max_concurrent, prefetch_limit, chunk)
        self.builds = _Batcher(self._build_many, lambda nix, ref: nix.build(ref), window, max_concurrent)

    async def _build_many(self, nix: Nix, flake: str, attrs: list[str]) -> dict[str, str]:
        # Which result is whose: each attribute's evaluated out path (Check
        # already asked for it, so this is a lookup). One that did not come
        # out of the build is built again alone by the batcher.
        built = await nix.build_outputs(flake, attrs)
        results = {}
        for attr in attrs:
            path = await self.evaluations.get(nix, FlakeRef(flake, attr))
            if path in built:
                results[attr] = path
        return results

    async def out_path(self, nix: Nix, ref: FlakeRef) -> str:
        """Evaluate (not build) ref's output path; the flake's other configurations follow in the background."""
        return await self.evaluations.get(nix, ref)

    async def build(self, nix: Nix, ref: FlakeRef) -> str:
        """Build ref and return its output path, in one `nix build` with the other requests of this moment."""
        return await self.builds.get(nix, ref)

    def close(self) -> None:
        """Stop background evaluations (the provider is shutting down)."""
        self.evaluations.cancel()
