"""pulumi-nixos: NixOS machines and Nix profiles as Pulumi resources."""

from importlib.metadata import version

# From the installed distribution's metadata, whose version is provider/pyproject.toml's:
# the one place the version is written (scripts/version.sh).
__version__ = version("pulumi-nixos-provider")
