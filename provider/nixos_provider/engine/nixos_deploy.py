"""nixos-deploy: the engine without Pulumi, for the demo, benchmarks and debugging.

    nixos-deploy --host 127.0.10.1 --port 2222 --key-file .lab/keys/id_ed25519 \\
        --flake tests/lab#web [--action switch] [--health-http URL] [--secret-file /run/keys/db=./db.key]

The command line is read as the declaration a NixosMachine (or, with `--profile`, a NixProfile) would make, and
held to the same rules (`engine.declaration`): a failure names the flag and the setting. A NixOS system then goes
through the same operation as a NixosMachine's first `pulumi up` (engine.lifecycle): its secret files are written
before activation, the host's generation now is the baseline. Nothing is recorded between runs, so every secret
file given is written each time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .declaration import checks, input_rules
from .declaration.checks import Failures
from .declaration.conversion import to_remote
from .declaration.typed_inputs import MachineInputs, ProfileInputs
from .deploy import deploy, read_state
from .errors import EngineError
from .lifecycle.engine import Engine
from .lifecycle.models import ConvergeFailed, MachineGoal, ProfileGoal, Report
from .models import SYSTEM_PROFILE, DeployRequest, Profile
from .nix.cli import Evaluation, FlakeRef, Nix, is_store_path, parse_flake_ref


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


def secret_file(spec: str) -> tuple[str, str]:
    """`/path/on/host=local-file`: the path and the file's text (the declaration's checks hold the path to its rules)."""
    path, sep, local = spec.partition("=")
    if not sep or not path or not local:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected /path/on/host=local-file")
    try:
        return path, Path(local).read_text()
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{local}: not UTF-8 text (a secret file's content is text, as a "
                                         "NixosMachine's secretFiles take it)") from e
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{local}: {e.strerror}") from e


# The flag each setting of the declaration comes from, for its failures.
FLAGS = {"connection.host": "--host", "connection.port": "--port", "connection.user": "--user",
         "connection.privateKey": "--key-file", "connection.hostKey": "--host-key", "flake": "--flake",
         "systemPath": "--store-path", "storePath": "--store-path", "profilePath": "--profile",
         "user": "--profile-user", "activate": "--activate", "confirmTimeout": "--confirm-timeout",
         "healthChecks": "--health-http", "secretFiles": "--secret-file"}


def declaration(args: argparse.Namespace, key: str | None, *, system: bool) -> dict[str, Any]:
    """The command line as the declaration a NixosMachine or NixProfile would make, with the same names."""
    connection = {"host": args.host, "port": args.port, "user": args.user, "privateKey": key, "hostKey": args.host_key}
    declared: dict[str, Any] = {
        "connection": {k: v for k, v in connection.items() if v is not None}, "flake": args.flake,
        "confirmTimeout": args.confirm_timeout, "healthChecks": [{"http": u} for u in args.health_http] or None}
    if system:
        declared.update(systemPath=args.store_path, action=None if args.action == "dry-activate" else args.action,
                        secretFiles=[{"path": p, "content": c} for p, c in args.secret_file] or None)
    else:
        declared.update(profilePath=args.profile, user=args.profile_user, storePath=args.store_path,
                        activate=args.activate)
    return {k: v for k, v in declared.items() if v is not None}


def failures_of(declared: dict[str, Any], *, system: bool, connection_only: bool = False) -> list[str]:
    """What is wrong with the declaration, a line each, naming the flag and the setting."""
    f = Failures()
    if connection_only:
        checks.check_connection(f, declared["connection"])
    elif system:
        input_rules.machine_failures(declared, os.getcwd(), f)
    else:
        input_rules.profile_failures(declared, f)
    flags = {path: FLAGS.get(path) or FLAGS.get(path.split("[")[0]) for path, _ in f.items}
    return [f"{flags[path]} ({path}): {reason}" if flags[path] else f"{path}: {reason}" for path, reason in f.items]


async def _main(args: argparse.Namespace) -> int:
    key = Path(args.key_file).read_text() if args.key_file else None
    system = args.profile in (None, SYSTEM_PROFILE)
    if system and args.activate:
        print("nixos-deploy: --activate applies to a profile; a NixOS system activates itself", file=sys.stderr)
        return 2
    for flag, given in (("--secret-file", args.secret_file), ("--action dry-activate", args.action == "dry-activate")):
        if not system and given:
            print(f"nixos-deploy: {flag} applies to a NixOS system, not to a profile", file=sys.stderr)
            return 2
    declared = declaration(args, key, system=system)
    wrong = failures_of(declared, system=system, connection_only=args.status)
    if wrong:
        print("\n".join(f"nixos-deploy: {line}" for line in wrong), file=sys.stderr)
        return 2
    remote = to_remote(declared["connection"])
    if args.status:
        state = await read_state(remote, Profile(args.profile or SYSTEM_PROFILE, args.profile_user))
        gen = state.generation
        print(f"{remote.target}: generation {gen.number if gen else '-'} {gen.store_path if gen else ''}")
        print(f"  /run/current-system: {state.current_system}")
        print(f"  host key: {state.host_key}")
        return 0
    nix = Nix()
    source = _Built(nix, parse_flake_ref(args.flake, nixos=system) if args.flake else None, args.store_path)
    report = Report(status=lambda s: print(f"  {s}", file=sys.stderr), info=lambda s: print(f"  | {s}", file=sys.stderr),
                    warn=lambda s: print(f"  warning: {s}", file=sys.stderr))
    if args.action == "dry-activate":
        result = await deploy(DeployRequest(remote, await source.build(), Profile(), action="dry-activate"), nix,
                              status=report.status, output=report.info)
        print(f"{remote.target}: would activate {result.store_path}")
        return 0
    if system:
        m = MachineInputs.parse(declared)
        goal = MachineGoal(remote, source, m.settings.request(remote, Profile(), action=m.action),
                           secret_files=m.secret_files)
        record = await Engine().converge_machine(goal, None, nix, report)
        pushed = f"pushed {record.pushed_paths} paths, {record.pushed_bytes} bytes"
        files = f"; secret files: {', '.join(f.path for f in record.secret_files)}" if record.secret_files else ""
        print(f"{remote.target}: generation {record.generation} {record.system_path} ({pushed}){files}")
        return 0
    p = ProfileInputs.parse(declared)
    request = p.settings.request(remote, Profile(str(args.profile), args.profile_user), activate_command=p.activate)
    done = await Engine().converge_profile(ProfileGoal(request, source), None, nix, report)
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
