"""Deployments to lab hosts that boot with systemd as PID 1 (systemd-nspawn of a Debian root).

Every real NixOS host runs systemd, so there the supervisor runs in its own
transient unit (`systemd-run`), the lab service is a real unit and sshd is
Debian's ssh.service, restarted through systemctl.  See docs/lab.md.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import labctl
import pytest
from conftest import LAB_NET, HostFactory, PulumiProject, Systems, current_system, http_version, in_host, remote_for
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.errors import DeployError
from nixos_provider.engine.models import DeployRequest, Profile
from nixos_provider.engine.nix.cli import Nix
from test_engine import current_gen, deploy, gens
from test_provider_e2e import machine, program, strip_ansi

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.timeout(600),
    pytest.mark.skipif(labctl.systemd_unavailable() is not None,
                       reason=f"systemd lab hosts cannot run here: {labctl.systemd_unavailable()}"),
]
SUPERVISOR_UNIT = re.compile(r"pulumi-nixos-[0-9a-f]{16}-activate\.service")


@pytest.fixture
def sd_host(new_host: HostFactory) -> labctl.LabHost:
    return new_host("systemd")


def unit_state(host: labctl.LabHost, unit: str) -> str:
    """What `systemctl is-active UNIT` says on the host (active, failed, inactive, ...)."""
    return in_host(host, "systemctl", "is-active", unit, check=False).stdout.strip()


def journal(host: labctl.LabHost, *match: str) -> str:
    """The host's journal for this boot (e.g. `-u UNIT`), one message per line."""
    return in_host(host, "journalctl", "--no-pager", "-b", "-o", "cat", *match, check=False).stdout


def listening_ports(host: labctl.LabHost) -> set[int]:
    """The TCP ports the host's own sshd listens on (the network is the machine's,
    but -p names only processes in the host's PID namespace)."""
    out = in_host(host, "ss", "-Hltnp", check=False).stdout
    local = [(line.split()[3], line) for line in out.splitlines()]
    return {int(addr.rsplit(":", 1)[1]) for addr, line in local
            if addr.startswith(f"{host.address}:") and '"sshd' in line}


async def test_switch_under_systemd_runs_the_supervisor_in_its_own_unit(sd_host: labctl.LabHost,
                                                                         systems: Systems) -> None:
    assert in_host(sd_host, "readlink", "/proc/1/exe").stdout.strip().endswith("/systemd")
    result = await deploy(sd_host, systems["web"])
    assert current_system(sd_host) == systems["web"]
    assert unit_state(sd_host, "lab-service.service") == "active"
    assert http_version(sd_host) == "1"
    assert result.generation == current_gen(sd_host) == 2
    # The service runs from the new system, in its own unit's cgroup.
    main_pid = in_host(sd_host, "systemctl", "show", "-P", "MainPID", "lab-service.service").stdout.strip()
    cmdline = in_host(sd_host, "cat", f"/proc/{main_pid}/cmdline").stdout
    assert systems["web"] in cmdline
    # The supervisor ran as a transient unit of systemd (systemd-run), not
    # under setsid inside the SSH session's cgroup, and --collect removed it.
    units = set(SUPERVISOR_UNIT.findall(journal(sd_host)))
    assert len(units) == 1, f"expected one pulumi-nixos-*-activate.service in the journal, found {units}"
    unit = units.pop()
    log = journal(sd_host, "-u", unit)
    assert "Started" in log and unit.removesuffix(".service") in log
    assert in_host(sd_host, "systemctl", "list-units", "--all", "--no-legend", "pulumi-nixos-*").stdout.strip() == ""


async def test_destroy_rollback_runs_in_its_own_unit_and_restarts_the_service(sd_host: labctl.LabHost,
                                                                               systems: Systems) -> None:
    await deploy(sd_host, systems["web"])
    await deploy(sd_host, systems["web-v2"])
    now = await engine.rollback_to(remote_for(sd_host), Profile(), 2)
    assert now.current_system == current_system(sd_host) == systems["web"] and current_gen(sd_host) == 2
    assert unit_state(sd_host, "lab-service.service") == "active" and http_version(sd_host) == "1"
    units = set(re.findall(r"pulumi-nixos-[0-9a-f]{16}-rollback-to\.service", journal(sd_host)))
    assert len(units) == 1, f"expected one pulumi-nixos-*-rollback-to.service in the journal, found {units}"
    assert in_host(sd_host, "systemctl", "list-units", "--all", "--no-legend", "pulumi-nixos-*").stdout.strip() == ""


