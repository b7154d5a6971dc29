"""A system as a fleet's deployer evaluates and builds it: through one evaluator, whose evaluations go ahead of the
Checks and are kept between runs, and through shared builds (machines of one flake built at one moment share one
`nix build`); or a store path given as is, realised when it is not here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..errors import EngineError
from ..nix.builds import FleetBuilds
from ..nix.cli import Evaluation, FlakeRef, Nix, SourceRef, is_store_path

Evaluate = Callable[[SourceRef, Nix], Awaitable[Evaluation]]


@dataclass(frozen=True)
class FleetSource:
    """A SystemSource (lifecycle.models).

    ref: the source to evaluate (None: the store path is given as is). store_path: the output path, given, or what
    the evaluation of ref gave when the inputs were checked. check_evaluated: a build that gives another path than
    store_path fails (an impure configuration would deploy something else than the preview showed).
    """

    ref: SourceRef | None
    store_path: str | None
    nix: Nix
    evaluate: Evaluate
    builds: FleetBuilds
    status: Callable[[str], None]
    check_evaluated: bool = False

    @property
    def evaluated(self) -> bool:
        return self.ref is not None

    @property
    def flake(self) -> FlakeRef | None:
        return self.ref if isinstance(self.ref, FlakeRef) else None

    async def evaluation(self) -> Evaluation:
        """The evaluation that checked the inputs (a lookup in this process or the evaluator's store, else a new one)."""
        if self.ref is None:
            raise ValueError("the machine names no source to evaluate")
        return await self.evaluate(self.ref, self.nix)

    async def build(self) -> str:
        """A flake through the fleet's builds, a system without a flake from its evaluation's derivation; a given
        store path realised when it is not here."""
        ref = self.ref
        if ref is None:
            path = self.store_path
            assert isinstance(path, str) and is_store_path(path)
            if not await self.nix.is_valid(path):
                self.status(f"realising {path}")
                await self.nix.build(path)
            return path
        self.status(f"building {ref}")
        if isinstance(ref, FlakeRef):
            built = await self.builds.build(self.nix, ref)
        else:
            evaluation = await self.evaluate(ref, self.nix)
            if evaluation.drv_path is None:
                raise EngineError(f"{ref} is the store path {evaluation.out_path}, not a derivation to build")
            built = await self.nix.realise(evaluation.drv_path)
        if self.check_evaluated and self.store_path and built != self.store_path:
            raise EngineError(f"building {ref} gave {built}, but evaluation said {self.store_path}; "
                              "is the configuration impure?")
        return built
