"""What NixosMachine and NixProfile share: context, diffing, failures."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..engine.batch import FleetNix
from ..engine.binary_cache import CacheUploads
from ..engine.errors import EngineError
from ..engine.models import BinaryCache, Remote
from ..engine.nix import Nix, parse_flake_ref
from .errors import describe
from .inputs import Failures, nix_options, to_remote
from .properties import UNKNOWN, contains_unknown, reveal
from .typed_inputs import DeploySettings

LogFn = Callable[[str, str, str, bool], None]  # (severity, message, urn, ephemeral)


@dataclass
class Context:
    """Provider-wide state handed to resources."""

    log: LogFn
    project_dir: str | None = None
    nix_command: list[str] = field(default_factory=lambda: ["nix"])
    nixos_anywhere_command: list[str] = field(default_factory=lambda: ["nixos-anywhere"])
    default_private_key: str | None = None
    default_user: str | None = None
    ssh_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    # Closure copies at once, across machines (maxParallelTransfers).
    transfer_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(4))
    flake_cache: dict[tuple[str, str, bool], str] = field(default_factory=dict)
    # Machines of one flake share one evaluation (Check) and one build (up).
    fleet: FleetNix = field(default_factory=FleetNix)
    # The provider's `binaryCache` (machines may set their own), and the
    # uploads of this process: each closure goes to a cache once.
    binary_cache: BinaryCache | None = None
    cache_uploads: CacheUploads = field(default_factory=CacheUploads)

    def nix(self, options: list[tuple[str, str]] | None = None) -> Nix:
        return Nix(self.nix_command, options or [])

    def status(self, urn: str, message: str) -> None:
        self.log("INFO", message, urn, True)

    def info(self, urn: str, message: str) -> None:
        self.log("INFO", message, urn, False)

    def warn(self, urn: str, message: str) -> None:
        self.log("WARNING", message, urn, False)

    async def resolve_flake(self, ref: str, nix: Nix, *, nixos: bool) -> str:
        """Evaluate a flake reference to its output path (no build), cached per process."""
        parsed = parse_flake_ref(ref, self.project_dir, nixos=nixos)
        key = (str(parsed), " ".join(nix.options), nixos)
        if key not in self.flake_cache:
            self.flake_cache[key] = await self.fleet.out_path(nix, parsed)
        return self.flake_cache[key]


class DeployedResource:
    """What both resource kinds need: the provider context, nix with the resource's options, the Remote."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _nix(self, props: dict[str, Any]) -> Nix:
        return self.ctx.nix(nix_options(props.get("nixOptions")))

    def _deploy_nix(self, settings: DeploySettings) -> Nix:
        return self.ctx.nix(list(settings.nix_options))

    def _remote(self, props: dict[str, Any], host_key: str | None = None) -> Remote:
        return self._remote_of(props["connection"], host_key)

    def _remote_of(self, connection: dict[str, Any], host_key: str | None = None) -> Remote:
        return to_remote(connection, host_key=host_key, default_private_key=self.ctx.default_private_key,
                         default_user=self.ctx.default_user)

    async def _resolve_flake(self, news: dict[str, Any], *, nixos: bool) -> Any:
        """Check: the flake's output path, or UNKNOWN while the flake (or its options) is not known yet."""
        if contains_unknown(news.get("flake")) or contains_unknown(news.get("nixOptions")):
            return UNKNOWN
        try:
            return await self.ctx.resolve_flake(str(reveal(news["flake"])), self._nix(news), nixos=nixos)
        except (EngineError, ValueError) as e:
            f = Failures()
            f.add("flake", describe(e))
            raise CheckFailed(f) from e


class CheckFailed(Exception):
    def __init__(self, failures: Failures) -> None:
        super().__init__("; ".join(f"{p}: {r}" for p, r in failures.items))
        self.failures = failures


class PartialFailure(Exception):
    """The operation failed, but this is what the machine is now (ErrorResourceInitFailed)."""

    def __init__(self, message: str, resource_id: str, outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
        super().__init__(message)
        self.resource_id = resource_id
        self.outputs = outputs
        self.inputs = inputs


@dataclass
class DiffResult:
    replaces: list[str] = field(default_factory=list)
    detailed: dict[str, str] = field(default_factory=dict)  # property path -> kind (UPDATE, ADD, ...)
    delete_before_replace: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.detailed)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def same(a: Any, b: Any) -> bool:
    return bool(reveal(a) == reveal(b))


def diff_inputs(olds: dict[str, Any], news: dict[str, Any], keys: list[str], replace_paths: list[tuple[str, ...]],
                deploy_keys: list[str]) -> DiffResult:
    """Compare inputs key by key; keys whose nested path is in replace_paths force replacement.

    A setting that appears where the old state had none (e.g. credentials or
    `flake` after `pulumi import`, which only knows host and system) is not a
    change unless it changes what is deployed: the engine records the new
    inputs anyway, and nothing on the machine would differ.
    """
    result = DiffResult()
    for key in keys:
        old, new = olds.get(key), news.get(key)
        if contains_unknown(new) and new is not None:
            result.detailed[key] = "UPDATE"
        elif old is None and new is not None:
            if key in deploy_keys:
                result.detailed[key] = "ADD"
        elif old is not None and new is None:
            result.detailed[key] = "DELETE"
        elif not same(old, new):
            if isinstance(old, dict) and isinstance(new, dict):
                for sub in sorted(set(old) | set(new)):
                    if old.get(sub) is None and new.get(sub) is not None:
                        continue
                    if not same(old.get(sub), new.get(sub)):
                        result.detailed[f"{key}.{sub}"] = "UPDATE"
            else:
                result.detailed[key] = "UPDATE"
    for path in replace_paths:
        old, new = _get(olds, path), _get(news, path)
        if new is UNKNOWN or (not same(old, new) and not (old is None and new is None)):
            name = ".".join(path)
            result.replaces.append(name)
            result.detailed[name] = "UPDATE_REPLACE"
    return result


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d
