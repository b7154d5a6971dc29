#!/usr/bin/env bash
# One idempotent bootstrap for a fresh Debian machine (run as root):
#   Debian packages -> Python venv (.venv) -> Pulumi CLI and language hosts
#   -> the trixie and sid roots whose Nix versions the test matrix runs.
# Nothing here configures the machine's Nix: the settings the lab needs are
# passed to Nix by scripts/env.sh and written into each lab host by labctl, so
# no nixbld group and no /etc/nix/nix.conf are needed.
# A rerun costs seconds: each step checks before it works.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

DEB_PACKAGES=(nix-bin openssh-server openssh-client sudo iproute2 util-linux procps curl git
              debootstrap systemd-container zstd)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then echo "setup: installing packages needs root" >&2; exit 1; fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
stamp=.venv/.installed
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
if [[ ! -f $stamp || provider/pyproject.toml -nt $stamp || sdk/python/setup.py -nt $stamp ]]; then
  echo "setup: installing the provider, the Python SDK and test tools into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e 'provider[dev]' -e sdk/python
  touch "$stamp"
fi

# typescript and @pulumi/pulumi, to type-check the generated TypeScript SDK.
bash scripts/setup-node.sh >/dev/null

pulumi_dir=$(bash scripts/bootstrap-pulumi.sh)
mkdir -p .tools
printf '%s\n' "$pulumi_dir" > .tools/pulumi-bin
echo "setup: pulumi $("$pulumi_dir/pulumi" version) in $pulumi_dir"
# The oldest CLI the tests deploy with (tests/test_provider_e2e.py).
oldest_dir=$(bash scripts/bootstrap-pulumi.sh oldest)
printf '%s\n' "$oldest_dir" > .tools/pulumi-bin-oldest
echo "setup: the oldest supported pulumi, $("$oldest_dir/pulumi" version), in $oldest_dir"

# Nix 2.26 and 2.34 for the test matrix and the lab's systemd hosts; built
# side by side on first use (mostly waiting on downloads), cached after.
pids=()
for release in trixie sid; do
  bash scripts/release-root.sh "$release" > ".tools/root-$release" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { echo "setup: building a Debian root failed" >&2; exit 1; }; done
for release in trixie sid; do
  root="$(cat ".tools/root-$release")"
  echo "setup: $release root with $(cat "$root/.nix-version") in $root"
done
echo "setup: done in $(( $(date +%s) - started ))s"
