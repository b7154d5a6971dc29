"""Installing NixOS on create: a bare lab host becomes a managed machine in one `pulumi up`.

nixos-anywhere is the lab's stand-in (tests/lab/nixos-anywhere, on PATH), which
records every call; everything else is real: the pulumi CLI, the provider,
nix copy and SSH to the lab host, the host's restarts.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import labctl
import pytest
from conftest import LAB_NET, REPO, HostFactory, PulumiProject, Systems, current_system, in_host, write_flake
from test_provider_e2e import connection, program, strip_ansi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
LAB = labctl.LAB_FLAKE
DISK_PASSPHRASE = "lab-disk-passphrase-7f3a9c"
# A system no store has before the test (a nonce in its version and package).
BUILT_ELSEWHERE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.built = lab.nixosConfiguration { version = "built-%s";
    packages = [ { name = "built-elsewhere"; version = "%s"; size = 4096; } ]; };
}; }"""


def host_key_pair(tmp: Path) -> tuple[str, str]:
    key = tmp / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "installed", "-f", str(key)], check=True)
    pub = Path(f"{key}.pub").read_text().split()
    return key.read_text(), f"{pub[0]} {pub[1]}"


def use_stand_in(project: PulumiProject, lab_dir: Path, tmp: Path, fail: str | None = None) -> Path:
    """Put the stand-in first on PATH for the provider (the default `nixos-anywhere` command)."""
    log = tmp / "nixos-anywhere-calls.jsonl"
    project.env.update({
        "PATH": f"{LAB}:{os.environ['PATH']}",
        "LAB_DIR": str(lab_dir),
        "NIXOS_ANYWHERE_STANDIN_LOG": str(log),
    })
    project.env.pop("NIXOS_ANYWHERE_STANDIN_FAIL", None)
    if fail:
        project.env["NIXOS_ANYWHERE_STANDIN_FAIL"] = fail
    return log


def calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def installing_machine(host: labctl.LabHost, config: str, install: dict[str, Any], **props: Any) -> dict[str, Any]:
    return {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"path:{LAB}#{config}",
        "install": {"sshPort": host.port, "substituteOnDestination": False, **install}, **props}}


def secret(value: str) -> dict[str, str]:
    return {"fn::secret": value}


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stat(host: labctl.LabHost, path: str) -> str:
    return in_host(host, "stat", "-c", "%a %U", path).stdout.strip()


