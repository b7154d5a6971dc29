"""pulumi-nixos: NixOS machines and Nix profiles as Pulumi resources."""

__version__ = "0.1.0"
