#!/usr/bin/env bash
# `make demo`: two lab hosts, the top-level Pulumi.yaml deployed as stacks
# `staging` and `production`, a configuration change previewed with
# `pulumi preview --diff` and deployed; then a fresh machine (a bare lab host
# made by a resource) with NixOS installed in one `pulumi up`; then everything
# torn down again.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PULUMI_BACKEND_URL="file://$root/.lab/demo-state"
export PULUMI_CONFIG_PASSPHRASE=pulumi-nixos-lab   # matches the committed stack files' salt
labctl() { python tests/lab/labctl.py "$@"; }
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

install_dir="$root/.lab/demo-install"
in_install_project() {
  # The lab's nixos-anywhere stand-in comes first on PATH (tests/lab/nixos-anywhere; see docs/lab.md).
  (cd "$install_dir" && PATH="$root/tests/lab:$PATH" LAB_DIR="$root/.lab" \
    NIXOS_ANYWHERE_STANDIN_LOG="$install_dir/nixos-anywhere-calls.jsonl" "$@")
}

cleanup() {
  say "tearing down"
  if [[ -f "$install_dir/Pulumi.yaml" ]]; then
    in_install_project pulumi destroy --yes --skip-preview --non-interactive -s demo >/dev/null 2>&1 || true
    in_install_project pulumi stack rm --yes --force --non-interactive -s demo >/dev/null 2>&1 || true
  fi
  rm -rf "$install_dir"
  pulumi config rm release -s staging --non-interactive >/dev/null 2>&1 || true
  for stack in staging production; do
    pulumi destroy --yes --skip-preview --non-interactive -s "$stack" >/dev/null 2>&1 || true
    pulumi stack rm --yes --force --preserve-config --non-interactive -s "$stack" >/dev/null 2>&1 || true
  done
  labctl down
  rm -rf "$root/.lab/demo-state"
}
trap cleanup EXIT

whats_running() {
  for host in 127.0.10.1 127.0.10.2; do
    printf '  %-12s %s\n' "$host" "$(curl -s --max-time 3 "http://$host:8080/" || echo unreachable)"
  done
}

say "starting two lab hosts (NixOS-like, real sshd, private /nix)"
labctl up --hosts 2
rm -rf "$root/.lab/demo-state" && mkdir -p "$root/.lab/demo-state"
say "before: what each host's service reports"
whats_running

for stack in staging production; do
  say "pulumi up -s $stack"
  pulumi stack select --create "$stack" --non-interactive
  pulumi up --yes --skip-preview --non-interactive -s "$stack"
done
say "after the first deploy"
whats_running

say "changing staging's configuration (release web -> web-v2: nginx 1.24.0 -> 1.26.1)"
pulumi config set release web-v2 -s staging --non-interactive
pulumi preview --diff --non-interactive -s staging      # the property diff: old and new systemPath
pulumi preview --non-interactive -s staging             # per machine: package versions, size, units to restart
pulumi up --yes --skip-preview --non-interactive -s staging
say "after the staging change (production untouched)"
whats_running
labctl status

say "a fresh machine: a bare lab host (plain Debian, no NixOS) made by a resource, NixOS installed by nixos-anywhere in one pulumi up"
rm -rf "$install_dir" && mkdir -p "$install_dir"
sed "s|\.\./\.\./\.\./|$root/|g" tests/programs/lab-vm-install/Pulumi.yaml > "$install_dir/Pulumi.yaml"
cp tests/programs/lab-vm-install/__main__.py "$install_dir/"
in_install_project pulumi stack select --create demo --non-interactive
in_install_project pulumi config set labFlake "$root/tests/lab" --non-interactive
in_install_project pulumi config set labDir "$root/.lab" --non-interactive
in_install_project pulumi config set hostName vm1 --non-interactive
in_install_project pulumi config set address 127.0.10.3 --non-interactive
in_install_project pulumi config set --secret diskPassphrase demo-disk-passphrase --non-interactive
in_install_project pulumi up --yes --skip-preview --non-interactive
in_install_project pulumi stack output --non-interactive
printf '  %-12s %s\n' 127.0.10.3 "$(curl -s --max-time 3 "http://127.0.10.3:8080/" || echo unreachable)"
labctl status