async def test_magic_rollback_survives_the_ssh_service_restart(sd_host: labctl.LabHost, systems: Systems) -> None:
    await deploy(sd_host, systems["web"])
    ssh_pid = in_host(sd_host, "systemctl", "show", "-P", "MainPID", "ssh.service").stdout.strip()
    with pytest.raises(DeployError) as err:
        await deploy(sd_host, systems["web-moves-ssh"], confirm_timeout=4)
    msg = str(err.value)
    assert "magic rollback" in msg and "Rolled back: generation 2" in msg, msg
    assert err.value.rolled_back
    # ssh.service was restarted on 2299 by the new generation, then back on
    # 2222 by the rollback the supervisor did from its own unit.
    ssh_log = journal(sd_host, "-u", "ssh.service")
    assert f"Server listening on {sd_host.address} port 2299." in ssh_log
    assert ssh_log.rindex("port 2222.") > ssh_log.index("port 2299.")
    # One supervisor unit, alive from before the move to after the move back.
    log = journal(sd_host)
    unit = SUPERVISOR_UNIT.findall(log)[-1]
    started, ended = log.index(f"Started {unit.removesuffix('.service')}"), log.rindex(unit)
    assert started < log.index("port 2299.") < log.rindex("port 2222.") < ended
    assert unit_state(sd_host, "ssh.service") == "active"
    assert in_host(sd_host, "systemctl", "show", "-P", "MainPID", "ssh.service").stdout.strip() != ssh_pid
    assert listening_ports(sd_host) == {2222}
    assert current_system(sd_host) == systems["web"]
    assert current_gen(sd_host) == 2 and gens(sd_host) == [1, 2]
    assert http_version(sd_host) == "1"
    state = await engine.read_state(remote_for(sd_host), Profile())
    assert state.current_system == systems["web"] and state.generation is not None and state.generation.number == 2


async def test_failed_unit_exits_4_and_rolls_back(sd_host: labctl.LabHost, systems: Systems) -> None:
    await deploy(sd_host, systems["web-v2"])
    with pytest.raises(DeployError) as err:
        await deploy(sd_host, systems["web-activation-fails"])
    msg = str(err.value)
    assert "activation exited with status 4" in msg and "Rolled back: generation 2" in msg, msg
    # What systemd says about the failed unit reaches the user in the activation output.
    assert "warning: the following units failed: lab-service.service" in msg
    assert "lab-service.service: Failed with result 'exit-code'." in msg
    assert "refusing to start: this configuration is broken" in msg
    # On the host: the unit really failed, then the rollback started the old one.
    service_log = journal(sd_host, "-u", "lab-service.service")
    assert "refusing to start: this configuration is broken" in service_log
    assert "Failed to start lab-service.service" in service_log
    assert unit_state(sd_host, "lab-service.service") == "active"
    assert in_host(sd_host, "systemctl", "is-failed", "--quiet", "lab-service.service", check=False).returncode != 0
    assert current_system(sd_host) == systems["web-v2"]
    assert current_gen(sd_host) == 2 and gens(sd_host) == [1, 2]
    assert http_version(sd_host) == "2"


