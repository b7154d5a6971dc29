"""What NixosMachine and NixProfile hand the engine: the system to build (through the fleet's shared evaluations
and builds) and the deployment's settings as a DeployRequest."""

from __future__ import annotations

from ..engine.lifecycle.source import FleetSource
from ..engine.models import Action, BinaryCache, DeployRequest, Profile, Remote, Retention
from ..engine.nix.cli import Evaluation, Nix, SourceRef
from .context import Context
from .typed_inputs import Closure, DeploySettings


def fleet_source(ctx: Context, urn: str, closure: Closure, nix: Nix, *, nixos: bool) -> FleetSource:
    """A resource's system as the engine asks for it: Check's evaluation (looked up, not remembered for the stack
    again: Check did that) and the fleet's builds. A machine's build must give what Check evaluated (NixProfile has
    no such promise to keep)."""
    async def evaluate(ref: SourceRef, nix: Nix) -> Evaluation:
        return await ctx.evaluate(ref, nix, urn=urn, remember=False)

    return FleetSource(closure.ref(ctx.project_dir, nixos=nixos), closure.store_path, nix, evaluate, ctx.builds,
                       lambda line: ctx.status(urn, line), check_evaluated=nixos)


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
