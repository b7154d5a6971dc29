# Sourced by make targets: puts the project's tools first on PATH and keeps
# Pulumi and Nix off the network.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$(cat "$_root/.tools/pulumi-bin"):$_root/.venv/bin:$PATH"
export PULUMI_SKIP_UPDATE_CHECK=1
export PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION=1
export PULUMI_CONFIG_PASSPHRASE="${PULUMI_CONFIG_PASSPHRASE:-pulumi-nixos-lab}"
# No binary caches or flake registry are reachable here; do not wait on them.
export NIX_CONFIG="${NIX_CONFIG:-substituters =
flake-registry =}"
unset _root
