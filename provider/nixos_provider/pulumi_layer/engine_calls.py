"""What NixosMachine and NixProfile hand the engine as the system to build: through the fleet's shared evaluations
and builds."""

from __future__ import annotations

from ..engine.declaration.typed_inputs import Closure
from ..engine.lifecycle.source import FleetSource
from ..engine.nix.cli import Evaluation, Nix, SourceRef
from .context import Context


def fleet_source(ctx: Context, urn: str, closure: Closure, nix: Nix, *, nixos: bool) -> FleetSource:
    """A resource's system as the engine asks for it: Check's evaluation (looked up, not remembered for the stack
    again: Check did that) and the fleet's builds. A machine's build must give what Check evaluated (NixProfile has
    no such promise to keep)."""
    async def evaluate(ref: SourceRef, nix: Nix) -> Evaluation:
        return await ctx.evaluate(ref, nix, urn=urn, remember=False)

    return FleetSource(closure.ref(ctx.project_dir, nixos=nixos), closure.store_path, nix, evaluate, ctx.builds,
                       lambda line: ctx.status(urn, line), check_evaluated=nixos)

