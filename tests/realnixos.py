"""Real NixOS configurations for the tests and benchmarks: a flake of `nixpkgs.lib.nixosSystem` machines.

They cannot be built here (no bootstrap binaries, no binary cache); everything that needs only evaluation runs
on them. The nixpkgs comes from the tarballs of `../shared/nixpkgs/` (or the folder PULUMI_NIXOS_NIXPKGS names),
or from a nixpkgs checkout PULUMI_NIXOS_NIXPKGS names:

- Nix before 2.18 takes NixOS 20.09, unpacked once into the version-keyed cache and used as a `path:` input (a
  tarball input has no `lastModified` on 2.8, which 20.09's `nixosSystem` reads);
- Nix 2.18 and later take the nixos-unstable of early 2026 as a `tarball+file://` input, which Nix unpacks into
  its store once (a `path:` input to the unpacked tree would be copied into the store on every evaluation).

`python tests/realnixos.py flake DIR [MACHINES]` writes the flake (for scripts and by hand).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "nixpkgs"
ENV = "PULUMI_NIXOS_NIXPKGS"
OLD = "nixpkgs-20.09-offline.tar.xz"  # NixOS 20.09: Nix >= 2.2
NEW = "nixpkgs-26.05pre-offline.tar.xz"  # nixos-unstable, early 2026: Nix >= 2.18
HOW = (f"real nixpkgs not found: set {ENV} to a folder holding {OLD} (for Nix < 2.18) or {NEW} (Nix >= 2.18), "
       "or to a nixpkgs checkout whose flake this Nix evaluates")


@dataclass(frozen=True)
class Nixpkgs:
    url: str  # the flake input
    release: str  # "20.09", "26.05", or "checkout"
    state_version: str


def nix_version() -> tuple[int, int]:
    out = subprocess.run(["nix", "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out.strip().splitlines()[0].rsplit(" ", 1)[-1])
    assert m, out
    return int(m.group(1)), int(m.group(2))


def cache_dir() -> Path:
    return Path(os.environ.get("PULUMI_NIXOS_CACHE") or Path.home() / ".cache" / "pulumi-nixos")


def _unpacked(tarball: Path) -> Path:
    """The tarball unpacked once, under a name that changes with its content."""
    digest = hashlib.sha256()
    with open(tarball, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    target = cache_dir() / "nixpkgs" / f"{tarball.name.removesuffix('.tar.xz')}-{digest.hexdigest()[:12]}"
    if not (target / "flake.nix").exists():
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(partial, filter="tar")
        (top,) = list(partial.iterdir())
        shutil.rmtree(target, ignore_errors=True)
        top.rename(target)
        shutil.rmtree(partial, ignore_errors=True)
    return target


def find_nixpkgs() -> Nixpkgs | None:
    """The real nixpkgs this machine's Nix evaluates; None (with HOW to say why) when there is none."""
    given = os.environ.get(ENV)
    if given and (Path(given) / "flake.nix").exists():
        return Nixpkgs(f"path:{Path(given).resolve()}", "checkout", "")
    folder = Path(given) if given else SHARED
    if nix_version() >= (2, 18):
        tarball = folder / NEW
        return Nixpkgs(f"tarball+file://{tarball}", "26.05", "25.11") if tarball.exists() else None
    tarball = folder / OLD
    return Nixpkgs(f"path:{_unpacked(tarball)}", "20.09", "20.09") if tarball.exists() else None


def find_nixpkgs_tree() -> Path | None:
    """The leg's real nixpkgs as a folder, for configurations without a flake (`nixpkgs` is a path there)."""
    given = os.environ.get(ENV)
    if given and (Path(given) / "nixos" / "default.nix").exists():
        return Path(given).resolve()
    tarball = (Path(given) if given else SHARED) / (NEW if nix_version() >= (2, 18) else OLD)
    return _unpacked(tarball) if tarball.exists() else None


def write_configuration(directory: Path, nixpkgs: Path, extra: str = "") -> Path:
    """A configuration.nix of the same small server as the flake's machines, for `nixpkgs/nixos`; `extra` is
    Nix text added to the module (e.g. a mistake)."""
    state = "20.09" if nix_version() < (2, 18) else "25.11"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "configuration.nix"
    path.write_text(
        "{ pkgs, ... }: {\n"
        '  boot.loader.grub.device = "/dev/vda";\n  fileSystems."/".device = "/dev/vda1";\n'
        '  networking.hostName = "classic";\n  services.openssh.enable = true;\n  services.nginx.enable = true;\n'
        f'  users.users.alice = {{ isNormalUser = true; }};\n  system.stateVersion = "{state}";\n  {extra}\n}}\n')
    return path


