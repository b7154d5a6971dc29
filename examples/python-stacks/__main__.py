"""A NixOS machine per stack: the stack's config names the host, its key (a secret) and the release."""

import pulumi
import pulumi_nixos as nixos

config = pulumi.Config()
host = config.require("host")
release = config.get("release") or "web"

web = nixos.NixosMachine(
    "web",
    connection=nixos.ConnectionArgs(
        host=host,
        port=config.get_int("port") or 22,
        private_key=config.require_secret("privateKey"),
    ),
    flake=f"{config.get('flake') or '../../tests/lab'}#{release}",
    health_checks=[nixos.HealthCheckArgs(http=f"http://{host}:8080/", retries=5)],
    confirm_timeout=20,
)

pulumi.export("systemPath", web.system_path)
pulumi.export("generation", web.generation)
pulumi.export("nixosVersion", web.nixos_version)
