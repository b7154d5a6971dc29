"""The deployer's Nix: its CLI, the differences between versions, evaluation, builds, closure diffs."""
