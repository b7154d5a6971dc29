"""A bare lab host as a resource, and NixOS installed onto it from that resource's outputs.

`LabVm` plays the cloud provider's server resource: creating it starts a bare
lab host (any Linux, no NixOS), deleting it stops the host. NixosMachine then
installs NixOS on it with nixos-anywhere, knowing the address, port, key and
host key only as outputs of the VM, exactly as with a cloud VM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi
import pulumi_nixos as nixos
from pulumi.dynamic import CreateResult, Resource, ResourceProvider


class LabVmProvider(ResourceProvider):  # type: ignore[misc]
    """Runs in Pulumi's dynamic-provider process: imports labctl from the lab directory it is given."""

    @staticmethod
    def _labctl(props: dict[str, Any]) -> Any:
        import sys

        sys.path.insert(0, props["labctl_dir"])
        import labctl

        return labctl

    def create(self, props: dict[str, Any]) -> CreateResult:
        labctl = self._labctl(props)
        host = labctl.add_host(Path(props["lab_dir"]), props["host_name"], props["address"], mode="bare")
        return CreateResult(id_=host.name, outs={
            **props,
            "ipv4_address": host.address,
            "ssh_port": host.port,
            "host_key": host.hostKey,
            "private_key": Path(host.privateKeyPath).read_text(),
        })

    def delete(self, id: str, props: dict[str, Any]) -> None:
        self._labctl(props).remove_host(Path(props["lab_dir"]), id)


class LabVm(Resource):  # type: ignore[misc]
    ipv4_address: pulumi.Output[str]
    ssh_port: pulumi.Output[int]
    host_key: pulumi.Output[str]
    private_key: pulumi.Output[str]

    def __init__(self, name: str, *, host_name: str, address: str, lab_dir: str, labctl_dir: str) -> None:
        super().__init__(
            LabVmProvider(), name,
            {"host_name": host_name, "address": address, "lab_dir": lab_dir, "labctl_dir": labctl_dir,
             "ipv4_address": None, "ssh_port": None, "host_key": None, "private_key": None},
            pulumi.ResourceOptions(additional_secret_outputs=["private_key"]),
        )


config = pulumi.Config()
lab = config.require("labFlake")  # tests/lab: the flake and labctl.py
vm = LabVm("vm", host_name=config.require("hostName"), address=config.require("address"),
           lab_dir=config.require("labDir"), labctl_dir=lab)

machine = nixos.NixosMachine(
    "machine",
    connection=nixos.ConnectionArgs(host=vm.ipv4_address, port=vm.ssh_port, user="root", private_key=vm.private_key),
    flake=f"path:{lab}#{config.get('configuration') or 'web'}",
    install=nixos.InstallArgs(
        # The lab's installer listens where the host did; a real one on 22.
        ssh_port=vm.ssh_port,
        substitute_on_destination=False,
        copy_host_keys=True,
        disk_encryption_keys={"/tmp/disk.key": config.require_secret("diskPassphrase")},
    ),
)

pulumi.export("vmHostKey", vm.host_key)
pulumi.export("hostKey", machine.host_key)
pulumi.export("systemPath", machine.system_path)
pulumi.export("generation", machine.generation)
pulumi.export("installStatus", machine.install_status)
