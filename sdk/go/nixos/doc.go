// Deploy NixOS machines and Nix profiles over SSH, with pinned host keys, magic rollback, health checks and preview diffs.
package nixos
