"""Issue 13: the defects found under faults and hostile input, each through the real parts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import labctl
import pytest
from conftest import PulumiProject, Systems, current_system, in_host, remote_for
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.errors import EngineError, HostBusy
from nixos_provider.engine.models import DeployRequest, HealthCheck
from test_provider_e2e import PROVIDER_DIR, machine, program, strip_ansi

pytestmark = [pytest.mark.timeout(600)]

# Each payload, were it ever pasted into a shell, creates its marker file on the target.
HOSTILE_HOSTS = {
    "/tmp/pwned-semicolon": "127.0.0.1/80; touch /tmp/pwned-semicolon; echo",
    "/tmp/pwned-dollar": "$(touch /tmp/pwned-dollar)",
    "/tmp/pwned-backtick": "`touch /tmp/pwned-backtick`",
}


def exists_on(host: labctl.LabHost, path: str) -> bool:
    return in_host(host, "test", "-e", path, check=False).returncode == 0


# -- 1. shell injection through a health check -------------------------------------


async def test_a_hostile_health_check_host_is_never_executed_by_the_engine(lab_host: labctl.LabHost) -> None:
    for marker, host in HOSTILE_HOSTS.items():
        check = HealthCheck(tcp=lab_host.httpPort, host=host, retries=0, timeout=3)
        with pytest.raises(EngineError, match="connection refused or timed out"):
            await engine.check_health(remote_for(lab_host), (check,))
        assert not exists_on(lab_host, marker), f"{host!r} was executed on the target"
    # The probe itself still works on a real host and port.
    await engine.check_health(remote_for(lab_host), (HealthCheck(tcp=lab_host.httpPort, host=lab_host.address),))


def test_check_refuses_a_hostile_health_check_host(project: PulumiProject, lab_host: labctl.LabHost) -> None:
    checks = [{"tcp": lab_host.httpPort, "host": host} for host in HOSTILE_HOSTS.values()]
    program(project, {"web": machine(lab_host, "web", healthChecks=checks)})
    project.run("stack", "init", "dev")
    res = project.up(check=False)
    out = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    for i in range(len(checks)):
        assert f"property healthChecks[{i}].host value" in out, out
    assert "is not a host name or IP address" in out
    assert "Traceback" not in out
    for marker in HOSTILE_HOSTS:
        assert not exists_on(lab_host, marker)
    # Refused before anything reached the host: it still runs its first generation.
    assert in_host(lab_host, "readlink", "/nix/var/nix/profiles/system").stdout.strip() == "system-1-link"




# -- 3. nothing after a confirmed deploy turns it into a failure ------------------------


def test_a_failure_after_confirmation_still_records_what_runs(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems, tmp_path: Path) -> None:
    # The deployer's nix, with a real fault switched on by a file: it cannot
    # read the old system's closure. lastChanges needs it only after the new
    # system is confirmed; the push and everything before need nix as usual.
    broken = tmp_path / "old-closure-unreadable"
    wrapper = tmp_path / "nix"
    wrapper.write_text(f"""#!/bin/sh
if [ -e {broken} ]; then
  case " $* " in *" path-info "*)
    for a in "$@"; do
      if [ "$a" = "{systems['web']}" ]; then echo "error: cannot read the closure of $a" >&2; exit 1; fi
    done
  esac
