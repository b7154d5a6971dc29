#!/usr/bin/env bash
# Regenerate the Python, Node.js and Go SDKs from schema.json into sdk/ (or the
# directory given as $1). Deterministic: the same schema gives the same files.
#
# The Python and Node.js SDKs come from `pulumi package gen-sdk`, which sends the
# schema to each language host's GeneratePackage RPC (the current hosts, built
# by scripts/bootstrap-pulumi.sh from ../shared/pulumi-language-hosts/).  The Go
# SDK needs the Go language host, whose module the Go module proxy refuses
# (`go mod download github.com/pulumi/pulumi/sdk/go/pulumi-language-go/v3@v3.259.0`:
# "403 Forbidden ... This module version is not available"), so scripts/sdkgen
# makes the call that host makes, codegen/go.GeneratePackage from pkg/v3 at
# v3.259.0 (scripts/sdkgen/go.mod).  sdkgen also stands in for the Python and Node.js hosts
# where only the old ones could be built (they predate GeneratePackage), and
# says so.  It is built once into a cache directory outside the checkout, keyed
# by its sources.
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
if pulumi package gen-sdk "$WORK/schema.json" --language python --out "$WORK" 2> "$WORK/gen-sdk.log"; then
  pulumi package gen-sdk "$WORK/schema.json" --language nodejs --out "$WORK" 2>> "$WORK/gen-sdk.log" \
    || { cat "$WORK/gen-sdk.log" >&2; exit 1; }
  "$SDKGEN" "$WORK/schema.json" "$WORK" go
elif grep -q GeneratePackage "$WORK/gen-sdk.log"; then
  echo "gen-sdk: this machine's Python language host predates GeneratePackage; sdkgen makes its call" >&2
  "$SDKGEN" "$WORK/schema.json" "$WORK" python nodejs go
else
  cat "$WORK/gen-sdk.log" >&2
  exit 1
fi

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