async def test_reboot_boots_the_boot_default_generation(sd_host: labctl.LabHost, systems: Systems) -> None:
    await deploy(sd_host, systems["web"], action="switch")
    await deploy(sd_host, systems["web-v2"], action="boot")
    assert current_system(sd_host) == systems["web"] and http_version(sd_host) == "1"
    assert current_gen(sd_host) == 3
    boot_id = in_host(sd_host, "cat", "/proc/sys/kernel/random/boot_id").stdout
    labctl.boot(sd_host)  # the container restart: systemd boots again
    assert in_host(sd_host, "cat", "/proc/sys/kernel/random/boot_id").stdout != boot_id
    assert current_system(sd_host) == systems["web-v2"]
    assert in_host(sd_host, "readlink", "/run/booted-system").stdout.strip() == systems["web-v2"]
    assert unit_state(sd_host, "lab-boot.service") == "active"
    assert unit_state(sd_host, "lab-service.service") == "active"
    assert http_version(sd_host) == "2"
    # The store and the profile are the disk's: they survived the restart.
    assert current_gen(sd_host) == 3 and gens(sd_host) == [1, 2, 3]
    state = await engine.read_state(remote_for(sd_host), Profile())
    assert state.host_key == sd_host.hostKey and state.current_system == systems["web-v2"]
    assert state.nixos_version == "24.05.lab-2"


async def test_cancel_during_activation_rolls_back(sd_host: labctl.LabHost, systems: Systems) -> None:
    await deploy(sd_host, systems["web"])
    seen: list[str] = []
    dep = engine.Deployment(DeployRequest(remote_for(sd_host), systems["web-slow"], confirm_timeout=3), Nix(),
                            status=seen.append)
    task = asyncio.create_task(dep.run())
    while not any(s.startswith("activating") for s in seen) and not task.done():
        await asyncio.sleep(0.05)
    assert not task.done()
    # The supervisor runs in its own unit, so cancelling (as a cancelled
    # `pulumi up` does) cannot kill it halfway: the deployer tells it to roll
    # back now and waits until it has.
    running = in_host(sd_host, "systemctl", "list-units", "--no-legend", "--state=active", "pulumi-nixos-*").stdout
    assert SUPERVISOR_UNIT.search(running), running
    task.cancel()
    with pytest.raises(DeployError, match=r"the deployment was cancelled\. Rolled back: generation 2"):
        await task
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not in_host(sd_host, "systemctl", "list-units", "--no-legend", "pulumi-nixos-*").stdout.strip():
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail("the supervisor unit did not finish")
    assert current_system(sd_host) == systems["web"]
    assert in_host(sd_host, "readlink", "/nix/var/nix/profiles/system").stdout.strip() == "system-2-link"
    assert gens(sd_host) == [1, 2]
    assert http_version(sd_host) == "1"
    assert unit_state(sd_host, "lab-service.service") == "active"
    state = await engine.read_state(remote_for(sd_host), Profile(), with_generations=True)
    assert state.current_system == systems["web"]
    assert state.generation is not None and state.generation.number == 2
    assert state.generation.store_path == systems["web"]
    assert [g.number for g in state.generations] == [1, 2]


async def test_push_across_nix_versions(new_host: HostFactory, systems: Systems) -> None:
    """The deployer's Nix and the target's differ: older to newer in the bookworm and trixie legs
    (2.8 or 2.26 to sid's 2.34), newer to older in the sid leg (2.34 to trixie's 2.26)."""
    deployer = subprocess.run(["nix-store", "--version"], text=True, capture_output=True, check=True).stdout.split()[-1]
    host = new_host("systemd", release="trixie" if deployer.startswith("2.34.") else "sid")
    target = in_host(host, "nix-store", "--version").stdout.split()[-1]
    print(f"deployer Nix {deployer} -> target Nix {target}")
    assert deployer != target and re.fullmatch(r"2\.(8|26|34)\.\d+", target), (deployer, target)
    result = await deploy(host, systems["web"])
    assert result.push.paths == 4 and result.push.bytes > 0
    closure = [p.path for p in await Nix().closure(systems["web"])]
    assert in_host(host, "nix-store", "--check-validity", *closure, check=False).returncode == 0
    assert in_host(host, "nix-store", "--verify-path", systems["web"], check=False).returncode == 0
    assert current_system(host) == systems["web"] and current_gen(host) == 2
    assert unit_state(host, "lab-service.service") == "active" and http_version(host) == "1"
    assert "24.05.lab-1" in in_host(host, "cat", "/etc/os-release").stdout


