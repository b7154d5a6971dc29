"""pulumi-nixos: NixOS machines and Nix profiles as Pulumi resources."""

import functools


@functools.cache
def provider_version() -> str:
    """The installed distribution's version: provider/pyproject.toml's, the one place it is written
    (scripts/version.sh). Read when first asked, not at import: reading metadata scans sys.path,
    which would slow the plugin's start."""
    from importlib.metadata import version
    return version("pulumi-nixos-provider")
