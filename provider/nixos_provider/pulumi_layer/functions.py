"""The provider's functions (Invoke): listGenerations and resolveFlake, each checked, then one engine call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..engine.declaration import checks, conversion
from ..engine.errors import EngineError
from ..engine.models import SYSTEM_PROFILE, Profile
from ..engine.nix.cli import is_store_path, names_a_configuration, parse_flake_ref
from .context import Context
from .properties import reveal
from .resource import CheckFailed
from .schema import unknown_keys


async def list_generations(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """A profile's generations on a host, and which one is current (0: none)."""
    args = reveal(args)
    f = checks.Failures()
    checks.check_connection(f, args.get("connection"))
    f.add_all(unknown_keys("nixos:index:Connection", args.get("connection"), owner="connection"))
    if f:
        raise CheckFailed(f)
    path = str(args.get("profilePath") or SYSTEM_PROFILE)
    state = await ctx.fleet.engine.read_state(ctx.fleet.remote(args["connection"]), Profile(path), with_generations=True)
    generations = [{"number": g.number, "storePath": g.store_path, "current": g.current, "date": g.date}
                   for g in state.generations]
    return {"generations": generations, "current": state.generation.number if state.generation else 0}


async def resolve_flake(ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
    """The store path a flake reference evaluates to (built when `build` asks), and whether it is built."""
    args = reveal(args)
    f = checks.Failures()
    checks.check_flake(f, "flake", args.get("flake"))
    if args.get("flake") is None:
        f.add("flake", "is required")
    if f:
        raise CheckFailed(f)
    nix = ctx.fleet.nix(conversion.nix_options(args.get("nixOptions")))
    ref = str(args["flake"])
    parsed = parse_flake_ref(ref, ctx.fleet.project_dir, nixos=names_a_configuration(ref))
    if args.get("build"):
        return {"storePath": await nix.build(parsed), "built": True}
    path = (await ctx.fleet.evaluate(parsed, nix)).out_path
    return {"storePath": path, "built": is_store_path(path) and await nix.is_valid(path)}


FUNCTIONS: dict[str, Callable[[Context, dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "nixos:index:listGenerations": list_generations,
    "nixos:index:resolveFlake": resolve_flake,
}


async def invoke(ctx: Context, token: str, args: dict[str, Any]) -> dict[str, Any]:
    function = FUNCTIONS.get(token)
    if function is None:
        raise EngineError(f"unknown function {token!r}")
    return await function(ctx, args)
