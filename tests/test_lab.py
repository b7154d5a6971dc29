"""The lab itself: private stores, real activation, faults, reboot, clean stop."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import labctl
import pytest
from conftest import LAB_NET, HostFactory, Systems, current_system, http_version, in_host

pytestmark = pytest.mark.timeout(300)


def ssh_ok(host: labctl.LabHost, port: int | None = None) -> bool:
    proc = subprocess.run(
        ["ssh", "-i", host.privateKeyPath, "-p", str(port or host.port), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=3",
         f"root@{host.address}", "true"],
        capture_output=True, text=True, timeout=20,
    )
    return proc.returncode == 0


def activate(host: labctl.LabHost, system: str, action: str = "switch") -> subprocess.CompletedProcess[str]:
    labctl.copy_closure_into(host.state, system)
    if action in ("switch", "boot"):
        in_host(host, "nix-env", "-p", "/nix/var/nix/profiles/system", "--set", system)
    return in_host(host, f"{system}/bin/switch-to-configuration", action, check=False)


def test_store_is_private_until_pushed(lab_host: labctl.LabHost, systems: Systems) -> None:
    web = systems["web"]
    assert subprocess.run(["nix-store", "--check-validity", web]).returncode == 0  # built locally
    assert in_host(lab_host, "nix-store", "--check-validity", web, check=False).returncode != 0
    assert not in_host(lab_host, "test", "-e", web, check=False).returncode == 0
    labctl.copy_closure_into(lab_host.state, web)
    assert in_host(lab_host, "nix-store", "--check-validity", web).returncode == 0


def test_fresh_host_looks_like_nixos(lab_host: labctl.LabHost, systems: Systems) -> None:
    assert "ID=nixos" in in_host(lab_host, "cat", "/etc/os-release").stdout
    assert current_system(lab_host) == systems["base"]
    assert in_host(lab_host, "readlink", "/nix/var/nix/profiles/system").stdout.strip() == "system-1-link"
    assert http_version(lab_host) == "0"
    assert ssh_ok(lab_host)
    # The deployer's own /etc is untouched by the host's private one.
    assert "ID=nixos" not in Path("/etc/os-release").read_text()


def test_switch_changes_current_system_and_service(lab_host: labctl.LabHost, systems: Systems) -> None:
    res = activate(lab_host, systems["web-v2"])
    assert res.returncode == 0, res.stderr
    assert current_system(lab_host) == systems["web-v2"]
    assert http_version(lab_host) == "2"
    assert "restarting the following units: lab-service.service" in res.stderr


def test_test_action_does_not_touch_boot_entry(lab_host: labctl.LabHost, systems: Systems) -> None:
    res = activate(lab_host, systems["web"], "test")
    assert res.returncode == 0
    assert current_system(lab_host) == systems["web"]
    assert os.readlink(lab_host.state / "etc-upper/lab/boot-default") == systems["base"]


def test_dry_activate_reports_and_changes_nothing(lab_host: labctl.LabHost, systems: Systems) -> None:
    labctl.copy_closure_into(lab_host.state, systems["web-moves-ssh"])
    res = in_host(lab_host, f"{systems['web-moves-ssh']}/bin/switch-to-configuration", "dry-activate")
    assert "would restart the following units: lab-service.service, sshd.service" in res.stderr
    assert current_system(lab_host) == systems["base"]
    assert http_version(lab_host) == "0"


def test_fault_activation_fails(lab_host: labctl.LabHost, systems: Systems) -> None:
    res = activate(lab_host, systems["web-activation-fails"])
    assert res.returncode == 4
    assert "the following units failed: lab-service.service" in res.stderr


def test_fault_ssh_moves_to_another_port(lab_host: labctl.LabHost, systems: Systems) -> None:
    assert ssh_ok(lab_host)
    res = activate(lab_host, systems["web-moves-ssh"])
    assert res.returncode == 0, res.stderr
    assert not ssh_ok(lab_host), "sshd still answers on the old port"
    assert ssh_ok(lab_host, 2299)


def test_fault_http_500_and_down(new_host: HostFactory, systems: Systems) -> None:
    a, b = new_host(), new_host()
    assert activate(a, systems["web-http-500"]).returncode == 0
    import urllib.error
    import urllib.request
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://{a.address}:{a.httpPort}/", timeout=3)
    assert err.value.code == 500
    assert activate(b, systems["web-http-down"]).returncode == 0
    time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection((b.address, b.httpPort), timeout=2).close()


def test_fault_slow_activation(lab_host: labctl.LabHost, tmp_path: Path) -> None:
    from conftest import write_flake
    flake = write_flake(tmp_path / "f", """{ outputs = { self }: let lab = import ./lib.nix; in {
      nixosConfigurations.slow = lab.nixosConfiguration { version = "slow"; faults.slowActivation = 3; };
    }; }""")
    system = labctl.build_system("slow", Path(flake.removeprefix("path:")))
    started = time.monotonic()
    res = activate(lab_host, system)
    assert res.returncode == 0
    assert time.monotonic() - started >= 3
    assert "slow activation" in res.stderr


def test_reboot_boots_the_boot_default_generation(lab_host: labctl.LabHost, systems: Systems) -> None:
    assert activate(lab_host, systems["web"], "switch").returncode == 0
    assert activate(lab_host, systems["web-v2"], "boot").returncode == 0
    assert current_system(lab_host) == systems["web"]  # boot does not activate
    labctl.boot(lab_host)
    assert current_system(lab_host) == systems["web-v2"]
    assert http_version(lab_host) == "2"
    assert ssh_ok(lab_host)


def test_bare_host_is_not_nixos(new_host: HostFactory) -> None:
    host = new_host("bare")
    assert "ID=nixos" not in in_host(host, "cat", "/etc/os-release").stdout
    assert in_host(host, "test", "-e", "/nix/var/nix/profiles/system", check=False).returncode != 0
    assert ssh_ok(host)


def _clock_ticks_since_boot() -> int:
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK"))


def _running_since(pid: int, ticks: int) -> bool:
    """Whether pid is a live (not zombie) process that started at or before ticks."""
    try:
        # The command name in field 2 may hold spaces; the fields after it do not.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    state, start = fields[0], int(fields[19])
    return state != "Z" and start <= ticks


def test_five_hosts_at_once_and_stop_leaves_nothing(new_host: HostFactory, systems: Systems) -> None:
    hosts = [new_host() for _ in range(5)]
    assert all(ssh_ok(h) for h in hosts)
    assert len({h.hostKey for h in hosts}) == 5
    namespaces = [(h.state / "ns").read_text().strip() for h in hosts]
    daemons = [int((h.state / "nix-daemon.pid").read_text()) for h in hosts]
    assert len(set(namespaces)) == 5
    # Leave something running inside each host, as a crashed test would.
    for h in hosts:
        in_host(h, "sh", "-c", "setsid -f sleep 1000 >/dev/null 2>&1 </dev/null")
    # A namespace id is free for reuse once its last process is gone, and the
    # other test legs make namespaces all the time: count only the processes
    # that were in the host before it was stopped. Their start time alone is not
    # enough: a process started earlier can call unshare() later, and get the
    # freed id (a trixie leg beside bookworm saw one).
    inside = {ns: set(labctl.processes_in_namespace(ns)) for ns in namespaces}
    assert all(inside.values())
    before_stop = _clock_ticks_since_boot()
    for h in hosts:
        labctl.stop_host(h.state)
    for h, ns in zip(hosts, namespaces, strict=True):
        alive = [p for p in labctl.processes_in_namespace(ns) if p in inside[ns] and _running_since(p, before_stop)]
        assert alive == [], f"{h.name}: processes left: {alive}"
        assert not h.state.exists()
        assert str(h.state) not in Path("/proc/self/mountinfo").read_text()
        assert not ssh_ok(h)
    for pid in daemons:
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_stop_spares_a_namespace_that_took_over_the_id(lab_host: labctl.LabHost,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # Once a host's last process dies the kernel hands its namespace id to the
    # next namespace made: another host's, another test leg's.  Stopping the
    # host must not go on to kill what lives there (a CI leg once lost its
    # builds that way).  The id is reused here by looking up the bystander's
    # namespace as soon as the host's is empty.
    bystander = subprocess.Popen(["unshare", "--mount", "--", "sleep", "600"])
    try:
        own = labctl._ns_of(os.getpid())
        for _ in range(100):
            theirs = labctl._ns_of(bystander.pid)
            if theirs is not None and theirs != own:
                break
            time.sleep(0.02)
        assert theirs is not None and theirs != own
        host_ns = (lab_host.state / "ns").read_text().strip()
        lookup = labctl.processes_in_namespace
        monkeypatch.setattr(labctl, "processes_in_namespace",
                            lambda ns: lookup(ns) or (lookup(theirs) if ns == host_ns else []))
        before_stop = _clock_ticks_since_boot()
        labctl.stop_nix_daemon(lab_host.state)
        labctl.kill_namespace(lab_host.state, keep_holder=False)
        # Killed processes take a moment to be gone on a loaded machine (one in exit no longer shows its root, so
        # kill_namespace does not wait for it). (Another leg's namespace may take the id for real now: what
        # started since does not count.)
        deadline = time.monotonic() + 5
        while (left := [p for p in lookup(host_ns) if _running_since(p, before_stop)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert left == []
        assert bystander.poll() is None, "the process in the namespace that took the id was killed"
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.lab
def test_labctl_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "LAB_DIR": str(tmp_path)}
    labctl_py = str(Path(labctl.__file__))
    up = subprocess.run([sys_python(), labctl_py, "--lab-dir", str(tmp_path), "up", "--hosts", "2", "--subnet", str(LAB_NET - 1)],
                        capture_output=True, text=True, env=env, timeout=120)
    assert up.returncode == 0, up.stderr
    hosts = labctl.load_hosts(tmp_path)
    assert [h.name for h in hosts] == ["host1", "host2"]
    assert {"name", "address", "port", "user", "privateKeyPath", "hostKey", "stateDir"} <= set(hosts[0].__dict__)
    st = subprocess.run([sys_python(), labctl_py, "--lab-dir", str(tmp_path), "status"], capture_output=True, text=True)
    assert st.stdout.count(" up ") == 2 and "ssh=ok" in st.stdout
    down = subprocess.run([sys_python(), labctl_py, "--lab-dir", str(tmp_path), "down"], capture_output=True, text=True)
    assert down.returncode == 0
    assert not (tmp_path / "hosts.json").exists()


def sys_python() -> str:
    import sys
    return sys.executable
