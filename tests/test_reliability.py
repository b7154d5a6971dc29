"""Issue 13: the defects found under faults and hostile input, each through the real parts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import labctl
import pytest
from conftest import REPO, PulumiProject, Systems, current_system, has_provider_traceback, in_host, remote_for
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.errors import DeployError, EngineError, HostBusy, HostKeyMismatch
from nixos_provider.engine.models import DeployRequest, HealthCheck, Profile
from test_engine import current_gen
from test_provider_e2e import machine, program, strip_ansi

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
    # An installation: the wrapper as `nix`, the real nix-store beside it.
    (tmp_path / "bin").mkdir()
    wrapper = tmp_path / "bin" / "nix"
    real_store = shutil.which("nix-store")
    assert real_store is not None
    (tmp_path / "bin" / "nix-store").symlink_to(real_store)
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
              "plugins": {"providers": [{"name": "nixos", "path": str(project.plugin_dir)}]}}
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
        f"      path: {project.plugin_dir}\n" + code)
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


async def test_destroy_during_another_deployment_is_refused_and_changes_nothing(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": machine(lab_host, "web")})
    project.run("stack", "init", "dev")
    project.up()
    assert current_gen(lab_host) == 2
    # Someone else deploys web-slow (20 s of activation) to the same machine.
    other = asyncio.create_task(engine.deploy(DeployRequest(remote_for(lab_host), systems["web-slow"])))
    deadline = time.monotonic() + 60
    while supervisor_state(lab_host) != "activating" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert supervisor_state(lab_host) == "activating"
    destroy = await asyncio.to_thread(project.run, "destroy", "--yes", "--skip-preview", check=False)
    out = strip_ansi(destroy.stdout + destroy.stderr)
    assert destroy.returncode != 0
    assert "is being deployed by someone else: deployment /tmp/pulumi-nixos." in out and "Nothing was changed" in out
    result = await other
    assert result.store_path == current_system(lab_host) == systems["web-slow"]  # not disturbed
    assert project.resource("NixosMachine")["outputs"]["baselineGeneration"] == 1  # type: ignore[index]
    # Once it has finished, destroy returns the machine to its baseline.
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(lab_host) == systems["base"] and current_gen(lab_host) == 1


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


# -- 5. bad input is a Check failure naming the property, never an internal error -------------


PYTHON_PROGRAM = """
import pulumi

# Raw resources: no SDK types, so every value reaches the provider's Check as written.
conn = {"host": "%(host)s", "port": %(port)d}
case = pulumi.Config().require("case")
if case == "huge-flake":
    pulumi.CustomResource("nixos:index:NixosMachine", case, {"connection": conn, "flake": "x" * 1_000_000 + "#web"})
if case == "numbers":
    pulumi.CustomResource("nixos:index:NixosMachine", case, {
        "connection": {**conn, "password": 123, "agentSocketPath": 5, "privateKeyPassword": 7},
        "flake": "%(flake)s#web", "healthChecks": [{"tcp": 80, "host": 80}, {"command": ["true"]}]})
if case == "profile":
    pulumi.CustomResource("nixos:index:NixProfile", case, {
        "connection": conn, "profile": "app", "flake": "%(flake)s#app-v1", "activate": 7})
