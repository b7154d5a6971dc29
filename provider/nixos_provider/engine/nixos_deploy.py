"""nixos-deploy: the engine without Pulumi, for the demo, benchmarks and debugging.

    nixos-deploy --host 127.0.10.1 --port 2222 --key-file .lab/keys/id_ed25519 \\
        --flake tests/lab#web [--action switch] [--health-http URL] [--secret-file /run/keys/db=./db.key]

A NixOS system goes through the same operation as a NixosMachine's first `pulumi up` (engine.lifecycle): its
secret files are written before activation, the host's generation now is the baseline. Nothing is recorded
between runs, so every secret file given is written each time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path

from .deploy import deploy, read_state
from .errors import EngineError
from .lifecycle.engine import Engine
from .lifecycle.models import ConvergeFailed, MachineGoal, ProfileGoal, Report
from .models import Credentials, DeployRequest, HealthCheck, Profile, Remote
from .nix.cli import Evaluation, FlakeRef, Nix, is_store_path, parse_flake_ref
from .target.secret_files import SecretFile


@dataclass(frozen=True)
class _Built:
    """The system as the command line names it: a flake to build here, or a store path to realise."""

    nix: Nix
    ref: FlakeRef | None
    path: str | None

    @property
    def store_path(self) -> str | None:
        return self.path

    @property
    def evaluated(self) -> bool:
        return False  # built here, never evaluated apart from its build

    @property
    def flake(self) -> FlakeRef | None:
        return self.ref

    async def evaluation(self) -> Evaluation:
        raise ValueError("nixos-deploy builds the system; it does not evaluate it apart")

    async def build(self) -> str:
        if self.ref is None:
            assert self.path is not None
            if not await self.nix.is_valid(self.path):
                await self.nix.build(self.path)
            return self.path
        print(f"building {self.ref}", file=sys.stderr)
        path = await self.nix.build(self.ref)
        if not is_store_path(path):
            raise ValueError(f"{path!r} is not a store path")
        return path


def secret_file(spec: str) -> SecretFile:
    """`/path/on/host=local-file`: root's, mode 0400, written before activation."""
    path, sep, local = spec.partition("=")
    if not sep or not path.startswith("/") or not local:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected /path/on/host=local-file")
    try:
        return SecretFile(path=path, content=Path(local).read_bytes())
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{local}: {e.strerror}") from e


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
    source = _Built(nix, parse_flake_ref(args.flake, nixos=profile.is_system) if args.flake else None,
                    args.store_path)
    if args.store_path and not is_store_path(args.store_path):
        print(f"nixos-deploy: {args.store_path!r} is not a store path", file=sys.stderr)
        return 2
    checks = tuple(HealthCheck(http=u) for u in args.health_http)
    req = DeployRequest(remote, "", profile, action=args.action, confirm_timeout=args.confirm_timeout,
                        health_checks=checks, activate_command=args.activate)
    report = Report(status=lambda s: print(f"  {s}", file=sys.stderr), info=lambda s: print(f"  | {s}", file=sys.stderr),
                    warn=lambda s: print(f"  warning: {s}", file=sys.stderr))
    if args.action == "dry-activate":
        result = await deploy(DeployRequest(remote, await source.build(), profile, action="dry-activate"), nix,
                              status=report.status, output=report.info)
        print(f"{remote.target}: would activate {result.store_path}")
        return 0
    if profile.is_system:
        record = await Engine().converge_machine(MachineGoal(remote, source, req, secret_files=tuple(args.secret_file)),
                                                 None, nix, report)
        pushed = f"pushed {record.pushed_paths} paths, {record.pushed_bytes} bytes"
        files = f"; secret files: {', '.join(f.path for f in record.secret_files)}" if record.secret_files else ""
        print(f"{remote.target}: generation {record.generation} {record.system_path} ({pushed}){files}")
        return 0
    if args.secret_file:
        print("nixos-deploy: --secret-file applies to a NixOS system, not to a profile", file=sys.stderr)
        return 2
    done = await Engine().converge_profile(ProfileGoal(req, source), None, nix, report)
    print(f"{remote.target}: generation {done.generation} {done.store_path} "
          f"(pushed {done.pushed_paths} paths, {done.pushed_bytes} bytes)")
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
    ap.add_argument("--secret-file", action="append", default=[], type=secret_file, metavar="PATH=FILE",
                    help="write FILE's content to PATH on the host (root's, mode 0400) before activation; "
                         "nixos-deploy keeps no record, so a file left out of a later run stays on the host")
    ap.add_argument("--status", action="store_true", help="only show what the host runs")
    args = ap.parse_args(argv)
    if not args.status and not (args.flake or args.store_path):
        ap.error("one of --flake or --store-path is required")
    try:
        return asyncio.run(_main(args))
    except (EngineError, ConvergeFailed, ValueError, OSError) as e:
        print(f"nixos-deploy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
