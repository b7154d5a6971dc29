#!/usr/bin/env bash
# test-fresh.sh: prove that `make test` needs nothing set up by hand.
#
# Clones the committed HEAD into a new directory and runs the README's test
# command there, inside scripts/in-release.sh's fresh-machine namespace: no
# nixbld group or users, no /etc/nix/nix.conf, an empty /nix. Only the
# version-keyed tool caches (~/.cache/pulumi-nixos: the Pulumi build, the
# Debian roots) are shared. Debian packages the machine already has stay
# installed; setup.sh would install them on a machine without them.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
base="$(mktemp -d "${TMPDIR:-/var/tmp}/pulumi-nixos-fresh.XXXXXX")"
# Stop whatever lab hosts an interrupted run left, then remove the clone.
trap 'for d in "$base"/pulumi-nixos/.lab/test*/; do
        python3 "$base/pulumi-nixos/tests/lab/labctl.py" --lab-dir "$d" down >/dev/null 2>&1 || true
      done
      rm -rf --one-file-system "$base"' EXIT
git clone -q "$repo" "$base/pulumi-nixos"
# CI lays shared/ beside the checkout; so does this check.
[[ -d "$repo/../shared" ]] && cp -r "$repo/../shared" "$base/shared"
echo "test-fresh: fresh clone of $(git -C "$repo" rev-parse --short HEAD) in $base/pulumi-nixos"
cd "$base/pulumi-nixos"
bash scripts/in-release.sh bookworm sh -c '
  echo "test-fresh: nixbld group: $(getent group nixbld || echo none); /etc/nix/nix.conf: $(test -e /etc/nix/nix.conf && echo present || echo none); /nix: $(ls -A /nix | wc -l) entries"
  exec make test'
