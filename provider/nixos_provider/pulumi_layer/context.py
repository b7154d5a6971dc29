"""The provider-wide context every resource is handed: configuration, limits, the evaluator and builds, logging."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..engine.lazy import lazy_module
from ..engine.lifecycle.models import Limits, Report
from ..engine.models import BinaryCache
from ..engine.nix.builds import FleetBuilds
from ..engine.nix.cli import Evaluation, FlakeRef, Nix, SourceRef
from ..engine.nix.evaluation import EvaluationStore, Evaluator
from .error_text import describe
from .provider_config import ProviderConfig

if TYPE_CHECKING:
    from ..engine.lifecycle import engine as lifecycle_engine
    from ..engine.lifecycle.engine import Engine
else:
    lifecycle_engine = lazy_module("nixos_provider.engine.lifecycle.engine")

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
    # SSH sessions and closure copies at once, across machines (maxParallelSsh, maxParallelTransfers), and the
    # binary cache uploads of this process: each closure goes to a cache once.
    limits: Limits = field(default_factory=Limits)
    # The engine's operations; made on first use (it imports SSH and the deployment code), unless given (a test
    # gives a fake).
    given_engine: Engine | None = None
    # Evaluations (Check) from a bounded pool, ahead of the stack's Checks and kept between runs.
    evaluator: Evaluator = field(default_factory=lambda: Evaluator(EvaluationStore.default()))
    # Machines of one flake built at one moment share one `nix build` (up).
    builds: FleetBuilds = field(init=False)
    # The provider's `binaryCache` (machines may set their own).
    binary_cache: BinaryCache | None = None
    # Where each resource this process created lives, by URN: (host key, profile path). A replacement is created
    # before the old resource is deleted; when both reach one machine under two names, the delete must leave
    # what the replacement deployed.
    created_on: dict[str, tuple[str, str]] = field(default_factory=dict)
    _last_status: dict[str, str] = field(default_factory=dict, repr=False)  # by URN

    def replaced_in_place(self, urn: str, host_key: str | None, profile_path: str) -> bool:
        """Whether the replacement of urn, created by this process, manages this very profile."""
        return host_key is not None and self.created_on.get(urn) == (host_key, profile_path)

    def configure(self, config: ProviderConfig) -> None:
        """The provider's configuration (Configure): commands, defaults, the shared cache, the limits it sets."""
        self.nix_command = list(config.nix_command)
        self.nixos_anywhere_command = list(config.nixos_anywhere_command)
        self.default_private_key = config.default_private_key
        self.default_user = config.default_user
        self.binary_cache = config.binary_cache
        if config.max_parallel_ssh:
            self.limits.ssh_slots = asyncio.Semaphore(config.max_parallel_ssh)
        if config.max_parallel_transfers:
            self.limits.transfer_slots = asyncio.Semaphore(config.max_parallel_transfers)
        self.evaluator.set_workers(config.max_parallel_evaluations)

    def __post_init__(self) -> None:
        self.builds = FleetBuilds(self._out_path)

    async def _out_path(self, nix: Nix, ref: FlakeRef) -> str:
        return (await self.evaluator.evaluate(nix, ref)).out_path

    @property
    def engine(self) -> Engine:
        if self.given_engine is None:
            self.given_engine = lifecycle_engine.Engine(self.limits)
        return self.given_engine

    def report(self, urn: str) -> Report:
        """Where an operation on urn reports: its lines under the resource, errors naming the properties."""
        return Report(status=lambda s: self.status(urn, s), info=lambda s: self.info(urn, s),
                      warn=lambda s: self.warn(urn, s), describe=describe)

    def nix(self, options: list[tuple[str, str]] | None = None) -> Nix:
        return Nix(self.nix_command, options or [])

    def status(self, urn: str, message: str) -> None:
        """An ephemeral progress line; the same line twice in a row for a resource is shown once (a push reports
        100% on its last chunk, and again when the target has taken every path)."""
        if self._last_status.get(urn) == message:
            return
        self._last_status[urn] = message
        self.log("INFO", message, urn, True)

    def info(self, urn: str, message: str) -> None:
        self.log("INFO", message, urn, False)

    def warn(self, urn: str, message: str) -> None:
        self.log("WARNING", message, urn, False)

    async def evaluate(self, ref: SourceRef, nix: Nix, *, urn: str | None = None,
                       remember: bool = True) -> Evaluation:
        """Evaluate a flake reference or a system without a flake (no build): its output path and derivation.

        urn: the resource asking; its stack's other attributes are evaluated ahead, and this one is
        remembered for the stack's next run unless remember is False (a secret source or option).
        """
        plan = stack_of(urn) if urn and remember else None
        return await self.evaluator.evaluate(nix, ref, plan=plan)


def stack_of(urn: str) -> str:
    """`urn:pulumi:<stack>::<project>::<type>::<name>` -> `<project>/<stack>`: the plan whose evaluations go ahead."""
    parts = urn.split("::")
    stack = parts[0].rsplit(":", 1)[-1] if parts else ""
    project = parts[1] if len(parts) > 1 else ""
    return f"{project}/{stack}"
