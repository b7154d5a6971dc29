# The lab's stand-in for a nixpkgs tree, for configurations without a flake:
# `import <nixpkgs> { }` gives the lab's library and a few package specs.
{ ... }:
{
  lab = import ../lib.nix;
  nginx = { name = "nginx"; version = "1.25.5"; size = 65536; };
  openssl = { name = "openssl"; version = "3.0.13"; size = 131072; };
}