# One machine: a small server, as the users run (openssh, nginx, a user); `extra` is a module.
_MACHINE = """
    machine = name: extra: nixpkgs.lib.nixosSystem {
      system = "x86_64-linux";
      modules = [ ({ pkgs, ... }: {
        boot.loader.grub.device = "/dev/vda";
        fileSystems."/".device = "/dev/vda1";
        networking.hostName = name;
        services.openssh.enable = true;
        services.nginx.enable = true;
        users.users.alice = { isNormalUser = true; };
      } // STATE_VERSION) extra ];
    };"""

# Configurations beyond the plain machines: a change to preview, and one of each kind of evaluation error.
EXTRA = {
    # nginx mainline and the newest kernel: a version change and a reboot, predicted without a build
    "web1-next": 'machine "web1" ({ pkgs, ... }: { services.nginx.package = pkgs.nginxMainline; '
                 'boot.kernelPackages = pkgs.linuxPackages_latest; })',
    "error-nooption": 'machine "e1" { services.nginx.enabel = true; }',
    "error-assertion": 'machine "e2" { fileSystems = nixpkgs.lib.mkForce { }; }',
    "error-type": 'machine "e3" { services.openssh.ports = [ "twenty-two" ]; }',
    "error-throws": 'machine "e4" { networking.domain = throw "no domain for this machine"; }',
}


def write_flake(directory: Path, machines: int = 2, nixpkgs: Nixpkgs | None = None, extra: bool = True) -> Path:
    """A flake with `web1` .. `web<machines>` (and EXTRA), all from the real nixpkgs; its lock is written
    by the first evaluation."""
    nixpkgs = nixpkgs or find_nixpkgs()
    if nixpkgs is None:
        raise FileNotFoundError(HOW)
    directory.mkdir(parents=True, exist_ok=True)
    state = f'{{ system.stateVersion = "{nixpkgs.state_version}"; }}' if nixpkgs.state_version else "{ }"
    configs = [f'      web{i} = machine "web{i}" {{ }};' for i in range(1, machines + 1)]
    if extra:
        configs += [f'      "{name}" = {value};' for name, value in EXTRA.items()]
    (directory / "flake.nix").write_text(
        "{\n"
        f'  inputs.nixpkgs.url = "{nixpkgs.url}";\n'
        "  outputs = { self, nixpkgs }: let" + _MACHINE.replace("STATE_VERSION", state) + "\n"
        "  in {\n    nixosConfigurations = {\n" + "\n".join(configs) + "\n    };\n  };\n}\n")
    return directory


def evaluate(flake: Path, name: str) -> dict[str, str]:
    """What `nix eval` itself says of a configuration: its out path and derivation (`out`, `drv`)."""
    out = subprocess.run(
        ["nix", "eval", "--json", f"path:{flake}#nixosConfigurations.{name}.config.system.build.toplevel",
         "--apply", "x: { out = x.outPath; drv = x.drvPath; }"], capture_output=True, text=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def as_deployed(state: dict[str, Any], flake: Path, name: str, evaluation: dict[str, str]) -> dict[str, Any]:
    """A stack export whose NixosMachine records what a deploy of `name` records (its system and derivation).

    A real NixOS system cannot be built here, so a test or benchmark deploys a lab system for real and then
    makes the state say that this configuration was deployed, as the deployer that evaluated it would have.
    """
    for r in state["deployment"]["resources"]:
        if r["type"] == "nixos:index:NixosMachine":
            r["inputs"]["flake"] = r["outputs"]["flake"] = f"path:{flake}#{name}"
            r["inputs"]["systemPath"] = r["outputs"]["systemPath"] = evaluation["out"]
            r["outputs"]["systemDerivation"] = evaluation["drv"]
            r["outputs"]["needsReboot"] = False
    return state


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "flake":
        sys.exit("usage: realnixos.py flake DIR [MACHINES]")
    try:
        print(write_flake(Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 2))
    except FileNotFoundError as e:
        sys.exit(str(e))
