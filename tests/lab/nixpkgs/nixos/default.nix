# The lab's stand-in for <nixpkgs/nixos>, called as nixos-rebuild calls the
# real one: `configuration` is the path of a configuration.nix. Here that file
# is a function of { pkgs, ... } giving the arguments of a lab system
# (hostName, version, packages, ...), so the result has the shape of a NixOS
# evaluation: config.system.build.toplevel, built without nixpkgs.
{ configuration ? import <nixos-config>, system ? builtins.currentSystem }:
let
  pkgs = import ../default.nix { };
  module = if builtins.isPath configuration || builtins.isString configuration then import configuration else configuration;
  settings = if builtins.isFunction module then module { inherit pkgs; } else module;
in
pkgs.lab.nixosConfiguration settings
