"""The provider through the real `pulumi` CLI (YAML programs, file:// backend) against lab hosts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import labctl
import pytest
from conftest import REPO, HostFactory, PulumiProject, Systems, current_system, git_commit, http_version, in_host

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
PROVIDER_DIR = str(REPO / "provider")
LAB = labctl.LAB_FLAKE
# The CLI the suite runs on (scripts/bootstrap-pulumi.sh), and the oldest one it still deploys with.
PINNED_CLI = "3.276.0"
OLDEST_CLI = "3.259.0"


def connection(host: labctl.LabHost) -> dict[str, Any]:
    return {"host": host.address, "port": host.port,
            "privateKey": {"fn::secret": {"fn::readFile": host.privateKeyPath}}}


def program(project: PulumiProject, resources: dict[str, Any], outputs: dict[str, str] | None = None,
            config: dict[str, Any] | None = None, name: str = "e2e") -> None:
    doc: dict[str, Any] = {
        "name": name, "runtime": "yaml",
        "plugins": {"providers": [{"name": "nixos", "path": str(project.plugin_dir)}]},
        "resources": resources,
    }
    if config:
        doc["config"] = config  # the project's typed config, which the program reads as ${name}
    if outputs:
        doc["outputs"] = outputs
    (project.dir / "Pulumi.yaml").write_text(json.dumps(doc, indent=2))  # JSON is YAML


def machine(host: labctl.LabHost, config: str, **props: Any) -> dict[str, Any]:
    return {"type": "nixos:NixosMachine",
            "properties": {"connection": connection(host), "flake": f"path:{LAB}#{config}", **props}}


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_cli_version_and_schema(project: PulumiProject) -> None:
    version = project.run("version").stdout.strip()
    print(f"pulumi version: {version}")
    assert version == f"v{PINNED_CLI}"
    out = project.run("package", "get-schema", str(REPO / "provider" / "pulumi-resource-nixos")).stdout
    schema = json.loads(out)
    assert set(schema["resources"]) == {"nixos:index:NixosMachine", "nixos:index:NixProfile"}
    assert schema["types"]["nixos:index:Connection"]["properties"]["privateKey"]["secret"] is True


def test_the_oldest_supported_cli_deploys_and_destroys(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    """The suite runs on the pinned CLI; users with an older one get the same deployment (the README's range)."""
    oldest = Path((REPO / ".tools" / "pulumi-bin-oldest").read_text().strip())
    env = {"PATH": f"{oldest}{os.pathsep}{os.environ['PATH']}"}
    assert project.run("version", env=env).stdout.strip() == f"v{OLDEST_CLI}"
    program(project, {"web": machine(lab_host, "web", confirmTimeout=10)},
            {"systemPath": "${web.systemPath}", "generation": "${web.generation}"})
    project.run("stack", "init", "dev", env=env)
    project.run("up", "--yes", "--skip-preview", env=env)
    outputs = json.loads(project.run("stack", "output", "--json", env=env).stdout)
    assert outputs == {"systemPath": systems["web"], "generation": 2}
    assert current_system(lab_host) == systems["web"]
    project.run("destroy", "--yes", "--skip-preview", env=env)
    assert current_system(lab_host) == systems["base"]


def test_preview_reaches_the_provider_check(project: PulumiProject) -> None:
    program(project, {"bad": {"type": "nixos:NixosMachine", "properties": {
        "connection": {"host": "127.0.0.1", "port": 70000}, "flake": ".#web", "systemPath": "/nix/store/x",
        "action": "reboot", "healthChecks": [{"tcp": 80, "http": "http://x/"}]}}})
    project.run("stack", "init", "dev")
    res = project.run("preview", check=False)
    out = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    def problem(prop: str, reason: str) -> bool:
        return re.search(rf"property {re.escape(prop)} value .*? has a problem: {re.escape(reason)}", out) is not None

    assert problem("connection.port", "must be between 1 and 65535, not 70000")
    assert problem("systemPath", "set exactly one of `flake`, `systemPath`, `configuration` and `expression`, "
                                 "not both `flake` and `systemPath`")
    assert problem("action", "must be one of 'switch', 'boot', 'test', not 'reboot'")
    assert problem("healthChecks[0]", "needs exactly one of `command`, `http` or `tcp` (got http, tcp)")
    assert "Traceback" not in out


def test_flake_errors_keep_their_place(project: PulumiProject, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    # No newline at the end: Nix 2.19 and later point past it, at an empty line 6.
    (broken / "flake.nix").write_text("{\n  outputs = { self }: {\n    nixosConfigurations.web = 1 {\n  };\n}")
    # A flake in a Git repository, with a module written but not added: Nix's copy of the flake lacks it.
    repo = tmp_path / "repo"
    (repo / "modules").mkdir(parents=True)
    (repo / "flake.nix").write_text("{ outputs = { self }: { nixosConfigurations.web = import ./modules/web.nix; }; }")
    (repo / "modules" / "web.nix").write_text("{ }")
    git_commit(repo, "flake.nix")
    program(project, {"web": {"type": "nixos:NixosMachine", "properties": {
        "connection": {"host": "127.0.99.1", "password": "unused"}, "flake": "${flake}"}}},
            config={"flake": {"type": "string"}})
    project.run("stack", "init", "dev")
    cases = {
        # Where the syntax error is, in the user's own file, with the line Nix pointed at (2.8 shows none here).
        f"path:{broken}#web": rf"syntax error, unexpected .* \(at {re.escape(str(broken))}/flake\.nix:5:\d+(: `}}`)?\)",
        f"path:{LAB}#nope": r"does not provide attribute .*'nixosConfigurations\.nope\.config\.system\.build\.toplevel'",
        # Which file Git does not track, and the command that makes Nix see it (before 2.34 Nix names only a
        # path in its copy of the flake).
        f"{repo}#web": rf"(`modules(/web\.nix)?` is in {re.escape(str(repo))}, but Git does not track it|'modules/web\.nix'"
                       rf" in the repository \"{re.escape(str(repo))}\" is not tracked by Git).* Run `git -C "
                       rf"{re.escape(str(repo))} add modules(/web\.nix)?` to make it visible to Nix",
    }
    for flake, expected in cases.items():
        project.run("config", "set", "flake", flake)
        res = project.run("preview", check=False)
        out = strip_ansi(res.stdout + res.stderr)
        problem = next((ln for ln in out.splitlines() if "resource 'web': property flake value" in ln), "")
        assert res.returncode != 0 and re.search(expected, problem), out
        assert "Traceback" not in out and "deprecated" not in out


def test_up_adopts_deploys_and_is_idempotent_then_destroy_rolls_back(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": machine(lab_host, "web", confirmTimeout=10,
                                     healthChecks=[{"http": f"http://{lab_host.address}:8080/"}])},
            {"systemPath": "${web.systemPath}", "generation": "${web.generation}",
             "baseline": "${web.baselineGeneration}", "hostKey": "${web.hostKey}"})
    project.run("stack", "init", "dev")
    up = project.up()
    assert "copying" in strip_ansi(up.stdout)
    outputs = project.outputs()
    # 1. state matches the target
    assert outputs["systemPath"] == systems["web"] == current_system(lab_host)
    assert outputs["generation"] == 2 and outputs["baseline"] == 1
    assert outputs["hostKey"] == lab_host.hostKey
    assert http_version(lab_host) == "1"
    # 10. no secret in plain text in the state
    export = project.run("stack", "export").stdout
    assert Path(lab_host.privateKeyPath).read_text().split("\n")[1] not in export
    assert "privateKey" in export and "ciphertext" in export
    assert project.resource("NixosMachine")["id"] == f"{lab_host.address}:{lab_host.port}"
    # 2. nothing changed: no deploy and not even an SSH connection (sshd is stopped).
    in_host(lab_host, "sh", "-c", 'kill "$(cat /run/sshd.pid)"')
    again = project.up()
    assert "1 updated" not in again.stdout and "unchanged" in again.stdout
    labctl.boot(lab_host)  # sshd back (a lab reboot keeps the deployed generation)
    assert current_system(lab_host) == systems["web"]
    # 6. destroy rolls back to the baseline generation
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(lab_host) == systems["base"]
    assert in_host(lab_host, "readlink", "/nix/var/nix/profiles/system").stdout.strip() == "system-1-link"
    assert http_version(lab_host) == "0"