"""


def test_malformed_inputs_fail_check_naming_the_property(project: PulumiProject, lab_host: labctl.LabHost) -> None:
    (project.dir / "Pulumi.yaml").write_text(json.dumps({
        "name": "bad", "runtime": {"name": "python", "options": {"virtualenv": str(REPO / ".venv")}},
        "plugins": {"providers": [{"name": "nixos", "path": str(project.plugin_dir)}]}}))
    (project.dir / "__main__.py").write_text(PYTHON_PROGRAM % {
        "host": lab_host.address, "port": lab_host.port, "flake": f"path:{labctl.LAB_FLAKE}"})
    project.run("stack", "init", "dev")
    cases = {"huge-flake": ["flake"],  # (the CLI itself prints the value next to the property)
             "numbers": ["connection.password", "connection.agentSocketPath", "connection.privateKeyPassword",
                         "healthChecks[0].host", "healthChecks[1].command"],
             "profile": ["activate"]}
    for case, props in cases.items():
        project.run("config", "set", "case", case)
        res = project.run("preview", check=False)
        out = strip_ansi(res.stdout + res.stderr)
        assert res.returncode != 0
        for prop in props:
            assert f"property {prop} value" in out, (case, prop, out[-3000:])
        if case == "huge-flake":
            assert "has a problem: is 1000004 characters long; a flake reference has at most 4096" in out
        assert "internal error" not in out and not has_provider_traceback(out) and "Argument list too long" not in out, out


# -- 6. credentials are secret in state even when the program forgot to say so ----------------


def test_credentials_passed_in_plain_text_are_secret_in_state(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    key = Path(lab_host.privateKeyPath).read_text()
    program(project, {"web": {"type": "nixos:NixosMachine", "properties": {
        "connection": {"host": lab_host.address, "port": lab_host.port,
                       "privateKey": {"fn::readFile": lab_host.privateKeyPath}},
        "flake": f"path:{labctl.LAB_FLAKE}#web"}}})
    project.run("stack", "init", "dev")
    up = project.up()
    assert current_system(lab_host) == systems["web"]
    export = project.run("stack", "export").stdout
    body = key.split("\n")[1]
    assert body not in export and body not in up.stdout + up.stderr
    web = project.resource("NixosMachine")
    for where in ("inputs", "outputs"):
        assert "ciphertext" in json.dumps(web[where]["connection"]["privateKey"]), where  # type: ignore[index]
    # Nothing to deploy: marking it secret is not a change.
    assert "unchanged" in strip_ansi(project.up().stdout)


# -- 9. a killed CLI leaves no provider behind -------------------------------------------------


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_provider(pid: int) -> bool:
    try:
        return b"nixos_provider" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_the_provider_exits_when_the_cli_is_killed_and_the_host_rolls_back(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    proc = up_while_activating(project, lab_host, subprocess.DEVNULL)
    providers = [p for p in descendants(proc.pid) if is_provider(p)]
    assert providers
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while any(Path(f"/proc/{p}").exists() and is_provider(p) for p in providers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{p}").exists() and is_provider(p) for p in providers), "the provider outlived the CLI"
    # The host rolled back: told to by the exiting provider ("aborted"), or,
    # on a machine so busy that the provider's last word came too late, by
    # the supervisor itself when no confirmation came ("unconfirmed").
    # Either way it is where the state says.
    deadline = time.monotonic() + 60
    while not supervisor_state(lab_host).startswith("rolled-back") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert supervisor_state(lab_host) in ("rolled-back aborted", "rolled-back unconfirmed")
    assert current_system(lab_host) == systems["web"]
    assert project.resource("NixosMachine")["outputs"]["systemPath"] == systems["web"]  # type: ignore[index]


# -- 7. a host key of another type is a changed host key, not a lost connection ----------------


async def test_a_host_key_of_another_type_is_refused_as_a_changed_key(
        lab_host: labctl.LabHost, project: PulumiProject, systems: Systems) -> None:
    program(project, {"web": machine(lab_host, "web")})
    project.run("stack", "init", "dev")
    project.up()  # pins the ed25519 key
    # The host is reinstalled with an ECDSA key only.
    in_host(lab_host, "sh", "-c", "rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub && "
                                  "ssh-keygen -q -t ecdsa -N '' -f /etc/ssh/ssh_host_ed25519_key")
    in_host(lab_host, "sh", "-c", 'kill "$(cat /run/sshd.pid)"')
    labctl.boot(lab_host)
    with pytest.raises(HostKeyMismatch) as err:
        await engine.read_state(remote_for(lab_host, host_key=lab_host.hostKey), Profile())
    assert "(ssh-ed25519)" in str(err.value) and "(ecdsa-sha2-nistp256)" in str(err.value)
    refresh = project.run("refresh", "--yes", "--skip-preview", check=False)
    out = strip_ansi(refresh.stdout + refresh.stderr)
    assert refresh.returncode != 0
    assert "host key mismatch" in out and "Connection lost" not in out, out


# -- 8. drift shows the value that runs ---------------------------------------------------------


def test_drift_shows_the_running_system(project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": machine(lab_host, "web")})
    project.run("stack", "init", "dev")
    project.up()
    # Someone rolls the machine back by hand.
    in_host(lab_host, "nix-env", "-p", "/nix/var/nix/profiles/system", "--switch-generation", "1")
    in_host(lab_host, f"{systems['base']}/bin/switch-to-configuration", "switch")
    refresh = strip_ansi(project.run("refresh", "--yes", "--skip-preview", "--diff").stdout)
    running, declared = systems["base"], systems["web"]
    assert re.search(rf'systemPath\s*:\s*"{declared}"\s*=>\s*"{running}"', refresh), refresh
    preview = strip_ansi(project.run("preview", "--diff").stdout)
    assert re.search(rf'systemPath\s*:\s*"{running}"\s*=>\s*"{declared}"', preview), preview
    project.up()
    assert current_system(lab_host) == declared


# -- 10. a failed deployment leaves nothing behind on the target ---------------------------------


async def test_failed_and_rolled_back_deployments_leave_no_workdir(lab_host: labctl.LabHost, systems: Systems) -> None:
    await engine.deploy(DeployRequest(remote_for(lab_host), systems["web"]))
    with pytest.raises(DeployError, match="activation exited with status 4"):
        await engine.deploy(DeployRequest(remote_for(lab_host), systems["web-activation-fails"]))
    check = HealthCheck(command="exit 3", retries=0, name="always fails")
    with pytest.raises(DeployError, match="always fails"):
        await engine.deploy(DeployRequest(remote_for(lab_host), systems["web-v2"], health_checks=(check,)))
    with pytest.raises(DeployError, match="autoRollback is off"):
        await engine.deploy(DeployRequest(remote_for(lab_host), systems["web-activation-fails"], auto_rollback=False))
    assert in_host(lab_host, "sh", "-c", "ls -d /tmp/pulumi-nixos.* 2>/dev/null", check=False).stdout == ""