@pytest.mark.e2e
def test_pulumi_up_on_a_systemd_host(project: PulumiProject, sd_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": machine(sd_host, "web", confirmTimeout=10,
                                     healthChecks=[{"http": f"http://{sd_host.address}:8080/"}])},
            {"systemPath": "${web.systemPath}", "generation": "${web.generation}"})
    project.run("stack", "init", "dev")
    project.up()
    assert project.outputs() == {"systemPath": systems["web"], "generation": 2}
    assert current_system(sd_host) == systems["web"] and unit_state(sd_host, "lab-service.service") == "active"
    # A broken configuration: the unit fails, the deploy fails, the host rolls back.
    program(project, {"web": machine(sd_host, "web-activation-fails", confirmTimeout=10)},
            {"systemPath": "${web.systemPath}", "generation": "${web.generation}"})
    failed = project.up(check=False)
    out = strip_ansi(failed.stdout + failed.stderr)
    assert failed.returncode != 0
    assert "activation exited with status 4" in out and "Rolled back: generation 2" in out, out
    assert "warning: the following units failed: lab-service.service" in out
    assert current_system(sd_host) == systems["web"] and http_version(sd_host) == "1"
    assert unit_state(sd_host, "lab-service.service") == "active"
    # The state says what runs on the host.
    outputs = project.resource("NixosMachine")["outputs"]
    assert isinstance(outputs, dict)
    assert outputs["systemPath"] == systems["web"] and outputs["generation"] == 2
    project.run("refresh", "--yes", "--skip-preview")
    assert project.resource("NixosMachine")["outputs"]["systemPath"] == systems["web"]  # type: ignore[index]


