"""The programs in examples/, run from a copy through the real `pulumi` CLI against lab hosts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import labctl
import pytest
from conftest import (
    REPO,
    HostFactory,
    PulumiProject,
    Systems,
    current_system,
    has_provider_traceback,
    http_version,
    in_host,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
EXAMPLES = REPO / "examples"


def copy_example(name: str, project: PulumiProject) -> None:
    """Copy an example into the project directory and run it with this checkout's provider.

    The example names no plugin path (a user's engine downloads the released plugin; that path is
    tests/test_dist.py's); here `plugins.providers` points the engine at provider/ instead."""
    shutil.copytree(EXAMPLES / name, project.dir, dirs_exist_ok=True)
    # Without the package declaration (the released plugin's version): for a versioned package, the
    # YAML host caches the schema beside the plugin path, schema-nixos.json in this checkout's root.
    shutil.rmtree(project.dir / "sdks", ignore_errors=True)
    manifest = project.dir / "Pulumi.yaml"
    text = manifest.read_text()
    assert "plugins:" not in text
    manifest.write_text(text + f"plugins:\n  providers:\n    - name: nixos\n      path: {REPO / 'provider'}\n")


def test_yaml_single_host(project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    copy_example("yaml-single-host", project)
    project.run("stack", "init", "dev")
    for key, value in {"host": lab_host.address, "port": str(lab_host.port), "keyPath": lab_host.privateKeyPath,
                       "flake": f"path:{labctl.LAB_FLAKE}#web",
                       "healthUrl": f"http://{lab_host.address}:{lab_host.httpPort}/"}.items():
        project.run("config", "set", key, value)
    up = project.up()
    # pulumi-yaml warns of a root-level `configuration:` block on every run; the example uses `config:`.
    assert "deprecated" not in up.stdout + up.stderr
    outputs = project.outputs()
    assert outputs["systemPath"] == systems["web"] == current_system(lab_host)
    assert outputs["generation"] == 2 and outputs["baselineGeneration"] == 1
    assert http_version(lab_host) == "1"
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(lab_host) == systems["base"]


def test_yaml_projects_declare_config_as_pulumi_yaml_wants() -> None:
    """The demo's and the examples' projects: `config:`, which pulumi-yaml 1.25 reads without a deprecation warning."""
    projects = [REPO / "Pulumi.yaml", *EXAMPLES.glob("*/Pulumi.yaml"), *(REPO / "tests").glob("**/Pulumi.yaml")]
    yaml_projects = [p for p in projects if "runtime: yaml" in p.read_text()]
    assert REPO / "Pulumi.yaml" in yaml_projects and len(yaml_projects) >= 2
    for project in yaml_projects:
        assert not re.search(r"^configuration:", project.read_text(), re.M), project


def test_automation_promote_stops_at_staging_and_promotes_what_passed(
        project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    copy_example("automation-promote", project)
    hosts = {"staging": new_host(), "production": new_host()}
    for stack, host in hosts.items():
        project.run("stack", "init", stack)
        for key, value in {"host": host.address, "port": str(host.port), "keyPath": host.privateKeyPath,
                           "flake": f"path:{labctl.LAB_FLAKE}", "httpPort": str(host.httpPort)}.items():
            project.run("config", "set", key, value)

    def promote(release: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "promote.py", release], cwd=project.dir, env=project.env, text=True,
                              capture_output=True, timeout=600)

    done = promote("web-v2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"promoted web-v2: staging and production run {systems['web-v2']}" in done.stdout
    assert current_system(hosts["staging"]) == current_system(hosts["production"]) == systems["web-v2"]
    # Staging deploys but answers HTTP 500: production is not touched, and the message says what it runs.
    stopped = promote("web-http-500")
    assert stopped.returncode == 1
    assert (f"promotion stopped: staging failed its smoke check: http://{hosts['staging'].address}:"
            f"{hosts['staging'].httpPort}/ answered HTTP 500\nproduction was not touched: it runs web-v2 "
            f"({systems['web-v2']})") in stopped.stderr, stopped.stderr
    assert current_system(hosts["staging"]) == systems["web-http-500"]
    # Staging's deployment fails (and rolls back): the same.
    stopped = promote("web-activation-fails")
    assert stopped.returncode == 1
    assert "promotion stopped: `pulumi up` of staging at web-activation-fails failed:\nerror: " in stopped.stderr
    assert "activation" in stopped.stderr, stopped.stderr
    assert f"production was not touched: it runs web-v2 ({systems['web-v2']})" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert current_system(hosts["staging"]) == systems["web-http-500"]
    assert current_system(hosts["production"]) == systems["web-v2"]


def copy_python_example(name: str, project: PulumiProject) -> None:
    """Copy a Python example into the project directory, pointing its virtualenv and provider at this checkout."""
    for f in (EXAMPLES / name).iterdir():
        if f.is_file():
            shutil.copy(f, project.dir / f.name)
    text = (project.dir / "Pulumi.yaml").read_text()
    text = text.replace("../../.venv", str(REPO / ".venv")).replace("../../provider", str(REPO / "provider"))
    (project.dir / "Pulumi.yaml").write_text(text)


def test_python_stacks_example(project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    copy_python_example("python-stacks", project)
    staging, production = new_host(), new_host()
    for stack, host, release in (("staging", staging, "web-v2"), ("production", production, "web")):
        project.run("stack", "init", stack)
        project.run("config", "set", "host", host.address)
        project.run("config", "set", "flake", str(REPO / "tests" / "lab"))
        project.run("config", "set", "--secret", "privateKey", "--", Path(host.privateKeyPath).read_text())
        project.up()
        assert project.outputs()["systemPath"] == systems[release] == current_system(host)
    key_line = Path(staging.privateKeyPath).read_text().splitlines()[1]
    assert key_line not in (project.dir / "Pulumi.staging.yaml").read_text()
    assert key_line not in project.run("stack", "export").stdout



def _system_link(host: labctl.LabHost) -> str:
    """The system profile's generation link on the host (system-N-link): which generation it runs."""
    return in_host(host, "readlink", "/nix/var/nix/profiles/system").stdout.strip()


def test_canary_rollout_halts_when_the_canary_fails_then_rolls_the_fleet(
        project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    copy_python_example("canary-rollout", project)
    hosts = [new_host() for _ in range(4)]  # waves: [canary], [1, 2], [3]
    project.run("stack", "init", "dev")
    for i, host in enumerate(hosts):
        project.run("config", "set", "--path", f"hosts[{i}]", host.address)
    project.run("config", "set", "port", str(hosts[0].port))
    project.run("config", "set", "flake", str(REPO / "tests" / "lab"))
    project.run("config", "set", "--secret", "privateKey", "--", Path(hosts[0].privateKeyPath).read_text())
    project.up()
    assert project.outputs()["waves"] == [[hosts[0].address], [hosts[1].address, hosts[2].address],
                                          [hosts[3].address]]
    assert all(current_system(h) == systems["web"] for h in hosts)
    before = [_system_link(h) for h in hosts]
    assert before == ["system-2-link"] * 4

    # A release whose service answers 500: the canary fails its health check.
    project.run("config", "set", "release", "web-http-500")
    failed = project.up(check=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0
    assert "web-0" in out and "health check" in out, out
    assert not has_provider_traceback(out)
    # The canary rolled back to what it ran.
    assert current_system(hosts[0]) == systems["web"]
    assert http_version(hosts[0]) == "1"
    # The later waves were never touched: same generation, same system.
    assert [_system_link(h) for h in hosts[1:]] == before[1:]
    assert all(current_system(h) == systems["web"] for h in hosts[1:])
    assert all(in_host(h, "test", "-e", "/nix/var/nix/profiles/system-3-link", check=False).returncode != 0
               for h in hosts[1:])

    # Fixed: the next up rolls the whole fleet, wave by wave.
    project.run("config", "set", "release", "web-v2")
    project.up()
    assert all(current_system(h) == systems["web-v2"] for h in hosts)
    assert all(http_version(h) == "2" for h in hosts)
    outputs = project.outputs()
    assert outputs["wave0"] == [systems["web-v2"]] and outputs["wave2"] == [systems["web-v2"]]

@pytest.mark.systemd
@pytest.mark.skipif(labctl.systemd_unavailable() is not None,
                    reason=f"systemd lab hosts cannot run here: {labctl.systemd_unavailable()}")
def test_canary_rollout_reboots_wave_after_wave(project: PulumiProject, new_host: HostFactory,
                                                systems: Systems) -> None:
    copy_python_example("canary-rollout", project)
    hosts = [new_host("systemd") for _ in range(3)]  # waves: [canary], [1, 2]
    project.run("stack", "init", "dev")
    for i, host in enumerate(hosts):
        project.run("config", "set", "--path", f"hosts[{i}]", host.address)
    project.run("config", "set", "port", str(hosts[0].port))
    project.run("config", "set", "flake", str(REPO / "tests" / "lab"))
    project.run("config", "set", "--secret", "privateKey", "--", Path(hosts[0].privateKeyPath).read_text())
    project.run("config", "set", "reboot", "ifNeeded")
    project.up()  # `web` has base's kernel: switched, no reboot

    def booted_at(host: labctl.LabHost) -> str:  # when the boot loader chose what runs (the machine's clock)
        return in_host(host, "stat", "-c", "%y", "/run/booted-system").stdout.strip()

    first = [booted_at(h) for h in hosts]
    project.run("config", "set", "release", "web-kernel")
    project.up()
    boots = [booted_at(h) for h in hosts]
    assert all(a != b for a, b in zip(first, boots, strict=True))  # each host rebooted
    assert all(in_host(h, "readlink", "/run/booted-system").stdout.strip() == systems["web-kernel"] for h in hosts)
    assert boots[0] < min(boots[1:]), boots  # the canary's wave first, then the next wave
    assert [_system_link(h) for h in hosts] == ["system-3-link"] * 3


def _node_modules_with_sdk(tmp: Path) -> Path:
    """node_modules for a TypeScript program: the cached tools plus the compiled generated SDK."""
    tools = Path(subprocess.run(["bash", str(REPO / "scripts" / "setup-node.sh")], check=True,
                                capture_output=True, text=True).stdout.strip()) / "node_modules"
    sdk_src = tmp / "sdk-src"
    shutil.copytree(REPO / "sdk" / "nodejs", sdk_src)
    (sdk_src / "node_modules").symlink_to(tools)
    subprocess.run([str(tools / ".bin" / "tsc"), "-p", "tsconfig.json"], cwd=sdk_src, check=True,
                   capture_output=True, text=True, timeout=300)
    modules = tmp / "node_modules"
    modules.mkdir()
    for entry in tools.iterdir():
        if entry.name != ".bin":
            (modules / entry.name).symlink_to(entry)
    (modules / ".bin").symlink_to(tools / ".bin")
    (modules / "@pulumi-nixos").mkdir()
    sdk = modules / "@pulumi-nixos" / "nixos"
    shutil.copytree(sdk_src / "bin", sdk)
    shutil.copy(REPO / "sdk" / "nodejs" / "package.json", sdk / "package.json")
    return modules


def test_typescript_fleet_example(project: PulumiProject, new_host: HostFactory, systems: Systems,
                                  tmp_path: Path) -> None:
    src = REPO / "examples" / "typescript-fleet"
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, project.dir / f.name)
    text = (project.dir / "Pulumi.yaml").read_text().replace("../../provider", str(REPO / "provider"))
    (project.dir / "Pulumi.yaml").write_text(text)
    modules = _node_modules_with_sdk(tmp_path)
    (project.dir / "node_modules").symlink_to(modules)
    hosts = [new_host() for _ in range(3)]
    project.run("stack", "init", "dev")
    for i, host in enumerate(hosts):
        project.run("config", "set", "--path", f"hosts[{i}]", host.address)
    project.run("config", "set", "port", "2222")
    project.run("config", "set", "flake", str(REPO / "tests" / "lab"))
    project.run("config", "set", "--secret", "privateKey", "--", Path(hosts[0].privateKeyPath).read_text())
    project.up()
    out = project.outputs()
    assert out["systemPaths"] == [systems["web"]] * 3
    assert all(current_system(h) == systems["web"] for h in hosts)
    assert out["appGeneration"] == 1 and str(out["appStorePath"]).endswith("-app-1.0.0")


@pytest.mark.lab
def test_cloud_vm_install_typechecks(tmp_path: Path) -> None:
    """examples/cloud-vm-install needs a cloud account, so it is only type-checked: no lab, no `pulumi` CLI."""
    program = tmp_path / "cloud-vm-install"
    shutil.copytree(EXAMPLES / "cloud-vm-install", program)
    modules = _node_modules_with_sdk(tmp_path)
    (program / "node_modules").symlink_to(modules)
    result = subprocess.run([str(modules / ".bin" / "tsc"), "--noEmit", "-p", "tsconfig.json"], cwd=program,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"tsc failed:\n{result.stdout}{result.stderr}"
