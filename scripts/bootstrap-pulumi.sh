#!/usr/bin/env bash
# Build the Pulumi CLI and the language hosts this project needs, at pinned
# versions, into a cache outside the checkout (one directory per component and
# version, so a fresh clone on the same machine, or a second CLI version, builds
# only what it lacks), and print a bin directory holding all of them.
#
# Why these versions:
#  * CLI: pkg/v3 at PULUMI_VERSION, the newest the module proxy serves that
#    passes the tests; `bootstrap-pulumi.sh oldest` builds the oldest CLI the
#    tests still run one deployment on (see the README).
#  * Python and Node.js language hosts: their modules are not served by the Go
#    module proxy after v3.79.0 and v3.68.0.  Their own source at v3.259.0 sits
#    in ../shared/pulumi-language-hosts/ (or $PULUMI_LANGUAGE_HOSTS_SRC); it is
#    built from there, with everything it imports from the module proxy.  A
#    clone without it gets the last hosts the proxy serves (which lack the
#    GeneratePackage RPC that `pulumi package gen-sdk` needs), and says so.
#    pulumi-language-python-exec, the Python side of the host, comes from sdk/v3
#    at the pinned Python SDK's version so the two match.
#  * YAML language host: pulumi-yaml v1.25.0 (the `config:` project form).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

case "${1:-pinned}" in
  pinned) PULUMI_VERSION="${PULUMI_VERSION:-3.276.0}" ;;
  oldest) PULUMI_VERSION=3.259.0 ;;
  *) echo "usage: bootstrap-pulumi.sh [pinned|oldest]" >&2; exit 2 ;;
esac
PYTHON_SDK_VERSION="$(sed -n 's/^ *"pulumi==\([0-9.]*\)",$/\1/p' "$ROOT/provider/pyproject.toml")"
HOSTS_SOURCE_VERSION=3.259.0
HOSTS_SOURCE="${PULUMI_LANGUAGE_HOSTS_SRC:-$ROOT/../shared/pulumi-language-hosts/v$HOSTS_SOURCE_VERSION}"
LEGACY_PYTHON_HOST=3.79.0
LEGACY_NODEJS_HOST=3.68.0
PULUMI_YAML_VERSION="${PULUMI_YAML_VERSION:-1.25.0}"

CACHE_ROOT="${PULUMI_NIXOS_CACHE:-$HOME/.cache/pulumi-nixos}/pulumi"
log() { echo "bootstrap-pulumi: $*" >&2; }

if [[ -f "$HOSTS_SOURCE/sdk/python/cmd/pulumi-language-python/main.go" ]]; then
  HOSTS_KEY="hosts-v$HOSTS_SOURCE_VERSION-$(cd "$HOSTS_SOURCE" && find sdk -type f | sort | xargs sha256sum | sha256sum | cut -c1-12)"
else
  HOSTS_KEY="hosts-legacy-py$LEGACY_PYTHON_HOST-node$LEGACY_NODEJS_HOST"
  log "no language-host source at $HOSTS_SOURCE: using the Python v$LEGACY_PYTHON_HOST and Node.js" \
    "v$LEGACY_NODEJS_HOST hosts (programs run; \`pulumi package gen-sdk\` needs the current ones)"
fi
CLI_DIR="$CACHE_ROOT/cli-v$PULUMI_VERSION"
HOSTS_DIR="$CACHE_ROOT/$HOSTS_KEY"
YAML_DIR="$CACHE_ROOT/yaml-v$PULUMI_YAML_VERSION"
SDK_SCRIPTS_DIR="$CACHE_ROOT/python-sdk-scripts-v$PYTHON_SDK_VERSION"
BIN="$CACHE_ROOT/bin-cli-v${PULUMI_VERSION}_${HOSTS_KEY}_yaml-v${PULUMI_YAML_VERSION}_py-v$PYTHON_SDK_VERSION"

# One build at a time: a second caller waits and then finds the stamps.
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.lock"
flock 9

if [[ -f "$BIN/.complete" ]]; then echo "$BIN"; exit 0; fi

