#!/usr/bin/env bash
# Build the Pulumi CLI and the language hosts this project needs from the Go
# module proxy, at pinned versions, into a per-version cache directory outside
# the checkout, so a fresh clone on the same machine finds them again.
#
# Why these versions:
#  * CLI: pkg/v3 at PULUMI_VERSION, the same version as the pinned Python SDK.
#  * Python and Node.js language hosts: their Go sources left the sdk/v3 module
#    (after v3.79.0 and v3.68.0; they became untagged nested modules that the
#    module proxy does not serve), so they are built from the last sdk/v3 that
#    holds them.  The language-host protocol is backwards compatible;
#    pulumi-language-python-exec, the Python side of the host, comes from
#    sdk/v3 at PULUMI_VERSION so it matches the Python SDK.
#  * YAML language host: the newest pulumi-yaml the proxy serves.
set -euo pipefail

PULUMI_VERSION="${PULUMI_VERSION:-3.259.0}"
PYTHON_HOST_SDK_VERSION="${PYTHON_HOST_SDK_VERSION:-3.79.0}"
NODEJS_HOST_SDK_VERSION="${NODEJS_HOST_SDK_VERSION:-3.68.0}"
PULUMI_YAML_VERSION="${PULUMI_YAML_VERSION:-1.19.1}"

CACHE_ROOT="${PULUMI_NIXOS_CACHE:-$HOME/.cache/pulumi-nixos}"
KEY="pulumi-${PULUMI_VERSION}_py-${PYTHON_HOST_SDK_VERSION}_node-${NODEJS_HOST_SDK_VERSION}_yaml-${PULUMI_YAML_VERSION}"
DEST="$CACHE_ROOT/$KEY/bin"
STAMP="$CACHE_ROOT/$KEY/.complete"

# pulumi-resource-pulumi-python serves Python dynamic providers (the lab
# programs' tiny resources); it ships in the SDK module at the CLI's version.
# Checked apart from the stamp, so caches built before it was added get it.
DYNAMIC_PROVIDER="$DEST/pulumi-resource-pulumi-python"
install_python_sdk_scripts() {
  local sdk_dir
  sdk_dir="$(cd "${1:-/tmp}" && GOFLAGS= go mod download -json "github.com/pulumi/pulumi/sdk/v3@v${PULUMI_VERSION}" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  install -m 0755 "$sdk_dir/python/cmd/pulumi-language-python-exec" "$DEST/pulumi-language-python-exec"
  install -m 0755 "$sdk_dir/python/dist/pulumi-resource-pulumi-python" "$DYNAMIC_PROVIDER"
}

# One build at a time: a second caller waits and then finds the stamp.
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.$KEY.lock"
flock 9

if [[ -f "$STAMP" ]]; then
  [[ -x "$DYNAMIC_PROVIDER" ]] || install_python_sdk_scripts
  echo "$DEST"
  exit 0
fi

command -v go >/dev/null || { echo "bootstrap-pulumi: Go is required to build the Pulumi CLI" >&2; exit 1; }

mkdir -p "$DEST"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

log() { echo "bootstrap-pulumi: $*" >&2; }

build_in_module() {
  # build_in_module NAME OUTPUT PACKAGE LDFLAGS GO.MOD-BODY
  local name="$1" out="$2" pkg="$3" ldflags="$4" body="$5"
  local dir="$WORK/$name"
  mkdir -p "$dir"
  printf 'module pulumi-nixos.local/build/%s\n\ngo 1.24\n\n%s\n' "$name" "$body" > "$dir/go.mod"
  log "building $name ($pkg)"
  (cd "$dir" && go mod download >&2 && go build -trimpath -ldflags "$ldflags" -o "$out" "$pkg" >&2)
}

if [[ ! -x "$DEST/pulumi" ]]; then
  build_in_module cli "$DEST/pulumi" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi \
    "-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v${PULUMI_VERSION}" \
"require (
	github.com/pulumi/pulumi/pkg/v3 v${PULUMI_VERSION}
	github.com/pulumi/pulumi/sdk/v3 v${PULUMI_VERSION}
)
replace github.com/atotto/clipboard => github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e"
fi

build_langhost() { # build_langhost LANG SDK_VERSION
  local lang="$1" version="$2"
  if [[ ! -x "$DEST/pulumi-language-$lang" ]]; then
    build_in_module "lang-$lang" "$DEST/pulumi-language-$lang" \
      "github.com/pulumi/pulumi/sdk/v3/$lang/cmd/pulumi-language-$lang" \
      "-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=v${version}" \
      "require github.com/pulumi/pulumi/sdk/v3 v${version}"
  fi
}
build_langhost python "$PYTHON_HOST_SDK_VERSION"
build_langhost nodejs "$NODEJS_HOST_SDK_VERSION"

if [[ ! -x "$DEST/pulumi-language-yaml" ]]; then
  build_in_module lang-yaml "$DEST/pulumi-language-yaml" \
    github.com/pulumi/pulumi-yaml/cmd/pulumi-language-yaml \
    "-s -w -X github.com/pulumi/pulumi-yaml/pkg/version.Version=v${PULUMI_YAML_VERSION}" \
    "require github.com/pulumi/pulumi-yaml v${PULUMI_YAML_VERSION}"
fi

# The Python host runs pulumi-language-python-exec next to itself; take it
# from the SDK module at the CLI's version so it matches the pinned Python SDK.
install_python_sdk_scripts "$WORK"

touch "$STAMP"
echo "$DEST"
