"""What every resource of one process shares: the settings the provider was configured with, the limits, the
evaluator and the fleet's builds, the engine, and where each resource it created lives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..declaration.checks import CheckFailed, Failures
from ..declaration.conversion import nix_options, to_remote
from ..declaration.error_text import describe
from ..declaration.typed_inputs import SOURCE_KEYS, Closure
from ..declaration.values import UNKNOWN, contains_unknown
from ..errors import EngineError
from ..lazy import lazy_module
from ..lifecycle.models import ConvergeFailed, Limits, Report
from ..lifecycle.source import FleetSource
from ..models import BinaryCache, Remote
from ..nix.builds import FleetBuilds
from ..nix.cli import Evaluation, FlakeRef, Nix, SourceRef
from ..nix.evaluation import EvaluationStore, Evaluator
from .records import R

if TYPE_CHECKING:
    from ..lifecycle import engine as lifecycle_engine
    from ..lifecycle.engine import Engine
else:
    lifecycle_engine = lazy_module("nixos_provider.engine.lifecycle.engine")

@dataclass(frozen=True)
class FleetSettings:
    """The provider's configuration: commands, defaults, the shared cache, the limits it sets."""

    nix_command: tuple[str, ...] = ("nix",)
    nixos_anywhere_command: tuple[str, ...] = ("nixos-anywhere",)
    default_private_key: str | None = None
    default_user: str | None = None
    binary_cache: BinaryCache | None = None
    max_parallel_ssh: int | None = None
    max_parallel_transfers: int | None = None
    max_parallel_evaluations: int | None = None


@dataclass
class Fleet:
    # Where relative flake references resolve (the Pulumi project's directory).
    project_dir: str | None = None
    settings: FleetSettings = field(default_factory=FleetSettings)
    # SSH sessions and closure copies at once, across machines, and the binary cache uploads of this process.
    limits: Limits = field(default_factory=Limits)
    # The engine's operations; made on first use (it imports SSH and the deployment code), unless given (a test
    # gives a fake).
    given_engine: Engine | None = None
    # Evaluations from a bounded pool, ahead of the stack's Checks and kept between runs.
    evaluator: Evaluator = field(default_factory=lambda: Evaluator(EvaluationStore.default()))
    # Machines of one flake built at one moment share one `nix build`.
    builds: FleetBuilds = field(init=False)
    # Where each resource this process created lives, by name: (host key, profile path). A replacement is created
    # before the old resource is deleted; when both reach one machine under two names, the delete must leave what
    # the replacement deployed.
    created_on: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.builds = FleetBuilds(self._out_path)

    async def _out_path(self, nix: Nix, ref: FlakeRef) -> str:
        return (await self.evaluator.evaluate(nix, ref)).out_path

    def configure(self, settings: FleetSettings) -> None:
        self.settings = settings
        if settings.max_parallel_ssh:
            self.limits.ssh_slots = asyncio.Semaphore(settings.max_parallel_ssh)
        if settings.max_parallel_transfers:
            self.limits.transfer_slots = asyncio.Semaphore(settings.max_parallel_transfers)
        self.evaluator.set_workers(settings.max_parallel_evaluations)

    @property
    def engine(self) -> Engine:
        if self.given_engine is None:
            self.given_engine = lifecycle_engine.Engine(self.limits)
        return self.given_engine

    def nix(self, options: Sequence[tuple[str, str]] = ()) -> Nix:
        """nix, with these options (`--option name value`)."""
        return Nix(list(self.settings.nix_command), list(options))

    def remote(self, connection: dict[str, Any], host_key: str | None = None) -> Remote:
        """A declared connection (or build host), the provider's default key and user filled in."""
        return to_remote(connection, host_key=host_key, default_private_key=self.settings.default_private_key,
                         default_user=self.settings.default_user)

    async def evaluate(self, ref: SourceRef, nix: Nix, *, plan: str | None = None) -> Evaluation:
        """A source's output path and derivation, without building. plan: the stack whose other sources are
        evaluated ahead, and which remembers this one for its next run (None: neither)."""
        return await self.evaluator.evaluate(nix, ref, plan=plan)

    def source(self, closure: Closure, nix: Nix, report: Report, *, nixos: bool) -> FleetSource:
        """A resource's system as the engine asks for it: its evaluation (Check's, looked up) and the fleet's
        builds. A machine's build must give what Check evaluated (NixProfile has no such promise to keep)."""
        async def evaluate(ref: SourceRef, nix: Nix) -> Evaluation:
            return await self.evaluate(ref, nix)

        return FleetSource(closure.ref(self.project_dir, nixos=nixos), closure.store_path, nix, evaluate, self.builds,
                           report.status, check_evaluated=nixos)

    async def converged(self, name: str, converging: Awaitable[R], recorded: R | None, lives_at: str) -> R:
        """A converge's record; a resource reached for the first time is remembered where it lives (lives_at: its
        profile's path), failed or not, for a replacement's delete."""
        try:
            record = await converging
        except ConvergeFailed as e:
            self._created(name, recorded, e.record, lives_at)
            raise
        self._created(name, recorded, record, lives_at)
        return record

    def _created(self, name: str, recorded: Any, record: Any, lives_at: str) -> None:
        if recorded is None and record.host_key:
            self.created_on[name] = (record.host_key, lives_at)

    def replaced_in_place(self, name: str, host_key: str | None, profile_path: str) -> bool:
        """Whether the replacement of name, created by this process, manages this very profile."""
        return host_key is not None and self.created_on.get(name) == (host_key, profile_path)

    async def output_path(self, news: dict[str, Any], *, nixos: bool, plan: str | None) -> Any:
        """Check: the output path of a declaration's source, or UNKNOWN while the source (or its options) is not
        known yet. A source that fails to evaluate is a Check failure of the property that names it."""
        given = [k for k in SOURCE_KEYS if news.get(k) is not None]
        if any(contains_unknown(news.get(k)) for k in (*given, "nixOptions")):
            return UNKNOWN
        ref = Closure.parse(news, "").ref(self.project_dir, nixos=nixos)
        assert ref is not None, "Check resolves only an evaluated source"
        try:
            return (await self.evaluate(ref, self.nix(nix_options(news.get("nixOptions"))), plan=plan)).out_path
        except (EngineError, ValueError) as e:
            f = Failures()
            # The message goes to the property that names the system: `flake`, `configuration` or `expression`.
            f.add(next((k for k in ("flake", "configuration", "expression") if k in given), "flake"), describe(e))
            raise CheckFailed(f) from e
