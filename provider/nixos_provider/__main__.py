"""`pulumi-resource-nixos`: the provider plugin's entry point."""

from .pulumi_layer.server import main

if __name__ == "__main__":
    main()