fi
exec nix "$@"
""")
    wrapper.chmod(0o755)
    program(project, {"web": machine(lab_host, "web")}, {"systemPath": "${web.systemPath}"})
    project.run("stack", "init", "dev")
    project.run("config", "set", "nixos:nixCommand", json.dumps([str(wrapper)]))
    project.up()
    assert current_system(lab_host) == systems["web"]
    broken.touch()
    program(project, {"web": machine(lab_host, "web-v2")}, {"systemPath": "${web.systemPath}"})
    up = project.up(check=False)
    out = strip_ansi(up.stdout + up.stderr)
    assert up.returncode == 0, out
    assert "is deployed and confirmed" in out and "cannot read the closure" in out
    assert current_system(lab_host) == systems["web-v2"]
    state = project.resource("NixosMachine")["outputs"]
    assert state["systemPath"] == systems["web-v2"] and state["generation"] == 3  # type: ignore[index]
    refresh = strip_ansi(project.run("refresh", "--yes", "--skip-preview").stdout)
    assert "updated" not in refresh and "unchanged" in refresh


# -- 4. `pulumi import` yields code that changes nothing -----------------------------------


def test_import_by_id_generates_code_that_previews_and_ups_with_no_change(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    header = {"name": "imp", "runtime": "yaml",
              "plugins": {"providers": [{"name": "nixos", "path": PROVIDER_DIR}]}}
    (project.dir / "Pulumi.yaml").write_text(json.dumps(header))
    project.run("stack", "init", "dev")
    project.run("config", "set", "--secret", "nixos:defaultPrivateKey", "--", Path(lab_host.privateKeyPath).read_text())
    code_file = project.dir / "imported.yaml"
    imp = project.run("import", "nixos:index:NixosMachine", "web", f"{lab_host.address}:{lab_host.port}",
                      "--yes", "--out", str(code_file))
    out = strip_ansi(imp.stdout + imp.stderr)
    assert "failed to validate" not in out, out
    code = code_file.read_text()
    print(code)
    assert systems["base"] in code  # systemPath = what runs
    # Paste the generated code into the program.
    (project.dir / "Pulumi.yaml").write_text(
        "name: imp\nruntime: yaml\nplugins:\n  providers:\n    - name: nixos\n"
        f"      path: {PROVIDER_DIR}\n" + code)
    preview = strip_ansi(project.run("preview", "--diff").stdout)
    assert "to update" not in preview and "to replace" not in preview and "to create" not in preview, preview
    up = strip_ansi(project.up().stdout)
    assert not re.search(r"\d+ (updated|created|replaced|deleted)", up) and "2 unchanged" in up, up
    assert in_host(lab_host, "readlink", "/nix/var/nix/profiles/system").stdout.strip() == "system-1-link"
    assert current_system(lab_host) == systems["base"]
    assert project.resource("NixosMachine")["outputs"]["generation"] == 1  # type: ignore[index]


# -- 2. cancel: one deployment per profile per host, and a cancelled up rolls back -----------


def supervisor_state(host: labctl.LabHost) -> str:
    return in_host(host, "sh", "-c", "cat /tmp/pulumi-nixos.*/state 2>/dev/null", check=False).stdout.strip()


async def test_a_second_deployment_is_refused_naming_who_holds_the_host(
        lab_host: labctl.LabHost, systems: Systems) -> None:
    await engine.deploy(DeployRequest(remote_for(lab_host), systems["web"]))
    first = asyncio.create_task(engine.deploy(DeployRequest(remote_for(lab_host), systems["web-slow"])))
    deadline = time.monotonic() + 60
    while supervisor_state(lab_host) != "activating" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert supervisor_state(lab_host) == "activating"
    with pytest.raises(HostBusy) as busy:
        await engine.deploy(DeployRequest(remote_for(lab_host), systems["web-v2"]))
    msg = str(busy.value)
    assert "is being deployed by someone else: deployment /tmp/pulumi-nixos." in msg
    assert f"of {systems['web-slow']}, since 20" in msg and "Nothing was changed" in msg
    result = await first
    assert result.store_path == systems["web-slow"] == current_system(lab_host)
    assert in_host(lab_host, "readlink", "/nix/var/nix/profiles/system").stdout.strip() == f"system-{result.generation}-link"
    # The lock is free again, and nothing is left behind in /tmp.
    again = await engine.deploy(DeployRequest(remote_for(lab_host), systems["web-v2"]))
    assert again.generation == result.generation + 1 and current_system(lab_host) == systems["web-v2"]
    assert in_host(lab_host, "sh", "-c", "ls -d /tmp/pulumi-nixos.* 2>/dev/null", check=False).stdout == ""


def up_while_activating(project: PulumiProject, host: labctl.LabHost, output: int | None) -> subprocess.Popen[str]:
    """`web` deployed; then `pulumi up` of web-slow (20 s of activation) in its own process group,
    returned once the host is activating."""
    program(project, {"web": machine(host, "web", confirmTimeout=5)}, {"systemPath": "${web.systemPath}"})
    project.run("stack", "init", "dev")
    project.up()
    program(project, {"web": machine(host, "web-slow", confirmTimeout=5)}, {"systemPath": "${web.systemPath}"})
    proc = subprocess.Popen(["pulumi", "--non-interactive", "up", "--yes", "--skip-preview"], cwd=project.dir,
                            env=project.env, stdout=output, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while supervisor_state(host) != "activating" and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert supervisor_state(host) == "activating"
    return proc


def test_a_cancelled_up_rolls_back_and_the_next_up_converges(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    proc = up_while_activating(project, lab_host, subprocess.PIPE)
    # Ctrl-C in a terminal: SIGINT to the whole process group (CLI, language host, provider).
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    out = strip_ansi(out)
    assert proc.returncode != 0, out
    assert "the deployment was cancelled. Rolled back: generation 2" in out, out
    # State and host agree: the old system runs, and the state says so.
    assert current_system(lab_host) == systems["web"]
    assert project.resource("NixosMachine")["outputs"]["systemPath"] == systems["web"]  # type: ignore[index]
    assert supervisor_state(lab_host) == ""  # no supervisor left running, no leftovers
    # An immediate second up deploys, and nothing rolls it back underneath.
    project.up()
    time.sleep(5 + 2)  # past confirmTimeout
    assert current_system(lab_host) == systems["web-slow"]
    assert project.resource("NixosMachine")["outputs"]["systemPath"] == systems["web-slow"]  # type: ignore[index]
    refresh = strip_ansi(project.run("refresh", "--yes", "--skip-preview").stdout)
    assert "updated" not in refresh and "unchanged" in refresh