def test_changed_config_previews_the_system_path_then_deploys(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": machine(lab_host, "web")})
    project.run("stack", "init", "dev")
    project.up()
    program(project, {"web": machine(lab_host, "web-v2")})
    preview = strip_ansi(project.run("preview", "--diff").stdout)
    assert systems["web"] in preview and systems["web-v2"] in preview
    assert re.search(r"~ systemPath\s*:", preview)
    assert current_system(lab_host) == systems["web"]  # preview changed nothing
    project.up()
    assert current_system(lab_host) == systems["web-v2"] and http_version(lab_host) == "2"
    state = project.resource("NixosMachine")
    assert state["outputs"]["systemPath"] == systems["web-v2"]
    assert state["outputs"]["generation"] == 3


def test_magic_rollback_fails_up_clearly_and_refresh_shows_no_drift(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": machine(lab_host, "web", confirmTimeout=4)})
    project.run("stack", "init", "dev")
    project.up()
    program(project, {"web": machine(lab_host, "web-moves-ssh", confirmTimeout=4)})
    failed = project.up(check=False)
    out = strip_ansi(failed.stdout + failed.stderr)
    assert failed.returncode != 0
    assert "magic rollback" in out and "Rolled back: generation 2" in out
    assert "Traceback" not in out
    assert current_system(lab_host) == systems["web"]
    # The partial-failure state recorded what really runs.
    assert project.resource("NixosMachine")["outputs"]["systemPath"] == systems["web"]
    refresh = strip_ansi(project.run("refresh", "--yes", "--skip-preview").stdout)
    assert "updated" not in refresh and "unchanged" in refresh


def test_manual_switch_shows_as_drift_in_refresh(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": machine(lab_host, "web")}, {"systemPath": "${web.systemPath}"})
    project.run("stack", "init", "dev")
    project.up()
    # Someone rolls the machine back by hand.
    in_host(lab_host, "nix-env", "-p", "/nix/var/nix/profiles/system", "--switch-generation", "1")
    in_host(lab_host, f"{systems['base']}/bin/switch-to-configuration", "switch")
    refresh = strip_ansi(project.run("refresh", "--yes", "--skip-preview", "--diff").stdout)
    assert "1 updated" in refresh
    assert "systemPath" in refresh and systems["web"] in refresh
    assert project.resource("NixosMachine")["outputs"]["systemPath"] == systems["base"]
    # The next up puts the declared system back.
    project.up()
    assert current_system(lab_host) == systems["web"]


def test_import_an_existing_host(project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    program(project, {"web": {**machine(lab_host, "base"), "options": {"import": f"{lab_host.address}:{lab_host.port}"}}},
            {"generation": "${web.generation}", "baseline": "${web.baselineGeneration}"})
    project.run("stack", "init", "dev")
    # An import knows only host:port from its ID; credentials come from the provider config.
    project.run("config", "set", "--secret", "nixos:defaultPrivateKey", "--", Path(lab_host.privateKeyPath).read_text())
    up = strip_ansi(project.up().stdout)
    assert "imported" in up
    assert project.outputs() == {"generation": 1, "baseline": 1}
    assert project.resource("NixosMachine")["id"] == f"{lab_host.address}:{lab_host.port}"
    # Now managed: a change deploys.
    program(project, {"web": machine(lab_host, "web")})
    project.up()
    assert current_system(lab_host) == systems["web"]


def test_two_stacks_deploy_different_hosts_from_one_program(
        project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    staging, production = new_host(), new_host()
    program(project, {"web": {"type": "nixos:NixosMachine", "properties": {
        "connection": {"host": "${host}", "port": 2222, "privateKey": {"fn::secret": {"fn::readFile": "${keyPath}"}}},
        "flake": "${flake}"}}},
        {"systemPath": "${web.systemPath}"},
        config={"host": {"type": "string"}, "flake": {"type": "string"}, "keyPath": {"type": "string"}})
    for stack, host, config in (("staging", staging, "web-v2"), ("production", production, "web")):
        project.run("stack", "init", stack)
        project.run("config", "set", "host", host.address)
        project.run("config", "set", "keyPath", host.privateKeyPath)
        project.run("config", "set", "flake", f"path:{LAB}#{config}")
        project.up()
    assert current_system(staging) == systems["web-v2"]
    assert current_system(production) == systems["web"]
    project.run("stack", "select", "staging")
    assert project.outputs()["systemPath"] == systems["web-v2"]


def test_nix_profile_for_a_non_root_user_rolls_back_on_destroy(
        project: PulumiProject, lab_host: labctl.LabHost) -> None:
    def prog(app: str) -> None:
        program(project, {"app": {"type": "nixos:NixProfile", "properties": {
            "connection": connection(lab_host), "profile": "app", "user": "alice",
            "flake": f"path:{LAB}#{app}",
            "activate": 'echo "$(id -un) activated $(readlink -f "$PROFILE")" > /tmp/app-active'}}},
            {"storePath": "${app.storePath}", "generation": "${app.generation}", "profilePath": "${app.profilePath}"})
    prog("app-v1")
    project.run("stack", "init", "dev")
    project.up()
    first = project.outputs()
    assert first["profilePath"] == "/nix/var/nix/profiles/per-user/alice/app" and first["generation"] == 1
    prog("app-v2")
    project.up()
    second = project.outputs()
    assert second["generation"] == 2
    assert in_host(lab_host, "cat", "/tmp/app-active").stdout.strip() == f"alice activated {second['storePath']}"
    # The profile did not exist before this stack: destroy removes it.
    project.run("destroy", "--yes", "--skip-preview")
    assert in_host(lab_host, "test", "-e", "/nix/var/nix/profiles/per-user/alice/app", check=False).returncode != 0


def test_nix_profile_destroy_returns_to_the_baseline_generation(
        project: PulumiProject, lab_host: labctl.LabHost) -> None:
    app1 = labctl.run(["nix", "--extra-experimental-features", "nix-command flakes", "build", "--no-link", "--json",
                       f"path:{LAB}#app-v1"]).stdout
    app1_path = json.loads(app1)[0]["outputs"]["out"]
    labctl.copy_closure_into(lab_host.state, app1_path)
    in_host(lab_host, "install", "-d", "-o", "alice", "/nix/var/nix/profiles/per-user/alice")
    in_host(lab_host, "sudo", "-u", "alice", "nix-env", "-p", "/nix/var/nix/profiles/per-user/alice/app",
            "--set", app1_path)
    program(project, {"app": {"type": "nixos:NixProfile", "properties": {
        "connection": connection(lab_host), "profile": "app", "user": "alice", "flake": f"path:{LAB}#app-v2"}}})
    project.run("stack", "init", "dev")
    project.up()
    link = "/nix/var/nix/profiles/per-user/alice/app"
    assert in_host(lab_host, "readlink", link).stdout.strip() == "app-2-link"
    project.run("destroy", "--yes", "--skip-preview")
    assert in_host(lab_host, "readlink", link).stdout.strip() == "app-1-link"
    assert in_host(lab_host, "readlink", "-f", link).stdout.strip() == app1_path


def test_unreachable_host_is_a_clear_error(project: PulumiProject, lab_host: labctl.LabHost) -> None:
    props = machine(lab_host, "web")
    props["properties"]["connection"]["port"] = 2399
    props["properties"]["connection"]["retries"] = 1
    program(project, {"web": props})
    project.run("stack", "init", "dev")
    res = project.up(check=False)
    out = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    assert f"cannot connect to root@{lab_host.address}:2399: connection refused" in out
    assert "Traceback" not in out


def test_preview_with_inputs_computed_from_other_resources(
        project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    a, b = new_host(), new_host()
    program(project, {
        "a": machine(a, "web"),
        # b's flake depends on a's generation: unknown until a is deployed.
        "b": {"type": "nixos:NixosMachine", "properties": {
            "connection": connection(b), "flake": f"path:{LAB}#web-v${{a.generation}}"}},
    }, {"b": "${b.systemPath}"})
    project.run("stack", "init", "dev")
    preview = project.run("preview", "--diff")
    assert "Traceback" not in preview.stdout and "+ 3 to create" in preview.stdout
    project.up()
    assert current_system(a) == systems["web"]
    assert current_system(b) == systems["web-v2"] == project.outputs()["b"]


def test_a_new_kernel_is_previewed_and_flagged_until_the_host_reboots(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    outputs = {"needsReboot": "${web.needsReboot}", "lastChanges": "${web.lastChanges}"}
    program(project, {"web": machine(lab_host, "web")}, outputs)
    project.run("stack", "init", "dev")
    project.up()
    assert project.outputs()["needsReboot"] is False  # same kernel as the system it booted
    new = systems["web-kernel"]  # built, so the preview can compare closures
    program(project, {"web": machine(lab_host, "web-kernel")}, outputs)
    preview = strip_ansi(project.run("preview").stdout)
    assert "needs a reboot to run fully: new kernel, initrd, kernel-modules" in preview, preview
    project.up()
    assert current_system(lab_host) == new
    out = project.outputs()
    assert out["needsReboot"] is True
    assert out["lastChanges"]["bootChanges"] == ["kernel", "initrd", "kernel-modules"]  # type: ignore[index]
    labctl.boot(lab_host)  # the reboot: it boots its boot default, the new system
    project.run("refresh", "--yes", "--skip-preview")
    # (Stack outputs change only at `up`; refresh updates the resource's state.)
    assert project.resource("NixosMachine")["outputs"]["needsReboot"] is False  # type: ignore[index]
    assert current_system(lab_host) == new
