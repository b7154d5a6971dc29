# Sourced by make targets: puts the project's tools first on PATH and keeps
# Pulumi and Nix off the network.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$(cat "$_root/.tools/pulumi-bin"):$_root/.venv/bin:$PATH"
export PULUMI_SKIP_UPDATE_CHECK=1
export PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION=1
export PULUMI_CONFIG_PASSPHRASE="${PULUMI_CONFIG_PASSPHRASE:-pulumi-nixos-lab}"
# The Nix settings the lab needs, passed to every Nix the tests and the demo
# run (whatever /etc/nix/nix.conf says, or if there is none):
#  - no binary caches or flake registry: none is reachable here;
#  - build as root without build users: a fresh machine has no nixbld group;
#  - no build sandbox: the lab's derivations run the machine's /bin/sh.
# Lab hosts get the same settings in their own /etc/nix/nix.conf (labctl).
export NIX_CONFIG="experimental-features = nix-command flakes
substituters =
flake-registry =
build-users-group =
sandbox = false${NIX_CONFIG:+
$NIX_CONFIG}"
unset _root
