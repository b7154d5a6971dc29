"""buildHost through the real `pulumi` CLI: the build host builds, and the system goes from there to the target.

The system is new to every run (a nonce in its version), so no store has it
before: the deployer cannot have pushed what it never had. A 2 MiB package
gives the system weight, so what crossed the deployer's link shows in
pushedBytes.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import labctl
import pytest
from conftest import HostFactory, PulumiProject, current_system, in_host, write_flake
from test_provider_e2e import connection, program, strip_ansi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.built = lab.nixosConfiguration { version = "built-%s";
    packages = [ { name = "built-elsewhere"; version = "%s"; size = 2097152; } ]; };
  packages.x86_64-linux.tool = lab.mkPackage { name = "tool-built-elsewhere"; version = "%s"; size = 4096; };
  packages.x86_64-linux.tool-on-target = lab.mkPackage { name = "tool-built-there"; version = "%s"; size = 4096; };
}; }"""
PACKAGE = 2 * 1024 * 1024


def _has(host: labctl.LabHost, path: str) -> bool:
    return in_host(host, "nix-store", "--check-validity", path, check=False).returncode == 0


def test_a_build_host_builds_and_copies_to_the_target_itself(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path) -> None:
    """`direct`: the deployer sends only derivations, the build host sends the system. `relayed`: the build host
    cannot reach its target, so the deployer relays, and says so. Then a build host with another key is refused."""
    nonce = uuid.uuid4().hex[:8]
    flake = write_flake(tmp_path / "flake", FLAKE % (nonce, f"1.{nonce}", nonce, nonce))
    builder, direct, relayed = new_host(), new_host(), new_host()
    labctl.misroute(builder, relayed.address)
    # Plain text on purpose: state keeps the build host's key secret all the same.
    build_host = {"host": builder.address, "port": builder.port,
                  "privateKey": {"fn::readFile": builder.privateKeyPath}}
    resources = {name: {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"{flake}#built", "buildHost": build_host}}
        for name, host in (("direct", direct), ("relayed", relayed))}
    outputs = {f"{name}{k}": f"${{{name}.{k[0].lower() + k[1:]}}}" for name in resources
               for k in ("SystemPath", "PushedBytes", "BuildHostKey")}
    # A profile is built there too; or, with `buildOn: remote`, on its host.
    resources["tool"] = {"type": "nixos:NixProfile", "properties": {
        "connection": connection(direct), "profile": "tool", "flake": f"{flake}#tool", "buildHost": build_host}}
    resources["toolOnTarget"] = {"type": "nixos:NixProfile", "properties": {
        "connection": connection(direct), "profile": "tool2", "flake": f"{flake}#tool-on-target",
        "buildOn": "remote"}}
    outputs.update(toolStorePath="${tool.storePath}", toolBuildHostKey="${tool.buildHostKey}",
                   toolOnTargetStorePath="${toolOnTarget.storePath}")
    program(project, resources, outputs)
    project.run("stack", "init", "dev")

    res = project.up()
    out = " ".join(strip_ansi(res.stdout + res.stderr).split())
    got = project.outputs()
    system = str(got["directSystemPath"])
    assert got["relayedSystemPath"] == system == current_system(direct) == current_system(relayed)
    built = subprocess.run([*labctl.NIX, "path-info", system], capture_output=True, text=True)
    assert built.returncode != 0, "the system is in the deployer's store: it was built or copied here"
    assert _has(builder, system)
    copied = re.search(rf"root@{re.escape(direct.address)}:{direct.port} has the (\d+) paths of {system}: (\d+) it had, "
                       r"0 from its binary caches, (\d+) from the build host directly, 0 relayed by the deployer", out)
    assert copied and int(copied[3]) >= 2 and int(copied[1]) == int(copied[2]) + int(copied[3]), out
    # The deployer's link carried the derivations (a few KiB) to the build host, and nothing of the system...
    assert int(got["directPushedBytes"]) < 256 * 1024, got
    # ...except where the build host could not reach the target: there it relayed the system, and warned.
    assert int(got["relayedPushedBytes"]) > PACKAGE, got
    relay = re.search(rf"buildHost: the build host could not copy to root@{re.escape(relayed.address)}:"
                      rf"{relayed.port} \(exit \d+: [^)]*\); relaying (\d+) paths from root@"
                      rf"{re.escape(builder.address)}:{builder.port} to root@{re.escape(relayed.address)}:"
                      rf"{relayed.port} through the deployer", out)
    assert relay, out
    assert "relaying" not in out.replace(relay.group(0), ""), "the direct machine was relayed too"
    assert got["directBuildHostKey"] == got["relayedBuildHostKey"] == got["toolBuildHostKey"] == builder.hostKey
    tool = str(got["toolStorePath"])
    assert _has(builder, tool) and _has(direct, tool) and in_host(
        direct, "readlink", "-f", "/nix/var/nix/profiles/per-user/root/tool").stdout.strip() == tool
    assert subprocess.run([*labctl.NIX, "path-info", tool], capture_output=True).returncode != 0, \
        "the profile's package is in the deployer's store: it was built or copied here"
    there = str(got["toolOnTargetStorePath"])
    drv = in_host(direct, "nix-store", "--query", "--deriver", there).stdout.strip()
    assert in_host(direct, "nix-store", "--read-log", drv, check=False).returncode == 0, "not built on the host"
    assert not _has(builder, there)
    assert subprocess.run([*labctl.NIX, "path-info", there], capture_output=True).returncode != 0
    state = json.dumps(project.resource("NixosMachine"))
    key_body = Path(builder.privateKeyPath).read_text().split("\n")[1]
    assert key_body not in state and key_body not in res.stdout + res.stderr
    machine = project.resource("NixosMachine")
    for where in ("inputs", "outputs"):
        assert "ciphertext" in json.dumps(machine[where]["buildHost"]["privateKey"]), where  # type: ignore[index]

    # A new version of the package: built there again, and lastChanges says what changed, from the derivations.
    # The preview builds nothing here (buildOnPreview builds where the deployment builds), and dry-activates
    # a system built on the build host.
    write_flake(tmp_path / "flake", FLAKE % (nonce, f"2.{nonce}", nonce, nonce))
    resources["direct"]["properties"].update(dryActivate=True, buildOnPreview=True)
    program(project, resources, outputs)
    preview = strip_ansi(project.run("preview").stdout)
    assert f"built-elsewhere: 1.{nonce} → 2.{nonce}" in preview and "Traceback" not in preview, preview
    assert "would restart: lab-service.service" in preview and "dry-activate failed" not in preview, preview
    assert "for the preview (buildOnPreview)" not in preview, preview
    project.up()
    got = project.outputs()
    system = str(got["directSystemPath"])
    assert current_system(direct) == current_system(relayed) == system and int(got["directPushedBytes"]) < 256 * 1024
    assert subprocess.run([*labctl.NIX, "path-info", system], capture_output=True).returncode != 0, \
        "the preview or the up built the system here"
    last = project.resource("NixosMachine")["outputs"]["lastChanges"]  # type: ignore[index]
    assert [(c["name"], c["before"], c["after"]) for c in last["changed"]] == [  # type: ignore[index]
        ("built-elsewhere", [f"1.{nonce}"], [f"2.{nonce}"])], last

    # The build host now presents another key (pinned: buildHostKey): refused before anything is copied or built.
    (project.dir / "Pulumi.yaml").write_text((project.dir / "Pulumi.yaml").read_text().replace(
        f'"host": "{builder.address}"', f'"host": "{builder.address}", "hostKey": "{direct.hostKey}"', 2)
        .replace(f'"flake": "{flake}#built"', f'"flake": "{flake}#built", "triggers": ["again"]', 2))
    failed = project.up(check=False)
    said = " ".join(strip_ansi(failed.stdout + failed.stderr).split())
    assert failed.returncode != 0
    assert (f"cannot use the build host: host key mismatch for root@{builder.address}:{builder.port}" in said
            and "update `buildHost.hostKey`" in said), said
    assert (f"update `buildHost.hostKey`); root@{direct.address}:{direct.port} was not changed: it still runs "
            f"generation 3 ({system})") in said, said
    assert current_system(direct) == current_system(relayed) == system
    assert project.outputs()["directSystemPath"] == system
