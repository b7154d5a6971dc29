#!/usr/bin/env bash
# Records what this machine's Nix prints when a real NixOS configuration fails evaluation (`--show-trace`), into
# tests/data/nix-outputs/<version>/eval-error-*.stderr. Needs the real nixpkgs of ../shared/nixpkgs (or
# PULUMI_NIXOS_NIXPKGS): 20.09 for Nix < 2.18, 26.05 from 2.18 on. Run once per release:
#   for r in bookworm trixie sid; do bash scripts/in-release.sh $r bash tests/data/nix-outputs/record-nixos-errors.sh; done
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export NIX_CONFIG="build-users-group =
sandbox = false
substituters =
flake-registry =
experimental-features = nix-command flakes"
version="$(nix --version | awk '{print $NF}')"
out="$here/$version"
mkdir -p "$out"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
python3 "$here/../../realnixos.py" flake "$work/flake" >/dev/null
cd "$work/flake"
for c in nooption assertion type throws; do
  nix eval --json --show-trace ".#nixosConfigurations.error-$c.config.system.build.toplevel" \
    --apply 'x: { out = x.outPath; drv = x.drvPath; }' 2> "$out/eval-error-$c.stderr" || true
done