command -v go >/dev/null || { log "Go is required to build the Pulumi CLI"; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export GOFLAGS=-mod=mod
export CGO_ENABLED=0
PULUMI_LDFLAGS="-s -w -X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version"

# component DIR: true when DIR was built before (its stamp is there).
component() { [[ -f "$1/.complete" ]]; }
finish() { touch "$1/.complete"; }

build() { # build MODULE-DIR OUTPUT PACKAGE LDFLAGS
  log "building $(basename "$2") ($3)"
  (cd "$1" && go mod download >&2 && go build -trimpath -ldflags "$4" -o "$2" "$3" >&2)
}

build_in_module() { # build_in_module NAME OUTPUT PACKAGE LDFLAGS GO.MOD-BODY
  local dir="$WORK/$1"
  mkdir -p "$dir"
  printf 'module pulumi-nixos.local/build/%s\n\ngo 1.24\n\n%s\n' "$1" "$5" > "$dir/go.mod"
  build "$dir" "$2" "$3" "$4"
}

if ! component "$CLI_DIR"; then
  mkdir -p "$CLI_DIR"
  build_in_module cli "$CLI_DIR/pulumi" github.com/pulumi/pulumi/pkg/v3/cmd/pulumi "$PULUMI_LDFLAGS=v$PULUMI_VERSION" \
"require (
	github.com/pulumi/pulumi/pkg/v3 v$PULUMI_VERSION
	github.com/pulumi/pulumi/sdk/v3 v$PULUMI_VERSION
)
replace github.com/atotto/clipboard => github.com/tgummerer/clipboard v0.0.0-20241001131231-d02d263e614e"
  finish "$CLI_DIR"
fi

if ! component "$HOSTS_DIR"; then
  mkdir -p "$HOSTS_DIR"
  if [[ $HOSTS_KEY == hosts-v* ]]; then
    for lang in python nodejs; do
      cp -r "$HOSTS_SOURCE/sdk/$lang/cmd/pulumi-language-$lang" "$WORK/lang-$lang"
      build "$WORK/lang-$lang" "$HOSTS_DIR/pulumi-language-$lang" . "$PULUMI_LDFLAGS=v$HOSTS_SOURCE_VERSION"
    done
  else
    for spec in python:$LEGACY_PYTHON_HOST nodejs:$LEGACY_NODEJS_HOST; do
      lang=${spec%%:*} version=${spec#*:}
      build_in_module "lang-$lang" "$HOSTS_DIR/pulumi-language-$lang" \
        "github.com/pulumi/pulumi/sdk/v3/$lang/cmd/pulumi-language-$lang" "$PULUMI_LDFLAGS=v$version" \
        "require github.com/pulumi/pulumi/sdk/v3 v$version"
    done
  fi
  finish "$HOSTS_DIR"
fi

if ! component "$YAML_DIR"; then
  mkdir -p "$YAML_DIR"
  build_in_module lang-yaml "$YAML_DIR/pulumi-language-yaml" github.com/pulumi/pulumi-yaml/cmd/pulumi-language-yaml \
    "-s -w -X github.com/pulumi/pulumi-yaml/pkg/version.Version=v$PULUMI_YAML_VERSION" \
    "require github.com/pulumi/pulumi-yaml v$PULUMI_YAML_VERSION"
  finish "$YAML_DIR"
fi

# The Python host runs pulumi-language-python-exec next to itself, and
# pulumi-resource-pulumi-python serves Python dynamic providers (the lab
# programs' tiny resources): both are scripts in the SDK module.
if ! component "$SDK_SCRIPTS_DIR"; then
  mkdir -p "$SDK_SCRIPTS_DIR"
  sdk_dir="$(cd "$WORK" && GOFLAGS= go mod download -json "github.com/pulumi/pulumi/sdk/v3@v$PYTHON_SDK_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  install -m 0755 "$sdk_dir/python/cmd/pulumi-language-python-exec" "$SDK_SCRIPTS_DIR/"
  install -m 0755 "$sdk_dir/python/dist/pulumi-resource-pulumi-python" "$SDK_SCRIPTS_DIR/"
  finish "$SDK_SCRIPTS_DIR"
fi

rm -rf "$BIN"
mkdir -p "$BIN"
for dir in "$CLI_DIR" "$HOSTS_DIR" "$YAML_DIR" "$SDK_SCRIPTS_DIR"; do
  for tool in "$dir"/*; do ln "$tool" "$BIN/"; done
done
finish "$BIN"
echo "$BIN"
