"""`pulumi-resource-nixos`: the provider plugin's entry point."""

from .pulumi_layer.grpc_modules import register_bare_parents

register_bare_parents()

from .pulumi_layer.plugin import main  # noqa: E402

if __name__ == "__main__":
    main()
