"""One `nix build` for the machines of one flake that are built at the same moment.

Pulumi runs a fleet's creates and updates in parallel, so requests that
arrive within WINDOW of the first for the same flake, Nix installation and
options share one `nix build` (which builds their common dependencies once
and uses every core). When a batch fails, each of its requests is built
again alone, so an error lands on the machine it belongs to.

(Evaluation is not batched: see evaluation.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..errors import NixError
from .cli import FlakeRef, Nix

# Seconds a build waits for the rest of its batch. The engine dispatches the
# creates of a stack one after another (each after its Check and Diff), and
# the wait hides behind reading the host, which create does meanwhile.
WINDOW = 1.0
MAX_CONCURRENT = 2  # `nix build` processes at once (each uses every core itself)


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


OutPath = Callable[[Nix, FlakeRef], Awaitable[str]]


class FleetBuilds:
    """Builds for many machines, one `nix build` per flake and moment."""

    def __init__(self, out_path: OutPath, window: float = WINDOW, max_concurrent: int = MAX_CONCURRENT) -> None:
        self._out_path = out_path
        self._batches = _Batcher(self._build_many, lambda nix, ref: nix.build(ref), window, max_concurrent)

    async def _build_many(self, nix: Nix, flake: str, attrs: list[str]) -> dict[str, str]:
        # Which result is whose: each attribute's evaluated out path (Check
        # already asked for it, so this is a lookup). One that did not come
        # out of the build is built again alone by the batcher.
        built = await nix.build_outputs(flake, attrs)
        results = {}
        for attr in attrs:
            path = await self._out_path(nix, FlakeRef(flake, attr))
            if path in built:
                results[attr] = path
        return results

    async def build(self, nix: Nix, ref: FlakeRef) -> str:
        """Build ref and return its output path, in one `nix build` with the other requests of this moment."""
        return await self._batches.get(nix, ref)
