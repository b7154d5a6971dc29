"""keepGenerations and collectGarbage: through the real `pulumi` CLI, what a lab host keeps after many deploys; and
the engine's deletion, which waits for no deployment (it skips while one holds the profile's lock).

The lab's switch-to-configuration writes a boot menu of the system profile's generations (`/etc/lab/boot-entries`),
as GRUB's builder does, so the test sees the boot entries written again after generations are deleted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import labctl
import pytest
from conftest import PulumiProject, Systems, current_system, in_host, remote_for, write_flake
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.models import DeployRequest, Profile, Retention
from nixos_provider.engine.nix.cli import Nix, parse_flake_ref
from nixos_provider.engine.target import profiles
from test_provider_e2e import LAB, connection, program, strip_ansi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
PROFILE = "/nix/var/nix/profiles/system"

# Six configurations of one machine, v1 to v6: each deploy makes a generation.
FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations = builtins.listToAttrs (map (n: {
    name = "v${toString n}";
    value = lab.nixosConfiguration { hostName = "web"; version = "gen-${toString n}"; };
  }) [ 1 2 3 4 5 6 ]);
}; }"""


def generations(host: labctl.LabHost, profile: str = PROFILE) -> list[int]:
    out = in_host(host, "nix-env", "-p", profile, "--list-generations").stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.strip()]


def boot_entries(host: labctl.LabHost) -> list[int]:
    return [int(line.split()[0]) for line in in_host(host, "cat", "/etc/lab/boot-entries").stdout.splitlines()]


def is_valid_on(host: labctl.LabHost, path: str) -> bool:
    return in_host(host, "nix-store", "--check-validity", path, check=False).returncode == 0


def test_six_deploys_keep_three_generations_and_the_baseline_then_rollback_and_destroy_still_work(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems, tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "flake", FLAKE)

    def web(config: str, **props: object) -> None:
        program(project, {"web": {"type": "nixos:NixosMachine", "properties": {
            "connection": connection(lab_host), "flake": config, "keepGenerations": 3, **props}}})

    deployed: dict[int, str] = {}
    for n in range(1, 7):
        web(f"{flake}#v{n}", collectGarbage=n == 6)
        if n == 1:
            project.run("stack", "init", "dev")
        up = strip_ansi(project.up().stdout)
        deployed[n] = project.resource("NixosMachine")["outputs"]["systemPath"]
        assert current_system(lab_host) == deployed[n]
        if n == 4:  # generations 1 (the baseline) to 5: the first that goes is 2, v1's
            assert f"deleted generation 2 of {PROFILE} (keepGenerations 3, and generation 1 to return to)" in up, up
    # The baseline (1) and the newest three (v4 to v6 are generations 5 to 7); the boot menu says the same.
    assert generations(lab_host) == [1, 5, 6, 7]
    assert boot_entries(lab_host) == [1, 5, 6, 7]
    assert f"deleted generation 4 of {PROFILE}" in up
    # collectGarbage: the deleted generations' systems are gone from the host's store, the kept ones are there.
    summary = next(line for line in up.splitlines() if "garbage collection on" in line)
    assert int(summary.split("garbage collection on ")[1].split(": ")[1].split()[0]) > 0, summary
    assert not any(is_valid_on(lab_host, deployed[n]) for n in (1, 2, 3))
    assert all(is_valid_on(lab_host, deployed[n]) for n in (4, 5, 6))

    # A failed activation still rolls back to the newest generation, and leaves the kept ones alone.
    web(f"path:{LAB}#web-activation-fails")
    failed = project.up(check=False)
    assert failed.returncode != 0
    assert current_system(lab_host) == deployed[6] and generations(lab_host) == [1, 5, 6, 7]

    # The baseline is there for the destroy to return to.
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(lab_host) == systems["base"]
    assert in_host(lab_host, "readlink", PROFILE).stdout.strip() == "system-1-link"


async def test_generations_are_left_alone_while_another_deployment_holds_the_profiles_lock(
        lab_host: labctl.LabHost, systems: Systems) -> None:
    for name in ("web", "web-v2", "web-v3"):
        await engine.deploy(DeployRequest(remote_for(lab_host), systems[name]))
    assert generations(lab_host) == [1, 2, 3, 4]
    lock = profiles.deployment_lock(PROFILE)
    # As a supervisor holds it (flock -o: the lock is flock's own, so killing its group frees it).
    holder = subprocess.Popen(labctl.nsenter(lab_host.state, ["flock", "-o", lock, "sleep", "60"]),
                              start_new_session=True)
    target = await engine.open_target(remote_for(lab_host), Profile())
    try:
        deadline = time.monotonic() + 10
        while in_host(lab_host, "flock", "-n", lock, "true", check=False).returncode == 0:
            assert time.monotonic() < deadline, "the lock was never taken"
            time.sleep(0.05)
        assert not await profiles.delete_generations(target, PROFILE, [2, 3], boot_entries=True)
        assert generations(lab_host) == [1, 2, 3, 4]
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        assert await profiles.delete_generations(target, PROFILE, [2, 3], boot_entries=True)
        assert generations(lab_host) == [1, 4] and boot_entries(lab_host) == [1, 4]
        assert current_system(lab_host) == systems["web-v3"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        await target.conn.close()


async def test_a_users_profile_keeps_its_newest_generation(lab_host: labctl.LabHost) -> None:
    """NixProfile's path through the same code: alice's profile, her lock file beside it, no boot entries."""
    apps = [await Nix().build(parse_flake_ref(f"path:{labctl.LAB_FLAKE}#app-v{n}", nixos=False)) for n in (1, 2)]
    profile = Profile("/nix/var/nix/profiles/per-user/alice/app", "alice")
    said: list[str] = []
    for app in (*apps, apps[0]):
        await engine.deploy(DeployRequest(remote_for(lab_host), app, profile=profile, retention=Retention(keep=1)),
                            output=said.append)
    assert generations(lab_host, profile.path) == [3]
    assert in_host(lab_host, "readlink", "-f", profile.path).stdout.strip() == apps[0]
    assert [line for line in said if line.startswith("deleted")] == [
        f"deleted generation 1 of {profile.path} (keepGenerations 1)",
        f"deleted generation 2 of {profile.path} (keepGenerations 1)"]
