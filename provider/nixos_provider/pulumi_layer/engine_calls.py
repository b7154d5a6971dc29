"""What NixosMachine and NixProfile hand the engine: the system to build (through the fleet's shared evaluations
and builds) and the deployment's settings as a DeployRequest."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.errors import EngineError
from ..engine.models import Action, BinaryCache, DeployRequest, Profile, Remote, Retention
from ..engine.nix.cli import Evaluation, FlakeRef, Nix, is_store_path
from .context import Context
from .typed_inputs import Closure, DeploySettings


async def build_closure(ctx: Context, urn: str, nix: Nix, closure: Closure, *, nixos: bool,
                        check_evaluated: bool = False) -> str:
    """Build the flake (one `nix build` per flake for the whole fleet), a system without a flake (its derivation,
    from the evaluation), or realise the store path.

    check_evaluated: a build that gives another path than Check's evaluation
    fails (an impure flake would deploy something else than the preview showed).
    """
    ref = closure.ref(ctx.project_dir, nixos=nixos)
    if ref is not None:
        ctx.status(urn, f"building {ref}")
        if isinstance(ref, FlakeRef):
            built = await ctx.builds.build(nix, ref)
        else:
            evaluation = await ctx.evaluate(ref, nix, urn=urn, remember=False)
            if evaluation.drv_path is None:
                raise EngineError(f"{ref} is the store path {evaluation.out_path}, not a derivation to build")
            built = await nix.realise(evaluation.drv_path)
        if check_evaluated and closure.store_path and built != closure.store_path:
            raise EngineError(f"building {ref} gave {built}, but evaluation said {closure.store_path}; "
                              "is the configuration impure?")
        return built
    path = closure.store_path
    assert isinstance(path, str) and is_store_path(path)
    if not await nix.is_valid(path):
        ctx.status(urn, f"realising {path}")
        await nix.build(path)
    return path


@dataclass(frozen=True)
class FleetSource:
    """A resource's system as the engine asks for it: evaluated and built through the provider's evaluator and
    fleet builds (machines of one flake built at one moment share one `nix build`)."""

    ctx: Context
    urn: str
    closure: Closure
    nix: Nix
    nixos: bool

    @property
    def store_path(self) -> str | None:
        return self.closure.store_path

    @property
    def evaluated(self) -> bool:
        return self.closure.evaluated

    @property
    def flake(self) -> FlakeRef | None:
        ref = self.closure.ref(self.ctx.project_dir, nixos=self.nixos)
        return ref if isinstance(ref, FlakeRef) else None

    async def evaluation(self) -> Evaluation:
        """Check's evaluation (a lookup in this process; for a system without a flake, Check's evaluation of this
        run when it is the same process, else a new one)."""
        ref = self.closure.ref(self.ctx.project_dir, nixos=self.nixos)
        if ref is None:
            raise ValueError("the machine names no source to evaluate")
        return await self.ctx.evaluate(ref, self.nix, urn=self.urn, remember=False)

    async def build(self) -> str:
        # A machine's build must give what Check evaluated (NixProfile has no such promise to keep).
        return await build_closure(self.ctx, self.urn, self.nix, self.closure, nixos=self.nixos,
                                   check_evaluated=self.nixos)


def deploy_request(remote: Remote, profile: Profile, settings: DeploySettings, *, action: Action = "switch",
                   activate_command: str | None = None, binary_cache: BinaryCache | None = None) -> DeployRequest:
    """The deployment's settings; the engine decides its store path, derivation, build host and the baseline
    generation that keepGenerations never deletes."""
    return DeployRequest(
        remote=remote, store_path="", profile=profile, action=action,
        magic_rollback=settings.magic_rollback, confirm_timeout=settings.confirm_timeout,
        activation_timeout=settings.activation_timeout, auto_rollback=settings.auto_rollback,
        health_checks=settings.health_checks, activate_command=activate_command,
        substitute_on_destination=settings.substitute_on_destination, compress=settings.compress,
        binary_cache=binary_cache,
        retention=Retention(keep=settings.keep_generations, collect_garbage=settings.collect_garbage),
        reboot=settings.reboot, reboot_timeout=settings.reboot_timeout,
    )
