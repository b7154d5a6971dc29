"""The deploy path NixosMachine and NixProfile share: build, request, deploy, outputs.

Each resource parses its deploy settings once (DeploySettings), builds the
closure (build_closure), makes the engine's DeployRequest (deploy_request),
deploys it with the engine's failures mapped to PartialFailure carrying what
runs now (run_deploy), and records the outputs every deployment has
(deployed_outputs). The resources keep only what is theirs around it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..engine.errors import BuildHostError, ConnectError, DeployError, EngineError, HostBusy
from ..engine.lazy import lazy_module
from ..engine.models import (
    Action,
    BinaryCache,
    DeployRequest,
    DeployResult,
    Profile,
    Remote,
    Retention,
)
from ..engine.nix.cli import FlakeRef, Nix, is_store_path
from .context import Context
from .error_text import describe
from .resource import PartialFailure, now_rfc3339
from .typed_inputs import Closure, DeploySettings

if TYPE_CHECKING:
    from ..engine import deploy as engine
else:
    engine = lazy_module("nixos_provider.engine.deploy")


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


def deploy_request(remote: Remote, store_path: str, profile: Profile, settings: DeploySettings, *,
                   action: Action = "switch", activate_command: str | None = None,
                   build_drv: str | None = None, build_host: Remote | None = None,
                   binary_cache: BinaryCache | None = None,
                   baseline: Any = None) -> DeployRequest:
    """baseline: the recorded baselineGeneration, which keepGenerations never deletes (a destroy returns to it); a
    number, as state gives it back (a float)."""
    known = isinstance(baseline, (int, float)) and not isinstance(baseline, bool) and baseline >= 1
    protect = (int(baseline),) if known else ()
    return DeployRequest(
        remote=remote, store_path=store_path, profile=profile, action=action,
        magic_rollback=settings.magic_rollback, confirm_timeout=settings.confirm_timeout,
        activation_timeout=settings.activation_timeout, auto_rollback=settings.auto_rollback,
        health_checks=settings.health_checks, activate_command=activate_command,
        substitute_on_destination=settings.substitute_on_destination, compress=settings.compress,
        build_drv=build_drv, build_host=build_host, binary_cache=binary_cache,
        retention=Retention(keep=settings.keep_generations, protect=protect,
                            collect_garbage=settings.collect_garbage),
        reboot=settings.reboot, reboot_timeout=settings.reboot_timeout,
    )


# (outputs before the deployment, the engine's DeployError) -> the outputs of what runs now.
AfterFailure = Callable[[dict[str, Any], DeployError], dict[str, Any]]
# Best effort, after a failure the engine could not classify: the outputs of what runs now.
Observe = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def run_deploy(ctx: Context, urn: str, req: DeployRequest, nix: Nix, *, ident: str, inputs: dict[str, Any],
                     failed: dict[str, Any], after_failure: AfterFailure,
                     observe: Observe | None = None) -> DeployResult:
    """engine.deploy, with its failures as PartialFailure recording what the host runs now.

    failed: the outputs to record when the deployment changed nothing (the old
    configuration's); a DeployError says what it left running (after_failure);
    another deployment holding the lock (HostBusy) changed nothing; any other
    failure is observed when the resource can, else recorded as failed.
    """
    try:
        async with ctx.ssh_slots:
            return await engine.deploy(req, nix, status=lambda s: ctx.status(urn, s),
                                       output=lambda s: ctx.info(urn, s), warn=lambda s: ctx.warn(urn, s),
                                       uploads=ctx.cache_uploads, transfers=ctx.transfer_slots)
    except DeployError as e:
        raise PartialFailure(describe(e), ident, after_failure(failed, e), inputs) from e
    except HostBusy as e:
        # Nothing was changed; what runs now is another deployment's business.
        raise PartialFailure(describe(e), ident, failed, inputs) from e
    except BuildHostError as e:
        # The build host failed before anything reached the target: it runs what it ran.
        runs = failed.get("generation")  # a number, as state gives it back (a float)
        now = (f"it still runs generation {int(runs)} ({failed.get('systemPath')})" if isinstance(runs, (int, float))
               else "it runs what it ran")
        raise PartialFailure(f"{describe(e)}; {req.remote.target} was not changed: {now}", ident, failed,
                             inputs) from e
    except ConnectError as e:
        # Not reached (or lost before the lock was taken): nothing changed, and a host that did not answer the
        # deployment's attempts would make observing it wait as long again.
        raise PartialFailure(describe(e), ident, failed, inputs) from e
    except EngineError as e:
        after = await observe(failed) if observe is not None else failed
        raise PartialFailure(describe(e), ident, after, inputs) from e


def deployed_outputs(result: DeployResult, path_key: str, pinned: str | None) -> dict[str, Any]:
    """The outputs every confirmed deployment records."""
    return {
        path_key: result.store_path,
        "generation": result.generation,
        "previousGeneration": result.previous_generation,
        "hostKey": result.host_key or pinned,
        "deployedAt": now_rfc3339(),
        "pushedPaths": result.push.paths,
        "pushedBytes": result.push.bytes,
        "substitutedPaths": result.push.substituted,
    }
