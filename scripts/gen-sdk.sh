#!/usr/bin/env bash
# Regenerate the Python, Node.js and Go SDKs from schema.json into sdk/ (or the
# directory given as $1). Deterministic: the same schema gives the same files.
#
# The generators are pulumi's own (github.com/pulumi/pulumi/pkg/v3/codegen at
# the pinned CLI version), run by scripts/sdkgen. `pulumi package gen-sdk` would
# call the same generators through the language hosts' GeneratePackage RPC, but
# the Python and Node.js hosts this project builds (v3.79.0, v3.68.0) predate
# that RPC ("method GeneratePackage not implemented") and the Go host cannot be
# built from the module proxy. sdkgen is built once into a cache directory
# outside the checkout, keyed by its sources.
#
# Around the generated Go package this script adds sdk/go/go.mod and go.sum
# (module github.com/pulumi-nixos/pulumi-nixos/sdk/go, pulumi sdk/v3 pinned),
# so `go build ./...` works in sdk/go.
#
# The SDKs carry the provider's version (scripts/version.sh, from
# provider/pyproject.toml): the schema is generated from a copy whose `version`
# is that one, and `make sdk` (no argument) writes it into schema.json too, so
# the one place to change the version is pyproject.toml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/sdk}" && cd "${1:-$ROOT/sdk}" && pwd)"
PULUMI_VERSION="${PULUMI_VERSION:-3.259.0}"
GO_MODULE="github.com/pulumi-nixos/pulumi-nixos/sdk/go"

CACHE_ROOT="${PULUMI_NIXOS_CACHE:-$HOME/.cache/pulumi-nixos}"
KEY=$(cat "$ROOT"/scripts/sdkgen/{go.mod,go.sum,main.go} | sha256sum | cut -c1-12)
SDKGEN="$CACHE_ROOT/sdkgen-$KEY/sdkgen"
if [[ ! -x "$SDKGEN" ]]; then
  command -v go >/dev/null || { echo "gen-sdk: Go is required to build sdkgen" >&2; exit 1; }
  echo "gen-sdk: building sdkgen (pulumi pkg/v3 codegen) into $(dirname "$SDKGEN")" >&2
  mkdir -p "$(dirname "$SDKGEN")"
  (cd "$ROOT/scripts/sdkgen" && CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath -o "$SDKGEN.tmp" . && mv "$SDKGEN.tmp" "$SDKGEN")
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
VERSION="$(bash "$ROOT/scripts/version.sh")"
# Only the top-level "version" line (two-space indent) changes; the rest keeps its layout.
sed -E '0,/^  "version": "[^"]*",$/s//  "version": "'"$VERSION"'",/' "$ROOT/schema.json" > "$WORK/schema.json"
grep -qx "  \"version\": \"$VERSION\"," "$WORK/schema.json" \
  || { echo "gen-sdk: schema.json has no top-level \"version\" line to set" >&2; exit 1; }
"$SDKGEN" "$WORK/schema.json" "$WORK" python nodejs go

cat > "$WORK/go/go.mod" <<GOMOD
module $GO_MODULE

go 1.24

require github.com/pulumi/pulumi/sdk/v3 v$PULUMI_VERSION
GOMOD
# go.sum from the pinned versions only; GOTOOLCHAIN=local keeps the `go` line as
# written whatever Go runs this.
(cd "$WORK/go" && GOTOOLCHAIN=local GOFLAGS=-mod=mod go mod tidy >&2)

for lang in python nodejs go; do
  rm -rf "${OUT:?}/$lang"
  cp -a "$WORK/$lang" "$OUT/$lang"
done
if [[ -z "${1:-}" ]] && ! cmp -s "$WORK/schema.json" "$ROOT/schema.json"; then
  cp "$WORK/schema.json" "$ROOT/schema.json"
  echo "gen-sdk: set schema.json's version to $VERSION" >&2
fi
echo "gen-sdk: wrote $OUT/{python,nodejs,go} at version $VERSION" >&2
