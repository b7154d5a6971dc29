"""connection.sudoPassword: a non-root SSH user whose sudo asks for a password.

The lab user bob (labctl.SUDO_USER_NAME) has `bob ALL=(ALL) ALL`, so the
host's real sudo checks his password against the host's /etc/shadow; alice's
rule is NOPASSWD. First the runner against a lab host (engine, no Pulumi),
then the provider through the real `pulumi` CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import secrets
from pathlib import Path
from typing import Any

import labctl
import pytest
from conftest import HostFactory, PulumiProject, Systems, current_system, http_version, in_host, remote_for
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.declaration.checks import Failures, check_connection
from nixos_provider.engine.declaration.error_text import describe
from nixos_provider.engine.errors import ElevationError, Setting
from nixos_provider.engine.models import Credentials, Profile, Remote
from nixos_provider.engine.target.activation import SUPERVISOR
from nixos_provider.engine.transport.process import PasswordSudo, Sudo, Target, elevator_for
from nixos_provider.engine.transport.ssh import connect
from test_provider_e2e import program, strip_ansi

LAB = labctl.LAB_FLAKE
SYSTEM = "/nix/var/nix/profiles/system"


def as_user(host: labctl.LabHost, user: str, sudo_password: str | None) -> Remote:
    remote = remote_for(host, user=user)
    return dataclasses.replace(remote, credentials=dataclasses.replace(remote.credentials, sudo_password=sudo_password))


def generations(host: labctl.LabHost, profile: str = SYSTEM) -> list[int]:
    out = in_host(host, "nix-env", "-p", profile, "--list-generations", check=False).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.strip()]


# -- the elevator's command line (no host) -------------------------------------------------


def test_password_sudo_argv_and_stdin_are_exact() -> None:
    root = PasswordSudo("root", "pw", sync="SYNC")
    script = ('while IFS= read -r line; do [ "$line" = "$1" ] && shift && exec "$@"; done; '
              'echo "pulumi-nixos: the input of the elevated command lacks its sync line" >&2; exit 125')
    assert root.argv(["nix-store", "--import"]) == [
        "sudo", "-k", "-S", "-p", "", "--", "sh", "-c", script, "sh", "SYNC", "nix-store", "--import"]
    assert PasswordSudo("alice", "pw", sync="SYNC").argv(["id"]) == [
        "sudo", "-k", "-S", "-p", "", "-H", "-u", "alice", "--", "sh", "-c", script, "sh", "SYNC", "id"]
    # The password only ever travels on stdin, before the sync line.
    assert root.stdin() == b"pw\nSYNC\n"
    assert all("pw" not in a for a in root.argv(["id"]))
    assert root.probe() == (["sudo", "-k", "-S", "-p", "", "--", "true"], b"pw\n")
    assert "pw" not in repr(root) and "SYNC" not in repr(root)
    # A fresh sync line per elevator: the password cannot equal it by accident.
    assert PasswordSudo("root", "pw").sync != PasswordSudo("root", "pw").sync
    chosen = elevator_for("bob", "root", "pw")
    assert isinstance(chosen, PasswordSudo) and (chosen.user, chosen.password) == ("root", "pw")
    assert elevator_for("bob", "root") == Sudo("root")
    assert elevator_for("bob", "bob", "pw") is None and elevator_for("root", None, "pw") is None


def test_sudo_refusals_are_told_from_command_failures() -> None:
    pw = PasswordSudo("root", "pw")
    assert "incorrect password" in (pw.refusal(1, "Sorry, try again.\nsudo: 1 incorrect password attempt\n") or "")
    assert "the sudo password" in (pw.refusal(1, "sudo: no password was provided\n") or "")
    assert "incorrect password" in (pw.refusal(1, "sudo: Authentication failed, try again.\n"
                                               "sudo-rs: Maximum 3 incorrect authentication attempts\n") or "")
    # Only sudo's own lines count; sshd's notes may come first.
    assert pw.refusal(1, "error: incorrect password attempt\n") is None
    assert "incorrect password" in (pw.refusal(1, "Could not chdir to home directory /run/home/bob\n"
                                               "Sorry, try again.\n\nsudo: 1 incorrect password attempt\n") or "")
    assert pw.refusal(2, "sudo: 1 incorrect password attempt\n") is None
    assert "set the sudo password" in (Sudo("root").refusal(1, "sudo: a password is required\n") or "")
    assert Sudo("root").refusal(1, "nope\n") is None


# -- the runner against a lab host -------------------------------------------------------------


async def test_password_sudo_streams_stdin_untouched_and_logs_no_password(
        lab_host: labctl.LabHost, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nixos_provider")
    bob, password = lab_host.passwordSudoUser, lab_host.passwordSudoPassword
    data = b"first line\n" + bytes(range(256)) * 64 + b"no newline at the end"
    conn = await connect(as_user(lab_host, bob, password))
    try:
        root = Target(conn, "root")
        await root.check_elevation()
        assert (await root.run(["id", "-un"])).stdout == "root\n"
        # run: the command's input arrives byte for byte, without the password's line.
        got = await root.run(["sha256sum"], input=data)
        assert got.stdout.split()[0] == hashlib.sha256(data).hexdigest()
        # start: the same, streamed, as the store import and the supervisor upload are.
        proc = await root.start(["sh", "-c", "id -un; wc -c"])
        try:
            proc.stdin.write(data)
            proc.stdin.write_eof()
            assert (await proc.stdout.read()).split() == [b"root", str(len(data)).encode()]
            assert (await proc.wait()).exit_status == 0
        finally:
            await proc.close()
        # start without input for the command: it sees EOF at once, not the password.
        proc = await root.start(["sh", "-c", "wc -c"], stdin=False)
        try:
            assert (await proc.stdout.read()).strip() == b"0"
        finally:
            await proc.close()
        # The supervisor's upload (cat > file) lands exactly.
        workdir = f"/tmp/sudo-test-{secrets.token_hex(4)}"
        await root.run(["sh", "-c", 'mkdir -- "$1" && cat > "$1/supervisor.sh"', "sh", workdir], input=SUPERVISOR)
        assert in_host(lab_host, "cat", f"{workdir}/supervisor.sh").stdout == SUPERVISOR
        # Another user than root, through the same password.
        assert (await Target(conn, "alice").run(["id", "-un"])).stdout == "alice\n"
    finally:
        await conn.close()
    assert password not in caplog.text and f"{conn.target} as root: id -un" in caplog.text


async def test_nopasswd_rule_leaves_the_password_unread_and_out_of_the_command(lab_host: labctl.LabHost) -> None:
    # alice's rule asks no password, so sudo reads nothing: the line is still
    # in the stream when the command starts, as it would be with a cached
    # credential. The sync line keeps it from the command all the same.
    password = f"unread-{secrets.token_hex(4)}"
    conn = await connect(as_user(lab_host, lab_host.nonRootUser, password))
    try:
        root = Target(conn, "root")
        await root.check_elevation()
        assert (await root.run(["cat"], input="payload\n")).stdout == "payload\n"
        proc = await root.start(["cat"])
        try:
            proc.stdin.write(b"streamed\n")
            proc.stdin.write_eof()
            assert await proc.stdout.read() == b"streamed\n"
        finally:
            await proc.close()
    finally:
        await conn.close()


async def test_wrong_or_missing_password_is_refused_before_anything_runs(
        lab_host: labctl.LabHost, systems: Systems) -> None:
    bob = lab_host.passwordSudoUser
    with pytest.raises(ElevationError) as wrong:
        await engine.deploy(engine.DeployRequest(as_user(lab_host, bob, "not-the-password"), systems["web"]))
    # The engine names the setting in its own terms; the Pulumi layer puts the property path there.
    assert wrong.value.blames is Setting.SUDO_PASSWORD
    assert "sudo rejected the sudo password (incorrect password)" in str(wrong.value)
    assert "sudo rejected `connection.sudoPassword` (incorrect password)" in describe(wrong.value)
    assert "not-the-password" not in str(wrong.value) and "Nothing was changed" in str(wrong.value)
    with pytest.raises(ElevationError) as missing:
        await engine.read_state(as_user(lab_host, bob, None), Profile())
    assert missing.value.blames is Setting.SUDO_PASSWORD and "set `connection.sudoPassword`" in describe(missing.value)
    # Nothing was pushed, registered or activated.
    assert generations(lab_host) == [1] and current_system(lab_host) == systems["base"]
    assert in_host(lab_host, "test", "-e", systems["web"], check=False).returncode != 0


@pytest.mark.parametrize("compress", ["zstd", "none"])
async def test_deploy_and_rollback_as_a_password_sudo_user(new_host: HostFactory, systems: Systems,
                                                           compress: str) -> None:
    # The push goes through `ssh` with the password's line leading the
    # stream: inside the compressed stream (zstd), or as it is (none).
    host = new_host()
    remote = as_user(host, host.passwordSudoUser, host.passwordSudoPassword)
    result = await engine.deploy(engine.DeployRequest(remote, systems["web"], compress=compress, health_checks=(
        engine.HealthCheck(command="test -w /nix/var/nix/profiles"),)))
    assert result.push.transport == "openssh" and result.push.compression == compress and result.push.paths == 4
    assert result.generation == 2 and current_system(host) == systems["web"] and http_version(host) == "1"
    state = await engine.rollback_to(remote, Profile(), 1)
    assert state.current_system == systems["base"] == current_system(host)


async def test_a_password_login_pushes_over_the_providers_connection(new_host: HostFactory, systems: Systems) -> None:
    # `ssh` cannot log in by password without prompting: the provider's own
    # connection carries the push, elevated through the same sudo password.
    host = new_host()
    password = host.passwordSudoPassword
    remote = Remote(host.address, host.port, host.passwordSudoUser,
                    Credentials(password=password, sudo_password=password), host_key=host.hostKey)
    for system, compress in ((systems["web"], "none"), (systems["web-v2"], "zstd")):
        result = await engine.deploy(engine.DeployRequest(remote, system, compress=compress))
        assert result.push.transport == "connection" and result.push.compression == compress
        assert result.push.paths > 0 and current_system(host) == system
    assert http_version(host) == "2"


@pytest.mark.systemd
async def test_on_a_systemd_host_the_supervisor_unit_starts_through_password_sudo(
        new_host: HostFactory, systems: Systems) -> None:
    # systemd-run (the supervisor's own transient unit) runs as root only,
    # so here it is started through sudo -S as well.
    host = new_host("systemd")
    labctl.add_password_sudo_user(host)
    with pytest.raises(ElevationError, match="incorrect password"):
        await engine.deploy(engine.DeployRequest(as_user(host, host.passwordSudoUser, "wrong"), systems["web"]))
    assert current_system(host) == systems["base"] and generations(host) == [1]
    remote = as_user(host, host.passwordSudoUser, host.passwordSudoPassword)
    result = await engine.deploy(engine.DeployRequest(remote, systems["web"]))
    assert result.generation == 2 and current_system(host) == systems["web"] and http_version(host) == "1"
    journal = in_host(host, "journalctl", "--no-pager", "-b", "-o", "cat", check=False).stdout
    units = set(re.findall(r"pulumi-nixos-[0-9a-f]{16}-activate\.service", journal))
    assert len(units) == 1, f"expected the supervisor's own unit in the journal, found {units}"


# -- through the pulumi CLI -------------------------------------------------------------------------


def sudo_connection(host: labctl.LabHost, password_ref: str = "${sudoPass}") -> dict[str, Any]:
    return {"host": host.address, "port": host.port, "user": host.passwordSudoUser,
            "privateKey": {"fn::secret": {"fn::readFile": host.privateKeyPath}}, "sudoPassword": password_ref}


def sudo_program(project: PulumiProject, host: labctl.LabHost, config: str, app: str | None = None) -> None:
    resources: dict[str, Any] = {"web": {"type": "nixos:NixosMachine", "properties": {
        "connection": sudo_connection(host), "flake": f"path:{LAB}#{config}", "confirmTimeout": 15,
        "healthChecks": [{"http": f"http://{host.address}:8080/"}]}}}
    if app is not None:
        resources["app"] = {"type": "nixos:NixProfile", "properties": {
            "connection": sudo_connection(host), "user": host.nonRootUser, "profile": "app",
            "flake": f"path:{LAB}#{app}", "activate": 'echo "$(id -un) activated $PROFILE" > /tmp/app-active'}}
    program(project, resources, {"generation": "${web.generation}", "systemPath": "${web.systemPath}"},
            config={"sudoPass": {"type": "string", "secret": True}}, name="sudo")


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_up_as_a_password_sudo_user_deploys_the_system_and_another_users_profile(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    # A fresh password, so finding it anywhere means this run leaked it.
    password = f"sudo-pass-{secrets.token_hex(8)}"
    labctl.run(labctl.nsenter(lab_host.state, ["chpasswd"]), input=f"{lab_host.passwordSudoUser}:{password}\n")
    sudo_program(project, lab_host, "web", app="app-v1")
    project.run("stack", "init", "dev")
    project.run("config", "set", "--secret", "sudoPass", password)
    up = project.up("--logtostderr", "-v=3")
    outputs = project.outputs()
    assert outputs["systemPath"] == systems["web"] == current_system(lab_host) and http_version(lab_host) == "1"
    assert outputs["generation"] == 2 and generations(lab_host) == [1, 2]
    app_profile = f"/nix/var/nix/profiles/per-user/{lab_host.nonRootUser}/app"
    assert generations(lab_host, app_profile) == [1]
    owner = in_host(lab_host, "stat", "-c", "%U", f"{app_profile}-1-link").stdout.strip()
    assert owner == lab_host.nonRootUser
    assert in_host(lab_host, "cat", "/tmp/app-active").stdout.strip() == f"{lab_host.nonRootUser} activated {app_profile}"
    # An update and a refresh go through the same sudo.
    sudo_program(project, lab_host, "web-v2", app="app-v2")
    again = project.up("--logtostderr", "-v=3")
    assert current_system(lab_host) == systems["web-v2"] and generations(lab_host) == [1, 2, 3]
    assert generations(lab_host, app_profile) == [1, 2]
    refresh = project.run("refresh", "--yes", "--skip-preview", "--logtostderr", "-v=3")
    export = project.run("stack", "export").stdout
    assert "sudoPassword" in export and "ciphertext" in export
    places = {"stack export": export, "up": up.stdout + up.stderr, "second up": again.stdout + again.stderr,
              "refresh": refresh.stdout + refresh.stderr}
    # The project, its state backend and PULUMI_HOME (the CLI's and the provider's logs).
    for f in project.dir.parent.rglob("*"):
        if f.is_file() and f.stat().st_size < 4_000_000:
            places[str(f)] = f.read_text(errors="replace")
    leaks = [where for where, text in places.items() if password in text]
    assert not leaks, f"the sudo password appears in {leaks}"
    assert len(places) > 10
    # Destroy rolls the system back to the baseline and removes the profile, as the same user.
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(lab_host) == systems["base"]
    assert in_host(lab_host, "test", "-e", app_profile, check=False).returncode != 0


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_up_with_a_wrong_sudo_password_fails_naming_it_and_changes_nothing(
        project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    sudo_program(project, lab_host, "web")
    project.run("stack", "init", "dev")
    project.run("config", "set", "--secret", "sudoPass", wrong)
    failed = project.up("--logtostderr", "-v=3", check=False)
    out = strip_ansi(failed.stdout + failed.stderr)
    assert failed.returncode != 0
    assert "sudo rejected `connection.sudoPassword` (incorrect password)" in out, out[-2000:]
    assert "Nothing was changed" in out and "Traceback" not in out
    assert wrong not in out and wrong not in project.run("stack", "export").stdout
    # The host is as it was: nothing pushed, registered or activated, no resource in state.
    assert current_system(lab_host) == systems["base"] and generations(lab_host) == [1]
    assert in_host(lab_host, "test", "-e", systems["web"], check=False).returncode != 0
    assert "NixosMachine" not in project.run("stack", "export").stdout
    # With the right password the same program deploys.
    project.run("config", "set", "--secret", "sudoPass", lab_host.passwordSudoPassword)
    project.up()
    assert current_system(lab_host) == systems["web"]


@pytest.mark.e2e
def test_check_rejects_a_multi_line_sudo_password_without_echoing_it(project: PulumiProject) -> None:
    program(project, {"a": {"type": "nixos:NixosMachine", "properties": {
        "connection": {"host": "127.0.0.1", "user": "bob", "sudoPassword": "two\nlines-secret"},
        "systemPath": "/nix/store/00000000000000000000000000000000-x"}}})
    project.run("stack", "init", "dev")
    res = project.run("preview", check=False)
    out = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    assert re.search(r"property connection\.sudoPassword value .*? has a problem: must be one non-empty line", out), out
    assert "lines-secret" not in out and "Traceback" not in out


def test_check_names_a_bad_sudo_password_and_refuses_one_on_a_jump_host() -> None:
    # The schema's ProxyConnection has no sudoPassword (Pulumi YAML refuses it
    # already); Check refuses it for the SDKs that pass anything through.
    f = Failures()
    check_connection(f, {"host": "h", "sudoPassword": 42, "proxy": {"host": "j", "sudoPassword": "jump-secret"}})
    assert f.items == [
        ("connection.sudoPassword", "must be a string, not a number"),
        ("connection.proxy.sudoPassword", "a jump host only forwards the connection and runs no command, so it needs no sudo"),
    ]
    empty = Failures()
    check_connection(empty, {"host": "h", "sudoPassword": ""})
    assert empty.items == [
        ("connection.sudoPassword", "must be one non-empty line (sudo reads the password up to a line break)")]


def test_credentials_keep_the_sudo_password_out_of_repr(tmp_path: Path) -> None:
    creds = Credentials(private_key="k", sudo_password="hunter2")
    assert "hunter2" not in repr(creds) and "hunter2" not in repr(Remote("h", credentials=creds))
    assert Credentials(sudo_password="x").empty  # not an SSH credential: the default key still applies
