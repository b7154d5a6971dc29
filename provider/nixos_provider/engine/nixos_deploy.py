"""nixos-deploy: the engine without Pulumi, for the demo, benchmarks and debugging.

    nixos-deploy --host 127.0.10.1 --port 2222 --key-file .lab/keys/id_ed25519 \\
        --flake tests/lab#web [--action switch] [--health-http URL]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from .deploy import deploy, read_state
from .errors import EngineError
from .models import Credentials, DeployRequest, HealthCheck, Profile, Remote
from .nix.cli import Nix, is_store_path, parse_flake_ref


async def _main(args: argparse.Namespace) -> int:
    key = Path(args.key_file).read_text() if args.key_file else None
    remote = Remote(args.host, args.port, args.user, Credentials(private_key=key), host_key=args.host_key)
    profile = Profile(args.profile or "/nix/var/nix/profiles/system", args.profile_user)
    if args.status:
        state = await read_state(remote, profile)
        gen = state.generation
        print(f"{remote.target}: generation {gen.number if gen else '-'} {gen.store_path if gen else ''}")
        print(f"  /run/current-system: {state.current_system}")
        print(f"  host key: {state.host_key}")
        return 0
    nix = Nix()
    if args.store_path:
        path = args.store_path
    else:
        ref = parse_flake_ref(args.flake, nixos=profile.is_system)
        print(f"building {ref}", file=sys.stderr)
        path = await nix.build(ref)
    if not is_store_path(path):
        print(f"nixos-deploy: {path!r} is not a store path", file=sys.stderr)
        return 2
    checks = tuple(HealthCheck(http=u) for u in args.health_http)
    req = DeployRequest(remote, path, profile, action=args.action, confirm_timeout=args.confirm_timeout,
                        health_checks=checks, activate_command=args.activate)
    result = await deploy(req, nix, status=lambda s: print(f"  {s}", file=sys.stderr),
                          output=lambda s: print(f"  | {s}", file=sys.stderr))
    print(f"{remote.target}: generation {result.generation} {result.store_path} "
          f"(pushed {result.push.paths} paths, {result.push.bytes} bytes)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nixos-deploy", description="Deploy a NixOS system or profile over SSH.")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, default=22)
    ap.add_argument("--user", default="root")
    ap.add_argument("--key-file")
    ap.add_argument("--host-key", help="pin this OpenSSH public host key")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--flake")
    what.add_argument("--store-path")
    ap.add_argument("--profile")
    ap.add_argument("--profile-user")
    ap.add_argument("--activate")
    ap.add_argument("--action", default="switch", choices=["switch", "boot", "test", "dry-activate"])
    ap.add_argument("--confirm-timeout", type=float, default=30)
    ap.add_argument("--health-http", action="append", default=[])
    ap.add_argument("--status", action="store_true", help="only show what the host runs")
    args = ap.parse_args(argv)
    if not args.status and not (args.flake or args.store_path):
        ap.error("one of --flake or --store-path is required")
    try:
        return asyncio.run(_main(args))
    except (EngineError, ValueError, OSError) as e:
        print(f"nixos-deploy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
