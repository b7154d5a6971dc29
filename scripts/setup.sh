#!/usr/bin/env bash
# One idempotent bootstrap for a fresh Debian machine (run as root):
#   Debian packages -> Python venv (.venv) -> Pulumi CLI and language hosts.
# A rerun costs seconds: each step checks before it works.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

DEB_PACKAGES=(nix-bin openssh-server openssh-client sudo iproute2 util-linux procps curl git
             systemd-container debootstrap)  # systemd lab hosts: systemd-nspawn of a debootstrapped root
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
echo "setup: pulumi $("$pulumi_dir/pulumi" version) in $pulumi_dir ($(( $(date +%s) - started ))s)"
