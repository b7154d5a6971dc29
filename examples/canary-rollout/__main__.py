"""A fleet rolled out in waves: the canaries first, then batches of `batchSize` machines.

Each machine of a wave depends on every machine of the wave before it, so
Pulumi starts a wave only when the previous one is deployed and healthy. When
a machine fails (its activation or a health check), it rolls itself back,
`pulumi up` fails, and the later waves are never touched: they keep running
the release they had. Fix the release, run `pulumi up` again, and the whole
fleet rolls forward, wave by wave.
"""

from collections.abc import Sequence
from typing import TypeVar

import pulumi
import pulumi_nixos as nixos

T = TypeVar("T")


def waves(hosts: Sequence[T], canaries: int, batch_size: int) -> list[list[T]]:
    """The hosts in rollout order: `canaries` hosts alone, then batches of `batch_size`."""
    if canaries < 0 or batch_size < 1:
        raise ValueError("canaries must be 0 or more and batchSize 1 or more")
    first, rest = list(hosts[:canaries]), list(hosts[canaries:])
    batches = [rest[i:i + batch_size] for i in range(0, len(rest), batch_size)]
    return ([first] if first else []) + batches


config = pulumi.Config()
hosts: list[str] = config.require_object("hosts")
release = config.get("release") or "web"
flake = config.get("flake") or "../../tests/lab"
port = config.get_int("port") or 22
private_key = config.require_secret("privateKey")
# `ifNeeded`: a wave whose new kernel needs one reboots into it once, and keeps it only once it booted and passed its
# health checks; the next wave starts after that.
reboot = config.get("reboot") or "never"

previous_wave: list[nixos.NixosMachine] = []
rollout: list[list[str]] = []
for number, wave in enumerate(waves(hosts, config.get_int("canaries") or 1, config.get_int("batchSize") or 2)):
    machines = [
        nixos.NixosMachine(
            f"web-{hosts.index(host)}",
            connection=nixos.ConnectionArgs(host=host, port=port, private_key=private_key),
            flake=f"{flake}#{release}",
            # Fetched on the target itself: the new release must answer, or the
            # machine returns to its previous generation.
            health_checks=[nixos.HealthCheckArgs(http=f"http://{host}:8080/", retries=3, interval=1)],
            confirm_timeout=20,
            reboot=reboot,
            opts=pulumi.ResourceOptions(depends_on=previous_wave),
        )
        for host in wave
    ]
    rollout.append(wave)
    previous_wave = machines
    pulumi.export(f"wave{number}", [m.system_path for m in machines])

pulumi.export("waves", rollout)