def up_until_activating(project: PulumiProject, host: labctl.LabHost) -> subprocess.Popen[str]:
    """`pulumi up` started in the background, returned once the host's supervisor unit runs the activation (its
    state file says so: the unit itself starts before the generation is registered)."""
    up = subprocess.Popen(["pulumi", "--non-interactive", "up", "--yes", "--skip-preview"], cwd=project.dir,
                          env=project.env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not SUPERVISOR_UNIT.search(
            in_host(host, "systemctl", "list-units", "--no-legend", "--state=active", "pulumi-nixos-*").stdout
    ) or not in_host(host, "sh", "-c", "cat /tmp/pulumi-nixos.*/state", check=False).stdout.startswith("activating"):
        if up.poll() is not None or time.monotonic() > deadline:
            up.kill()
            out, _ = up.communicate()
            pytest.fail(f"activation never started:\n{out}")
        time.sleep(0.2)
    return up


@pytest.mark.e2e
def test_interrupted_pulumi_up_leaves_host_and_state_at_the_old_system(
        project: PulumiProject, sd_host: labctl.LabHost, systems: Systems) -> None:
    outputs = {"systemPath": "${web.systemPath}", "generation": "${web.generation}"}
    program(project, {"web": machine(sd_host, "web")}, outputs)
    project.run("stack", "init", "dev")
    project.up()
    program(project, {"web": machine(sd_host, "web-slow", confirmTimeout=3)}, outputs)
    up = up_until_activating(project, sd_host)
    try:
        # Interrupt while the supervisor's unit runs the slow activation, as ^C would.
        up.send_signal(signal.SIGINT)
        out, _ = up.communicate(timeout=120)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode != 0, strip_ansi(out)
    # Nobody confirms the new system: its supervisor rolls the host back by itself.
    deadline = time.monotonic() + 20 + 3 + 30
    while in_host(sd_host, "systemctl", "list-units", "--no-legend", "pulumi-nixos-*").stdout.strip():
        assert time.monotonic() < deadline, "the supervisor unit did not finish"
        time.sleep(0.5)
    assert current_system(sd_host) == systems["web"] and gens(sd_host) == [1, 2]
    assert http_version(sd_host) == "1"
    # The state never ran ahead of the host, and a refresh reads the same.
    assert project.outputs() == {"systemPath": systems["web"], "generation": 2}
    project.run("refresh", "--yes", "--skip-preview")
    state_outputs = project.resource("NixosMachine")["outputs"]
    assert isinstance(state_outputs, dict)
    assert state_outputs["systemPath"] == systems["web"] and state_outputs["generation"] == 2


def reboot_during_activation(project: PulumiProject, host: labctl.LabHost, systems: Systems) -> str:
    """Deploy web, then web-slow (a 20 s activation), and restart the machine 3 s into that activation. It boots
    its boot default, the new system. The `pulumi up` must notice when the host answers again, roll it back to
    the confirmed generation, say so, and record what runs. Returns how long from the restart to the end of the
    `pulumi up` (the lab's boot of the new system takes its 20 s activation)."""
    outputs = {"systemPath": "${web.systemPath}", "generation": "${web.generation}"}
    program(project, {"web": machine(host, "web")}, outputs)
    project.run("stack", "select", "--create", "dev")
    project.up()
    before = gens(host)
    program(project, {"web": machine(host, "web-slow", confirmTimeout=3)}, outputs)
    up = up_until_activating(project, host)
    try:
        time.sleep(3)
        restarted = time.monotonic()
        labctl.boot(host)
        out, _ = up.communicate(timeout=300)
        took = time.monotonic() - restarted
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    out = strip_ansi(out)
    current, new = before[-1], before[-1] + 1
    assert up.returncode != 0, out
    assert "rebooted during the deployment (its boot id changed)" in out, out
    assert f"It came back on generation {new} ({systems['web-slow']}), unconfirmed" in out, out
    assert (f"Rolled back: generation {current} ({systems['web']}) is running; generation {new} was removed"
            in out), out
    assert "keeps running and rolls back by itself" not in out
    # The magic rollback promise held across the reboot: the host is back on the confirmed generation.
    assert current_system(host) == systems["web"] and gens(host) == before
    assert http_version(host) == "1"
    assert project.outputs() == {"systemPath": systems["web"], "generation": current}
    project.run("refresh", "--yes", "--skip-preview", "--expect-no-changes")
    return f"{took:.1f} s"


def test_a_reboot_during_activation_is_noticed_at_once_and_rolled_back(
        project: PulumiProject, sd_host: labctl.LabHost, systems: Systems) -> None:
    took = reboot_during_activation(project, sd_host, systems)
    # Noticed once the host answers again (the deployer used to poll until its deadline, 290 s away).
    assert float(took.split()[0]) < 120, took


@pytest.mark.lab
def test_labctl_command_line_for_systemd_hosts(tmp_path: Path) -> None:
    labctl_cmd = [sys.executable, str(Path(labctl.__file__)), "--lab-dir", str(tmp_path)]
    up = subprocess.run([*labctl_cmd, "up", "--hosts", "2", "--mode", "systemd", "--subnet", str(LAB_NET + 8)],
                        capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stderr
    try:
        hosts = labctl.load_hosts(tmp_path)
        assert [(h.mode, h.release) for h in hosts] == [("systemd", "trixie")] * 2
        status = subprocess.run([*labctl_cmd, "status"], capture_output=True, text=True).stdout
        assert status.count(" systemd up ") == 2 and status.count("ssh=ok") == 2, status
        inits = [labctl.container_init_pid(h.state) for h in hosts]
        cgroups = [Path(json.loads((h.state / "nspawn.json").read_text())["cgroup"]) for h in hosts]
        assert all(c.is_dir() for c in cgroups) and len(set(cgroups)) == 2
        reboot = subprocess.run([*labctl_cmd, "reboot", "host1"], capture_output=True, text=True, timeout=120)
        assert reboot.returncode == 0, reboot.stderr
        assert labctl.container_init_pid(hosts[0].state) not in (None, inits[0])
        assert labctl.container_init_pid(hosts[1].state) == inits[1]
        assert current_system(hosts[0]) == labctl.build_system("base")
    finally:
        down = subprocess.run([*labctl_cmd, "down"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "hosts.json").exists()
    for host, cgroup in zip(hosts, cgroups, strict=True):
        assert not host.state.exists() and not cgroup.exists()
        assert not labctl.wait_for_port(host.address, host.port, timeout=0.5)
    assert nspawns_for(tmp_path) == []


def nspawns_for(lab_dir: Path) -> list[int]:
    """systemd-nspawn processes still running a host of lab_dir (zombies have no command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn") and any(str(lab_dir).encode() in a for a in argv):
            found.append(int(entry.name))
    return found
