#!/usr/bin/env bash
# Install what type-checks the generated TypeScript SDK and the TypeScript
# examples (typescript, @types/node, @pulumi/pulumi, ts-node, and the
# @pulumi/hcloud and @pulumi/tls providers of examples/cloud-vm-install) into a
# per-version cache directory outside the checkout, and print that directory.
# Idempotent: a rerun (or a fresh clone on the same machine) finds the stamp and
# costs nothing.
#   usage: dir=$(bash scripts/setup-node.sh); "$dir/node_modules/.bin/tsc" ...
set -euo pipefail

PULUMI_NODE_VERSION="${PULUMI_NODE_VERSION:-3.259.0}"
TYPESCRIPT_VERSION="${TYPESCRIPT_VERSION:-4.9.5}"   # within the SDK's devDependency ^4.7.0
TYPES_NODE_VERSION="${TYPES_NODE_VERSION:-20.19.1}" # the SDK's devDependency ^20
TS_NODE_VERSION="${TS_NODE_VERSION:-10.9.2}"        # runs TypeScript programs (examples/typescript-fleet)
HCLOUD_VERSION="${HCLOUD_VERSION:-1.41.0}"          # examples/cloud-vm-install (needs @pulumi/pulumi ^3.142.0)
TLS_VERSION="${TLS_VERSION:-5.6.1}"                 # examples/cloud-vm-install (needs @pulumi/pulumi ^3.142.0)

CACHE_ROOT="${PULUMI_NIXOS_CACHE:-$HOME/.cache/pulumi-nixos}"
KEY=$(printf 'pulumi=%s typescript=%s types-node=%s ts-node=%s hcloud=%s tls=%s' "$PULUMI_NODE_VERSION" \
  "$TYPESCRIPT_VERSION" "$TYPES_NODE_VERSION" "$TS_NODE_VERSION" "$HCLOUD_VERSION" "$TLS_VERSION" \
  | sha256sum | cut -c1-12)
DEST="$CACHE_ROOT/node-$KEY"
STAMP="$DEST/.complete"

if [[ -f "$STAMP" ]]; then
  echo "$DEST"
  exit 0
fi

command -v npm >/dev/null || { echo "setup-node: npm is required" >&2; exit 1; }
mkdir -p "$DEST"
cat > "$DEST/package.json" <<JSON
{
  "name": "pulumi-nixos-node-tools",
  "private": true,
  "dependencies": {
    "@pulumi/pulumi": "$PULUMI_NODE_VERSION",
    "@types/node": "$TYPES_NODE_VERSION",
    "typescript": "$TYPESCRIPT_VERSION",
    "ts-node": "$TS_NODE_VERSION",
    "@pulumi/hcloud": "$HCLOUD_VERSION",
    "@pulumi/tls": "$TLS_VERSION"
  }
}
JSON
echo "setup-node: installing @pulumi/pulumi $PULUMI_NODE_VERSION, typescript $TYPESCRIPT_VERSION, @pulumi/hcloud $HCLOUD_VERSION, @pulumi/tls $TLS_VERSION into $DEST" >&2
(cd "$DEST" && npm install --no-audit --no-fund --loglevel=error >&2)
"$DEST/node_modules/.bin/tsc" --version >&2
touch "$STAMP"
echo "$DEST"
