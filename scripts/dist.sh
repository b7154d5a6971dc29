#!/usr/bin/env bash
# `make dist`: the release artifacts, all at the version scripts/version.sh prints, into
# dist/ (or the directory given as $1):
#   pulumi-resource-nixos-vX.Y.Z-linux-amd64.tar.gz   the provider plugin
#   pulumi_nixos-X.Y.Z-py3-none-any.whl, pulumi_nixos-X.Y.Z.tar.gz   the Python SDK
#   pulumi-nixos-nixos-X.Y.Z.tgz                        the Node.js SDK (npm pack)
#   goproxy/                                            the Go SDK module, laid out as a
#                                                       module proxy serves it (GOPROXY=file://...)
#
# The plugin archive carries its Python libraries, installed for each CPython in
# PYTHON_VERSIONS (default 3.11 to 3.14) and manylinux (glibc 2.28+) x86_64: lib/cpXY/
# holds the provider and everything it imports, so the archive runs offline on any
# linux-amd64 machine with one of those Pythons, and installing it downloads nothing more.
# docs/distribution.md says why it is built this way.
#
# Everything is built from copies in a scratch directory: the checkout gains no build/,
# egg-info or node_modules.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)"
VERSION="$(bash "$ROOT/scripts/version.sh")"
PYTHON_VERSIONS="${PYTHON_VERSIONS:-3.11 3.12 3.13 3.14}"
PY="$ROOT/.venv/bin/python"
GO_MODULE="github.com/pulumi-nixos/pulumi-nixos/sdk/go"
# Reproducible archives: fixed times, owners and order.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}"
started=$(date +%s)

[[ -x "$PY" ]] || { echo "dist: no .venv; run \`make setup\` first" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# -- the provider plugin -------------------------------------------------------
cp -a "$ROOT/provider" "$WORK/provider-src"
rm -rf "$WORK/provider-src/build" "$WORK"/provider-src/*.egg-info
"$PY" -m pip wheel -q --no-deps --wheel-dir "$WORK/wheels" "$WORK/provider-src"
provider_wheel=("$WORK"/wheels/pulumi_nixos_provider-"$VERSION"-*.whl)

plugin="$WORK/plugin"
mkdir -p "$plugin/lib"
# pip expands none of these for another machine, so each manylinux level is named.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux2010 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
for v in $PYTHON_VERSIONS; do
  tree="$plugin/lib/cp${v/./}"
  echo "dist: the provider and its libraries for CPython $v" >&2
  "$PY" -m pip install -q --no-compile --target "$tree" --implementation cp --python-version "$v" \
    --only-binary=:all: "${platforms[@]}" "${provider_wheel[0]}"
  # Console scripts whose #! names this machine's Python, and debugpy: pulumi lists it for
  # debugging programs, and a provider never imports it (a third of the size).
  rm -rf "$tree/bin" "$tree/debugpy" "$tree"/debugpy-*.dist-info
  # Bytecode for the Pythons this machine has: without it every launch from a read-only
  # install (and the first from any other) compiles the provider and its libraries, about
  # a second on a slow machine, on every `pulumi preview`. unchecked-hash pycs do not
  # depend on file times (the archive's are fixed) and are never rechecked: the tree is
  # never edited in place. A tree whose Python is missing here compiles on its first run.
  if "python$v" -c "" >/dev/null 2>&1; then
    "python$v" -m compileall -q -j 0 --invalidation-mode unchecked-hash "$tree" >/dev/null
  fi
done
cp "$ROOT/provider/pulumi-resource-nixos" "$ROOT/schema.json" "$plugin/"
chmod 755 "$plugin/pulumi-resource-nixos"
archive="$OUT/pulumi-resource-nixos-v$VERSION-linux-amd64.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
  -C "$plugin" -cf - pulumi-resource-nixos schema.json lib | gzip -n > "$archive.tmp"
mv "$archive.tmp" "$archive"
echo "dist: $(basename "$archive") ($(du -h "$archive" | cut -f1))" >&2

# -- the Python SDK ------------------------------------------------------------
cp -a "$ROOT/sdk/python" "$WORK/sdk-python"
cp "$ROOT/README.md" "$WORK/sdk-python/README.md"   # the package's long description
rm -f "$OUT"/pulumi_nixos-*.whl "$OUT"/pulumi_nixos-*.tar.gz
"$PY" -m build --sdist --wheel --outdir "$OUT" "$WORK/sdk-python" >"$WORK/build.log" 2>&1 \
  || { cat "$WORK/build.log" >&2; exit 1; }
echo "dist: pulumi_nixos-$VERSION wheel and sdist" >&2

# -- the Node.js SDK -----------------------------------------------------------
node_tools="$(bash "$ROOT/scripts/setup-node.sh")"
cp -a "$ROOT/sdk/nodejs" "$WORK/sdk-nodejs"
ln -s "$node_tools/node_modules" "$WORK/sdk-nodejs/node_modules"
(cd "$WORK/sdk-nodejs" && "$node_tools/node_modules/.bin/tsc" -p tsconfig.json)
# The package is the compiled tree with the manifest beside it, as Pulumi's own SDKs ship.
cp "$WORK/sdk-nodejs/package.json" "$ROOT/README.md" "$WORK/sdk-nodejs/bin/"
rm -f "$OUT"/pulumi-nixos-nixos-*.tgz
(cd "$WORK/sdk-nodejs/bin" && npm pack --silent --pack-destination "$OUT" >/dev/null)
echo "dist: pulumi-nixos-nixos-$VERSION.tgz" >&2

# -- the Go SDK ----------------------------------------------------------------
# Released by the tag sdk/go/vX.Y.Z on the repository; here also laid out as a module
# proxy serves it, so `GOPROXY=file://.../dist/goproxy,...` resolves the version offline.
"$PY" "$ROOT/scripts/go-module-zip.py" "$ROOT/sdk/go" "$GO_MODULE" "v$VERSION" "$OUT/goproxy" >/dev/null
echo "dist: Go module $GO_MODULE@v$VERSION in $OUT/goproxy" >&2
echo "dist: done in $(( $(date +%s) - started ))s" >&2