def wait_for_system(host: labctl.LabHost, system: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if in_host(host, "readlink", "/run/current-system", check=False).stdout.strip() == system:
            return
        time.sleep(0.5)
    raise AssertionError(f"{host.name} never ran {system}")


def test_bare_host_becomes_a_managed_machine_in_one_up(
        project: PulumiProject, new_host: HostFactory, lab_dir: Path, systems: Systems, tmp_path: Path) -> None:
    host = new_host("bare")
    log = use_stand_in(project, lab_dir, tmp_path)
    host_key, host_pub = host_key_pair(tmp_path)
    install = {
        "extraFiles": {"/etc/ssh/ssh_host_ed25519_key": secret(host_key),
                       "/etc/ssh/ssh_host_ed25519_key.pub": host_pub + "\n",
                       "/etc/lab/motd": "installed by pulumi-nixos\n"},
        "diskEncryptionKeys": {"/tmp/disk.key": secret(DISK_PASSPHRASE)},
    }
    outputs = {k: f"${{web.{k}}}" for k in ("systemPath", "generation", "baselineGeneration", "hostKey",
                                           "installStatus", "installedAt", "nixosVersion")}
    program(project, {"web": installing_machine(host, "web", install,
                                                healthChecks=[{"http": f"http://{host.address}:8080/"}])}, outputs)
    project.run("stack", "init", "dev")
    preview = project.run("preview")
    assert "will install NixOS with nixos-anywhere" in strip_ansi(preview.stdout)
    assert calls(log) == []  # a preview never runs nixos-anywhere
    up = project.up()
    out = project.outputs()
    web = systems["web"]
    assert out["systemPath"] == web == current_system(host)
    assert out["installStatus"] == "installed" and out["installedAt"]
    assert out["generation"] == 1 and out["baselineGeneration"] == 1
    assert out["hostKey"] == host_pub  # pinned from the key placed by extraFiles
    assert out["nixosVersion"] == "24.05.lab-1"
    assert "VARIANT_ID=installer" not in in_host(host, "cat", "/etc/os-release").stdout

    # The stand-in saw exactly the flags nixos-anywhere takes, secrets only as files.
    [call] = calls(log)
    argv = call["argv"]
    disko = subprocess.run([*labctl.NIX, "build", "--no-link", "--json",
                            f"path:{LAB}#nixosConfigurations.web.config.system.build.diskoScript"],
                           capture_output=True, text=True, check=True).stdout
    disko_path = json.loads(disko)[0]["outputs"]["out"]
    key_file, extra_dir = argv[argv.index("-i") + 1], argv[argv.index("--extra-files") + 1]
    disk_key_file = argv[argv.index("--disk-encryption-keys") + 2]
    assert argv == ["--target-host", f"root@{host.address}", "--ssh-port", "2222",
                    "--ssh-option", "ConnectTimeout=15", "--ssh-option", "ServerAliveInterval=10",
                    "--ssh-option", "ServerAliveCountMax=3", "-i", key_file,
                    "--store-paths", disko_path, web, "--post-kexec-ssh-port", "2222",
                    "--no-substitute-on-destination", "--extra-files", extra_dir,
                    "--disk-encryption-keys", "/tmp/disk.key", disk_key_file]
    private_key = Path(host.privateKeyPath).read_text()
    secrets = [DISK_PASSPHRASE, *host_key.splitlines()[1:-1], *private_key.splitlines()[1:-1]]
    assert not any(s in " ".join(argv) for s in secrets)
    assert call["files"][key_file] == {"mode": "600", "sha256": sha256(private_key)}
    assert call["files"][disk_key_file] == {"mode": "600", "sha256": sha256(DISK_PASSPHRASE)}
    extra = call["extraFiles"]
    assert extra["/etc/ssh/ssh_host_ed25519_key"] == {"mode": "600", "sha256": sha256(host_key)}
    assert extra["/etc/ssh/ssh_host_ed25519_key.pub"]["mode"] == "644"
    assert extra["/etc/lab/motd"]["mode"] == "600" and extra["/etc"] == {"mode": "755", "dir": "yes"}
    # ... and the provider removed them afterwards.
    assert not Path(key_file).exists() and not Path(extra_dir).exists() and not Path(disk_key_file).exists()

    # What arrived on the host, with which modes.
    assert stat(host, "/tmp/disk.key") == "600 root"
    assert in_host(host, "cat", "/tmp/disk.key").stdout == DISK_PASSPHRASE
    assert stat(host, "/etc/ssh/ssh_host_ed25519_key") == "600 root"
    assert stat(host, "/etc/lab/motd") == "600 root"
    assert in_host(host, "cat", "/etc/lab/motd").stdout == "installed by pulumi-nixos\n"
    assert in_host(host, "test", "-f", "/etc/lab/disko-formatted", check=False).returncode == 0

    # The phases streamed to the CLI; no secret reached the CLI or the state.
    text = strip_ansi(up.stdout + up.stderr)
    for step in ("Switching system into kexec", "Formatting hard drive with disko", "Installing NixOS", "Rebooting"):
        assert f"nixos-anywhere: {step}" in text
    export = project.run("stack", "export").stdout
    assert not any(s in text or s in export for s in secrets)

    # A later change deploys without reinstalling, also when `install` itself changes.
    install["extraFiles"]["/etc/lab/motd"] = "changed after the install\n"
    program(project, {"web": installing_machine(host, "web-v2", install)}, outputs)
    assert "nothing is reinstalled" in strip_ansi(project.run("preview").stdout)
    project.up()
    out = project.outputs()
    assert out["systemPath"] == systems["web-v2"] == current_system(host)
    assert out["generation"] == 2 and out["baselineGeneration"] == 1 and out["installStatus"] == "installed"
    assert len(calls(log)) == 1
    assert in_host(host, "cat", "/etc/lab/motd").stdout == "installed by pulumi-nixos\n"

    # onDestroy (rollback, the default) returns to the installed generation.
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(host) == web


def test_failed_reboot_phase_names_it_and_the_rerun_adopts(
        project: PulumiProject, new_host: HostFactory, lab_dir: Path, systems: Systems, tmp_path: Path) -> None:
    host = new_host("bare")
    log = use_stand_in(project, lab_dir, tmp_path, fail="reboot")
    install = {"diskEncryptionKeys": {"/tmp/disk.key": secret(DISK_PASSPHRASE)}}
    outputs = {k: f"${{web.{k}}}" for k in ("systemPath", "generation", "baselineGeneration", "installStatus")}
    program(project, {"web": installing_machine(host, "web", install, onDestroy="retain")}, outputs)
    project.run("stack", "init", "dev")
    res = project.up(check=False)
    text = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    assert "nixos-anywhere failed in the reboot phase (exit 1)" in text
    assert "Connection timed out" in text  # the tail of its output
    state = project.resource("NixosMachine")
    assert state["outputs"]["installStatus"] == "failed"
    assert state["outputs"]["installError"].startswith("reboot: ")
    assert "Traceback" not in text

    # The machine did come up with the system; the rerun must see that.
    wait_for_system(host, systems["web"])
    use_stand_in(project, lab_dir, tmp_path)
    up = project.up()
    out = project.outputs()
    assert out["installStatus"] == "adopted" and out["systemPath"] == systems["web"]
    assert out["generation"] == 1 and out["baselineGeneration"] == 1
    assert "already runs NixOS" in strip_ansi(up.stdout + up.stderr)
    assert len(calls(log)) == 1  # not installed a second time

    # onDestroy: retain leaves the machine as it is.
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(host) == systems["web"]


def test_failed_disko_phase_leaves_the_installer_and_the_rerun_installs(
        project: PulumiProject, new_host: HostFactory, lab_dir: Path, systems: Systems, tmp_path: Path) -> None:
    host = new_host("bare")
    log = use_stand_in(project, lab_dir, tmp_path)
    # No disk key: the lab's disko script refuses to format, as disko would fail to open LUKS.
    program(project, {"web": installing_machine(host, "web", {})}, {"installStatus": "${web.installStatus}"})
    project.run("stack", "init", "dev")
    res = project.up(check=False)
    text = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    assert "nixos-anywhere failed in the disko phase" in text
    assert "disko: the encryption key /tmp/disk.key is missing" in text
    assert "the host runs the NixOS installer" in text
    assert project.resource("NixosMachine")["outputs"]["installError"].startswith("disko: ")
    key_file = calls(log)[0]["argv"][calls(log)[0]["argv"].index("-i") + 1]
    assert not Path(key_file).parent.exists()  # the private files are gone after a failure too

    install = {"diskEncryptionKeys": {"/tmp/disk.key": secret(DISK_PASSPHRASE)}}
    program(project, {"web": installing_machine(host, "web", install)}, {"installStatus": "${web.installStatus}"})
    project.up()
    assert project.outputs()["installStatus"] == "installed"
    assert current_system(host) == systems["web"]
    assert len(calls(log)) == 2
    # The installer kept the host key (the kexec image carries it over) but the
    # formatted disk did not: the installed system made a new one, pinned on first use.
    state = project.resource("NixosMachine")["outputs"]
    assert state["hostKey"] != host.hostKey
    assert state["hostKey"] == " ".join(in_host(host, "cat", "/etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2])


def test_install_inputs_are_checked_before_anything_runs(project: PulumiProject) -> None:
    host = {"host": "127.0.0.1", "port": 2222}
    program(project, {})
    project.run("stack", "init", "dev")

    def problems(props: dict[str, Any]) -> str:
        program(project, {"m": {"type": "nixos:NixosMachine", "properties": {"connection": host, **props}}})
        res = project.run("preview", check=False)
        assert res.returncode != 0
        out = strip_ansi(res.stdout + res.stderr)
        assert "Traceback" not in out
        return out

    out = problems({"flake": ".#web", "install": {
        "phases": ["kexec", "disko"], "extraFiles": {"etc/motd": "x"}, "buildOn": "cloud",
        "diskEncryptionKeys": {"/tmp/../disk.key": "x"}, "sshPort": 0}})
    for prop, reason in [
        ("install.phases", "must include `install` and `reboot`"),
        ("install.extraFiles['etc/motd']", "must be a normalized absolute file path"),
        ("install.diskEncryptionKeys['/tmp/../disk.key']", "must be a normalized absolute file path"),
        ("install.buildOn", "must be one of 'auto', 'local', 'remote', not 'cloud'"),
        ("install.sshPort", "must be between 1 and 65535, not 0"),
    ]:
        assert f"property {prop} value" in out and reason in out, (prop, out)
    out = problems({"systemPath": "/nix/store/" + "a" * 32 + "-nixos-system", "install": {}})
    assert "property install.diskoScript value" in out
    assert "is required when installing from `systemPath`" in out


def test_missing_nixos_anywhere_fails_without_touching_the_host(
        project: PulumiProject, new_host: HostFactory, lab_dir: Path, tmp_path: Path) -> None:
    host = new_host("bare")
    install = {"command": [str(tmp_path / "no-such-nixos-anywhere")],
               "diskEncryptionKeys": {"/tmp/disk.key": secret(DISK_PASSPHRASE)}}
    program(project, {"web": installing_machine(host, "web", install)})
    project.run("stack", "init", "dev")
    # The provider's own temporary directory, so other runs' files never count.
    provider_tmp = tmp_path / "provider-tmp"
    provider_tmp.mkdir()
    project.env["TMPDIR"] = str(provider_tmp)
    res = project.up(check=False)
    text = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    assert f"cannot run nixos-anywhere: `{tmp_path / 'no-such-nixos-anywhere'}` was not found" in text
    assert "the host was not touched" in text
    assert in_host(host, "cat", "/etc/os-release").stdout.find("ID=debian") >= 0
    assert not any(tmp.name.startswith("pulumi-nixos-install-") for tmp in provider_tmp.iterdir())



def test_lab_program_installs_onto_a_vm_it_creates(
        project: PulumiProject, lab_dir: Path, systems: Systems, tmp_path: Path) -> None:
    """tests/programs/lab-vm-install: VM resource outputs -> NixosMachine.install, through the Python SDK."""
    src = REPO / "tests" / "programs" / "lab-vm-install"
    for f in src.iterdir():
        if f.is_file():
            (project.dir / f.name).write_text(f.read_text().replace("../../../", f"{REPO}/"))
    log = use_stand_in(project, lab_dir, tmp_path)
    project.run("stack", "init", "dev")
    address = f"127.0.{LAB_NET + 9}.1"
    for key, value in {"labFlake": str(LAB), "labDir": str(lab_dir), "hostName": "vm1", "address": address}.items():
        project.run("config", "set", key, value)
    project.run("config", "set", "--secret", "diskPassphrase", DISK_PASSPHRASE)
    try:
        project.up()
        out = project.outputs()
        host = next(h for h in labctl.load_hosts(lab_dir) if h.name == "vm1")
        assert out["installStatus"] == "installed"
        assert out["systemPath"] == systems["web"] == current_system(host) and out["generation"] == 1
        # copyHostKeys: the installed system kept the key the VM had, and the provider expected it.
        assert out["hostKey"] == out["vmHostKey"] == host.hostKey
        assert "--copy-host-keys" in calls(log)[0]["argv"]
        assert DISK_PASSPHRASE not in project.run("stack", "export").stdout
        # destroy: the machine rolls back to its baseline (the installed generation), then the VM goes.
        project.run("destroy", "--yes", "--skip-preview")
        assert not any(h.name == "vm1" for h in labctl.load_hosts(lab_dir))
        assert not labctl.wait_for_port(address, host.port, timeout=0.5)
    finally:
        labctl.stop_host(lab_dir / "hosts" / "vm1")


def test_install_built_on_the_target_from_the_flake(
        project: PulumiProject, new_host: HostFactory, lab_dir: Path, systems: Systems, tmp_path: Path) -> None:
    """install.buildOn: remote hands nixos-anywhere the flake; the target builds disko script and system."""
    host = new_host("bare")
    log = use_stand_in(project, lab_dir, tmp_path)
    install = {"buildOn": "remote", "diskEncryptionKeys": {"/tmp/disk.key": secret(DISK_PASSPHRASE)}}
    program(project, {"web": installing_machine(host, "web-v3", install)},
            {"systemPath": "${web.systemPath}", "installStatus": "${web.installStatus}"})
    project.run("stack", "init", "dev")
    up = project.up()
    out = project.outputs()
    assert out["installStatus"] == "installed"
    assert out["systemPath"] == current_system(host) == systems["web-v3"]
    [call] = calls(log)
    argv = call["argv"]
    assert argv[argv.index("--flake") + 1] == f"path:{LAB}#nixosConfigurations.web-v3.config"
    assert argv[argv.index("--build-on") + 1] == "remote" and "--store-paths" not in argv
    text = strip_ansi(up.stdout + up.stderr)
    assert "nixos-anywhere: Building the system closure" in text
    assert "nixos-anywhere: Uploading the system closure" not in text


def test_install_with_a_build_host_builds_there(
        project: PulumiProject, new_host: HostFactory, lab_dir: Path, tmp_path: Path) -> None:
    """With `buildHost`, what the deployer would build for nixos-anywhere (the system, the disko script) is built on
    the build host, then copied to the deployer, where nixos-anywhere takes it from."""
    nonce = uuid.uuid4().hex[:8]
    flake = write_flake(tmp_path / "flake", BUILT_ELSEWHERE % (nonce, nonce))
    builder, host = new_host(), new_host("bare")
    log = use_stand_in(project, lab_dir, tmp_path)
    machine = installing_machine(host, "unused", {}, buildHost={
        "host": builder.address, "port": builder.port, "privateKey": {"fn::readFile": builder.privateKeyPath}})
    machine["properties"]["flake"] = f"{flake}#built"
    program(project, {"web": machine}, {"systemPath": "${web.systemPath}", "installStatus": "${web.installStatus}"})
    project.run("stack", "init", "dev")
    up = project.up()
    out = project.outputs()
    assert out["installStatus"] == "installed" and out["systemPath"] == current_system(host)
    [call] = calls(log)
    argv = call["argv"]
    disko, system = argv[argv.index("--store-paths") + 1:argv.index("--store-paths") + 3]
    assert system == out["systemPath"]
    for path in (system, disko):
        # Built on the build host (its store keeps the build's log), not here (no log).
        deriver = in_host(builder, "nix-store", "--query", "--deriver", path, check=False)
        assert deriver.returncode == 0, f"the build host never had {path}"
        drv = deriver.stdout.strip()
        assert in_host(builder, "nix-store", "--read-log", drv, check=False).returncode == 0, path
        assert subprocess.run(["nix-store", "--read-log", drv], capture_output=True).returncode != 0, path
    said = " ".join(strip_ansi(up.stdout + up.stderr).split())
    assert f"on the build host root@{builder.address}:{builder.port}" in said, said


def test_the_stand_in_rejects_what_nixos_anywhere_rejects(tmp_path: Path) -> None:
    stand_in = str(LAB / "nixos-anywhere")
    env = {**os.environ, "NIXOS_ANYWHERE_STANDIN_LOG": str(tmp_path / "calls.jsonl")}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([stand_in, *argv], capture_output=True, text=True, env=env, timeout=30)

    # The first unknown word is the host; a second one prints the usage and exits 1.
    unknown = run("--target-host", "root@h", "--no-such-flag")
    assert unknown.returncode == 1 and unknown.stdout.startswith("Usage: nixos-anywhere [options] [<ssh-host>]")
    phase = run("--target-host", "root@h", "--phases", "kexec,format", "--flake", ".#web")
    assert phase.returncode == 1 and "aborted: Unknown phase: format" in phase.stderr
    nothing = run("--target-host", "root@h")
    assert nothing.returncode == 1 and "aborted: --flake or --store-paths must be set" in nothing.stderr
    missing = run("--target-host", "root@h", "--store-paths", "/nix/store/x")
    assert missing.returncode == 1
