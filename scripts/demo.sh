#!/usr/bin/env bash
# `make demo`: two lab hosts, the top-level Pulumi.yaml deployed as stacks
# `staging` and `production`, a configuration change previewed with
# `pulumi preview --diff` and deployed, then everything torn down again.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export PULUMI_BACKEND_URL="file://$root/.lab/demo-state"
export PULUMI_CONFIG_PASSPHRASE=pulumi-nixos-lab   # matches the committed stack files' salt
labctl() { python tests/lab/labctl.py "$@"; }
say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

cleanup() {
  say "tearing down"
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
