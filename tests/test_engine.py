"""The deploy engine against lab hosts, without Pulumi."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import labctl
import pytest
from conftest import HostFactory, Systems, current_system, http_version, in_host, remote_for, write_flake
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.closures.push import push_closure
from nixos_provider.engine.errors import ConnectError, DeployError, EngineError, HostKeyMismatch, NixError, RemoteCommandError, Setting
from nixos_provider.engine.models import Credentials, DeployRequest, HealthCheck, Profile, Remote
from nixos_provider.engine.nix.cli import Nix, parse_flake_ref
from nixos_provider.engine.nix.versions import parse_path_info
from nixos_provider.engine.transport.process import Target
from nixos_provider.engine.transport.ssh import connect

pytestmark = pytest.mark.timeout(300)
SYSTEM = "/nix/var/nix/profiles/system"


def gens(host: labctl.LabHost, profile: str = SYSTEM) -> list[int]:
    out = in_host(host, "nix-env", "-p", profile, "--list-generations", check=False).stdout
    return [int(line.split()[0]) for line in out.splitlines() if line.strip()]


def current_gen(host: labctl.LabHost, profile: str = SYSTEM) -> int:
    link = in_host(host, "readlink", profile).stdout.strip()
    return int(link.rsplit("-", 2)[-2])


async def deploy(host: labctl.LabHost, path: str, status: Callable[[str], None] | None = None,
                 **kw: object) -> engine.DeployResult:
    req = DeployRequest(remote_for(host), path, **kw)  # type: ignore[arg-type]
    return await (engine.deploy(req, status=status) if status else engine.deploy(req))


async def test_push_sends_only_what_is_missing(lab_host: labctl.LabHost, systems: Systems) -> None:
    first = await deploy(lab_host, systems["web"])
    closure = (await Nix().closure(systems["web"]))
    base_closure = {p.path for p in await Nix().closure(systems["base"])}
    assert first.push.paths == len([p for p in closure if p.path not in base_closure]) == 4
    again = await deploy(lab_host, systems["web"])
    assert again.push.paths == 0 and again.push.bytes == 0
    bumped = await deploy(lab_host, systems["web-v2"])
    # Only nginx-1.26.1 and the new toplevel are new.
    assert bumped.push.paths == 2


CA_FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; motd = builtins.toFile "motd" "hello"; in {
  nixosConfigurations.ca = lab.nixosConfiguration { version = "ca"; packages = [ (derivation {
    name = "motd-1.0"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out/etc && cp ${motd} $out/etc/motd && echo ${motd} > $out/etc/motd.source" ];
  }) ]; };
}; }"""


def registrations(out: str) -> dict[str, tuple[object, ...]]:
    """`nix path-info --json` -> what a copy must keep of each path (not its time or trust)."""
    return {p: (i.nar_hash, i.nar_size, i.references, i.deriver, i.ca) for p, i in parse_path_info(out).items()}


async def test_push_through_ssh_registers_each_path_as_it_is_here(new_host: HostFactory, tmp_path: Path) -> None:
    # A text file (content-addressed), a derivation's output that refers to
    # it, and the system: each must arrive with its registration (hash,
    # references, deriver, content address), as `nix copy` keeps it.
    system = await Nix().build(parse_flake_ref(f"{write_flake(tmp_path / 'f', CA_FLAKE)}#ca"))
    host = new_host()
    statuses: list[str] = []
    result = await deploy(host, system, statuses.append, compress="none")
    assert result.push.transport == "openssh" and result.push.compression == "none"
    assert current_system(host) == system
    assert not any("own SSH connection" in s for s in statuses)
    closure = subprocess.run(["nix-store", "-qR", system], capture_output=True, text=True, check=True).stdout.split()
    pushed = [p for p in closure if p.endswith("-motd") or "motd-1.0" in p or p == system]
    assert len(pushed) == 3
    info = ["nix", "--extra-experimental-features", "nix-command", "path-info", "--json", *pushed]
    here = registrations(subprocess.run(info, capture_output=True, text=True, check=True).stdout)
    there = registrations(in_host(host, *info).stdout)
    assert there == here
    motd = next(p for p in pushed if p.endswith("-motd"))
    assert str(here[motd][4]).startswith("text:sha256:"), "the content-addressed path lost its address"
    package = next(p for p in pushed if "motd-1.0" in p)
    assert in_host(host, "cat", f"{package}/etc/motd").stdout == "hello"
    assert in_host(host, "cat", f"{package}/etc/motd.source").stdout.strip() == motd


async def test_an_untrusted_user_cannot_push_and_is_told_why(new_host: HostFactory, systems: Systems) -> None:
    host = new_host()
    alice = host.nonRootUser
    target = await engine.open_target(remote_for(host, user=alice), Profile(f"/nix/var/nix/profiles/per-user/{alice}/x",
                                                                             alice))
    try:
        for compression in ("none", "zstd"):
            with pytest.raises(RemoteCommandError) as refused:
                await push_closure(Nix(), target.for_store(), systems["web"], compression=compression)
            said = str(refused.value)
            assert said.startswith(f"`nix-store --serve --write` failed on {alice}@{host.address}:{host.port}")
            assert re.search(r"because it lacks a (valid )?signature", said), said
            assert "sudo" not in said and "zstd" not in said
            assert f"{alice} may not add unsigned store paths" in said and "trusted-users" in said
    finally:
        await target.conn.close()
    assert in_host(host, "test", "-e", systems["web"], check=False).returncode != 0


async def test_push_carries_on_over_the_connection_when_ssh_dies(new_host: HostFactory, systems: Systems) -> None:
    # `ssh` killed as soon as it starts: the push says why it changed course
    # and completes over the provider's own connection.
    host = new_host()
    killed: list[int] = []
    done = asyncio.Event()

    async def kill_ssh() -> None:
        me = str(os.getpid())
        while not done.is_set():
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
                if comm == "ssh" and fields[1] == me:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), 9)
                    killed.append(int(pid))
            await asyncio.sleep(0.005)

    statuses: list[str] = []
    killer = asyncio.ensure_future(kill_ssh())
    try:
        result = await deploy(host, systems["web"], statuses.append)
    finally:
        done.set()
        await killer
    assert killed, "no ssh process was started for the push"
    assert result.push.transport == "connection" and result.push.paths == 4
    assert any(s.startswith("copying over the provider's own SSH connection: ssh failed") for s in statuses), statuses
    assert current_system(host) == systems["web"] and http_version(host) == "1"


async def test_switch_changes_current_system_and_service(lab_host: labctl.LabHost, systems: Systems) -> None:
    result = await deploy(lab_host, systems["web-v2"])
    assert current_system(lab_host) == systems["web-v2"]
    assert http_version(lab_host) == "2"
    assert result.generation == current_gen(lab_host) == 2
    assert result.previous_generation == 1
    assert result.nixos_version == "24.05.lab-2"
    assert result.host_key == lab_host.hostKey


def test_nixos_deploy_places_secret_files_before_the_activation(lab_host: labctl.LabHost, systems: Systems,
                                                                tmp_path: Path) -> None:
    """The engine's command runs a machine's whole operation, secret files included, as a first `pulumi up` does."""
    secret = tmp_path / "db.key"
    secret.write_text("s3cret-db-password\n")
    out = subprocess.run(["nixos-deploy", "--host", lab_host.address, "--port", str(lab_host.port), "--key-file",
                          lab_host.privateKeyPath, "--store-path", systems["web-v2"],
                          "--secret-file", f"/run/keys/db={secret}"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert f"generation 2 {systems['web-v2']} (pushed " in out.stdout
    assert out.stdout.strip().endswith("; secret files: /run/keys/db")
    assert current_system(lab_host) == systems["web-v2"]
    assert in_host(lab_host, "cat", "/run/keys/db").stdout == "s3cret-db-password\n"
    assert in_host(lab_host, "stat", "-c", "%a %U", "/run/keys/db").stdout.strip() == "400 root"
    assert "s3cret" not in out.stdout + out.stderr
    bad = subprocess.run(["nixos-deploy", "--host", lab_host.address, "--store-path", systems["web-v2"],
                          "--secret-file", "/run/keys/db"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "'/run/keys/db': expected /path/on/host=local-file" in bad.stderr


async def test_magic_rollback_when_ssh_moves(lab_host: labctl.LabHost, systems: Systems) -> None:
    await deploy(lab_host, systems["web"])
    # Timed from the new generation's registration, just before activation (the
    # push before it takes what the machine's load makes it take).
    registered: list[float] = []

    def status(line: str) -> None:
        if line.startswith("registering generation") and not registered:
            registered.append(time.monotonic())

    with pytest.raises(DeployError) as err:
        await deploy(lab_host, systems["web-moves-ssh"], confirm_timeout=4, status=status)
    assert registered and time.monotonic() - registered[0] < 4 + 10
    msg = str(err.value)
    assert "magic rollback" in msg and "Rolled back" in msg and "generation 2" in msg
    assert err.value.rolled_back
    # The target is back where it was, reachable on the original port.
    assert current_system(lab_host) == systems["web"]
    assert current_gen(lab_host) == 2
    assert 3 not in gens(lab_host)
    assert http_version(lab_host) == "1"
    state = await engine.read_state(remote_for(lab_host), Profile())
    assert state.current_system == systems["web"]


@pytest.mark.parametrize("config,check,expect", [
    ("web-activation-fails", None, "activation exited with status 4"),
    ("web-http-500", HealthCheck(http="http://{addr}:8080/", retries=1, interval=0.2), "HTTP status 500"),
    ("web-http-down", HealthCheck(tcp=8080, host="{addr}", retries=1, interval=0.2), "connection refused"),
    ("web", HealthCheck(command="exit 3", retries=0, name="always fails"), "always fails"),
])
async def test_auto_rollback(lab_host: labctl.LabHost, systems: Systems, config: str, check: HealthCheck | None,
                             expect: str) -> None:
    await deploy(lab_host, systems["web-v2"])
    checks = ()
    if check is not None:
        check = dataclasses.replace(
            check, http=check.http.format(addr=lab_host.address) if check.http else None,
            host=check.host.format(addr=lab_host.address))
        checks = (check,)
    with pytest.raises(DeployError) as err:
        await deploy(lab_host, systems[config], health_checks=checks)
    assert expect in str(err.value)
    assert "Rolled back: generation 2" in str(err.value)
    assert current_system(lab_host) == systems["web-v2"]
    assert current_gen(lab_host) == 2 and gens(lab_host) == [1, 2]
    assert http_version(lab_host) == "2"


async def test_auto_rollback_off_keeps_the_failed_generation(lab_host: labctl.LabHost, systems: Systems) -> None:
    with pytest.raises(DeployError) as err:
        await deploy(lab_host, systems["web-activation-fails"], auto_rollback=False)
    assert "autoRollback is off" in str(err.value)
    assert current_gen(lab_host) == 2


async def test_killed_connection_during_activation_is_not_half_switched(
        lab_host: labctl.LabHost, systems: Systems, tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "f", """{ outputs = { self }: let lab = import ./lib.nix; in {
      nixosConfigurations.slow = lab.nixosConfiguration { version = "slow"; faults.slowActivation = 3; };
    }; }""")
    slow = await Nix().build(parse_flake_ref(f"{flake}#slow"))
    await deploy(lab_host, systems["web"])
    seen: list[str] = []
    dep = engine.Deployment(DeployRequest(remote_for(lab_host), slow, confirm_timeout=3), Nix(), status=seen.append)
    task = asyncio.create_task(dep.run())
    while not any(s.startswith("activating") for s in seen) and not task.done():
        await asyncio.sleep(0.05)
    task.cancel()  # a cancelled deployment tells the supervisor to roll back, and waits for it
    with pytest.raises(DeployError, match=r"the deployment was cancelled\. Rolled back: generation 2"):
        await task
    assert current_gen(lab_host) == 2
    assert current_system(lab_host) == systems["web"]
    assert http_version(lab_host) == "1"
    assert 3 not in gens(lab_host)


async def test_interrupted_push_registers_nothing_and_next_push_completes(
        lab_host: labctl.LabHost, tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "f", """{ outputs = { self }: let lab = import ./lib.nix; in {
      nixosConfigurations.big = lab.nixosConfiguration { version = "big";
        packages = [ { name = "blob"; version = "1"; size = 64000000; } ]; };
    }; }""")
    big = await Nix().build(parse_flake_ref(f"{flake}#big"))
    seen: list[str] = []
    task = asyncio.create_task(engine.deploy(DeployRequest(remote_for(lab_host), big), status=seen.append))
    while not any(s.startswith("copying") for s in seen) and not task.done():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert gens(lab_host) == [1]
    assert in_host(lab_host, "nix-store", "--check-validity", big, check=False).returncode != 0
    result = await deploy(lab_host, big)
    assert result.push.paths >= 1 and current_system(lab_host) == big


async def test_boot_test_and_dry_activate(lab_host: labctl.LabHost, systems: Systems) -> None:
    await deploy(lab_host, systems["web"], action="test")
    assert current_system(lab_host) == systems["web"] and gens(lab_host) == [1]
    await deploy(lab_host, systems["web-v2"], action="boot")
    assert current_system(lab_host) == systems["web"] and current_gen(lab_host) == 2
    dry = await deploy(lab_host, systems["web-v3"], action="dry-activate")
    assert "would restart the following units: lab-service.service" in dry.output
    assert current_system(lab_host) == systems["web"] and current_gen(lab_host) == 2


async def test_profile_for_a_non_root_user_via_sudo(lab_host: labctl.LabHost, systems: Systems,
                                                    tmp_path: Path) -> None:
    app1 = await Nix().build(parse_flake_ref(f"path:{labctl.LAB_FLAKE}#app-v1", nixos=False))
    app2 = await Nix().build(parse_flake_ref(f"path:{labctl.LAB_FLAKE}#app-v2", nixos=False))
    profile = Profile("/nix/var/nix/profiles/per-user/alice/app", "alice")
    activate = 'echo "activated $(readlink -f "$PROFILE") as $(id -un)" >> /tmp/app-activations-$(id -un)'
    r1 = await deploy(lab_host, app1, profile=profile, activate_command=activate)
    r2 = await deploy(lab_host, app2, profile=profile, activate_command=activate)
    assert (r1.generation, r2.generation) == (1, 2)
    owner = in_host(lab_host, "stat", "-c", "%U", "/nix/var/nix/profiles/per-user/alice/app-2-link").stdout.strip()
    assert owner == "alice"
    log = in_host(lab_host, "cat", "/tmp/app-activations-alice").stdout
    assert f"activated {app2} as alice" in log
    with pytest.raises(DeployError):
        await deploy(lab_host, app1, profile=profile, activate_command="exit 9")
    assert current_gen(lab_host, profile.path) == 2


async def test_the_runner_elevates_run_and_start_and_names_the_callers_argv(
        lab_host: labctl.LabHost, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="nixos_provider.engine.transport.process")
    conn = await connect(remote_for(lab_host))
    try:
        alice = Target(conn, "alice")
        assert (await alice.run(["id", "-un"])).stdout == "alice\n"
        assert f"{conn.target} as alice: id -un" in caplog.text and "sudo" not in caplog.text
        with pytest.raises(RemoteCommandError) as failed:
            await alice.run(["sh", "-c", "echo nope >&2; exit 7", "sh", "; x"])
        assert failed.value.argv == ["sh", "-c", "echo nope >&2; exit 7", "sh", "; x"]
        # The first line names the command; sudo's own warnings may follow in the stderr tail.
        first, *tail = str(failed.value).splitlines()
        assert first == f"`sh -c echo nope >&2; exit 7 ...` failed on {conn.target} (exit 7)"
        assert failed.value.exit_status == 7 and tail[-1] == "  nope"
        with pytest.raises(RemoteCommandError, match="timed out after 1s"):
            await alice.run(["sleep", "5"], timeout=1)
        # start: the same elevation, with streams.
        proc = await alice.start(["sh", "-c", "id -un; cat; echo done >&2"])
        try:
            proc.stdin.write(b"streamed\n")
            proc.stdin.write_eof()
            assert await proc.stdout.read() == b"alice\nstreamed\n"
            done = await proc.wait()
            assert done.exit_status == 0 and done.stderr.endswith("done\n")
        finally:
            await proc.close()
    finally:
        await conn.close()


async def test_connection_errors_are_one_human_line(lab_host: labctl.LabHost, systems: Systems) -> None:
    other_key = labctl.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/dev/stdout"], input="y\n")
    del other_key
    with pytest.raises(HostKeyMismatch) as mismatch:
        await engine.read_state(remote_for(lab_host, host_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBq8ZNH9lIzGYcG0KHmQX0cLgHQ6YXZxqD1z2ePHf0lJ"),
                                Profile())
    msg = str(mismatch.value)
    assert "host key mismatch" in msg and "SHA256:" in msg and msg.count("SHA256:") == 2 and "\n" not in msg
    wrong = Remote(lab_host.address, lab_host.port, "root",
                   Credentials(private_key=Path(labctl.__file__).parent.joinpath("lib.nix").read_text()))
    with pytest.raises(ConnectError) as bad_key:
        await engine.read_state(wrong, Profile())
    assert str(bad_key.value).startswith(f"the private key for root@{lab_host.address}:{lab_host.port} is not a "
                                         "private key asyncssh can read")
    assert bad_key.value.blames is Setting.PRIVATE_KEY and "\n" not in str(bad_key.value)
    closed = dataclasses.replace(remote_for(lab_host), port=2399, retries=1)
    with pytest.raises(ConnectError) as refused:
        await engine.read_state(closed, Profile())
    assert str(refused.value) == f"cannot connect to root@{lab_host.address}:2399: connection refused (after 2 attempts)"
    with pytest.raises(NixError) as attr:
        await Nix().evaluate(parse_flake_ref(f"path:{labctl.LAB_FLAKE}#no-such-host"))
    assert "does not provide attribute" in str(attr.value) and "Traceback" not in str(attr.value)


async def test_password_auth_pinned_key_and_jump_host(new_host: HostFactory, systems: Systems) -> None:
    jump, target = new_host(), new_host()
    by_password = Remote(target.address, target.port, "alice", Credentials(password=target.nonRootPassword),
                         host_key=target.hostKey)
    state = await engine.read_state(by_password, Profile("/nix/var/nix/profiles/per-user/alice/none"))
    assert state.host_key == target.hostKey and state.generation is None
    via_jump = remote_for(target, host_key=target.hostKey, proxy=remote_for(jump, host_key=jump.hostKey))
    result = await engine.deploy(DeployRequest(via_jump, systems["web"]))
    assert result.generation == 2 and current_system(target) == systems["web"]
    assert current_system(jump) == systems["base"]


async def test_five_hosts_concurrently(new_host: HostFactory, systems: Systems) -> None:
    hosts = [new_host() for _ in range(5)]
    configs = ["web", "web-v2", "web-v3", "web-v2", "web"]
    results = await asyncio.gather(*(deploy(h, systems[c]) for h, c in zip(hosts, configs, strict=True)))
    for host, config, result in zip(hosts, configs, results, strict=True):
        assert result.store_path == systems[config] == current_system(host)
        assert result.host_key == host.hostKey
        assert http_version(host) == {"web": "1", "web-v2": "2", "web-v3": "3"}[config]


async def test_compressed_push_and_substitute_on_destination(lab_host: labctl.LabHost, systems: Systems) -> None:
    result = await deploy(lab_host, systems["web-v3"], compress="ssh", substitute_on_destination="always")
    assert result.push.paths == 5 and current_system(lab_host) == systems["web-v3"]


async def test_build_on_the_target(lab_host: labctl.LabHost, tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "f", """{ outputs = { self }: let lab = import ./lib.nix; in {
      nixosConfigurations.remote = lab.nixosConfiguration { version = "remote-built";
        packages = [ { name = "only-on-target"; version = "1.0"; size = 4096; } ]; };
    }; }""")
    nix = Nix()
    ref = parse_flake_ref(f"{flake}#remote")
    evaluation = await nix.evaluate(ref)
    out = evaluation.out_path
    result = await deploy(lab_host, out, build_drv=evaluation.drv_path)
    assert current_system(lab_host) == out and http_version(lab_host) == "remote-built"
    assert not await nix.is_valid(out), "the system was built on the deployer"
    assert result.push.paths >= 2  # the derivations and sources, not the outputs


BUILT_ELSEWHERE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.built = lab.nixosConfiguration { version = "built-on-%s";
    packages = [ { name = "built-elsewhere"; version = "%s"; size = 2097152; } ]; };
}; }"""


async def test_a_build_host_relays_to_a_user_the_target_does_not_trust(new_host: HostFactory, tmp_path: Path) -> None:
    """The target's SSH user imports through sudo (its Nix does not trust it): the build host's copy is refused, so
    the deployer relays, and says why."""
    builder, target = new_host(), new_host()
    nonce = uuid.uuid4().hex[:8]
    flake = write_flake(tmp_path / "f", BUILT_ELSEWHERE % (nonce, nonce))
    evaluation = await Nix().evaluate(parse_flake_ref(f"{flake}#built"))
    warnings: list[str] = []
    alice = target.nonRootUser
    req = DeployRequest(remote_for(target, user=alice), evaluation.out_path,
                        build_drv=evaluation.drv_path, build_host=remote_for(builder))
    result = await engine.deploy(req, warn=warnings.append)
    assert current_system(target) == evaluation.out_path
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"buildHost: the build host could not copy to {alice}@{target.address}:{target.port}")
    assert "signature" in warnings[0] and warnings[0].endswith("through the deployer"), warnings
    assert result.push.bytes > 2 * 1024 * 1024, result.push  # the package went through the deployer


async def test_a_build_host_copies_to_a_target_behind_a_jump_host(new_host: HostFactory, tmp_path: Path) -> None:
    """The target's name resolves only on its jump host, as a private name behind a bastion does: the build host
    reaches it through that jump host, with both pinned keys and both keys in the forwarded agent, and the deployer
    relays nothing."""
    builder, jump, target = new_host(), new_host(), new_host()
    in_host(jump, "sh", "-c", f'echo "{target.address} behind-the-jump" >> /etc/hosts')
    nonce = uuid.uuid4().hex[:8]
    flake = write_flake(tmp_path / "f", BUILT_ELSEWHERE % (nonce, nonce))
    evaluation = await Nix().evaluate(parse_flake_ref(f"{flake}#built"))
    warnings: list[str] = []
    behind = dataclasses.replace(remote_for(target, host_key=target.hostKey, proxy=remote_for(jump, host_key=jump.hostKey)),
                                 host="behind-the-jump")
    req = DeployRequest(behind, evaluation.out_path, build_drv=evaluation.drv_path, build_host=remote_for(builder))
    result = await engine.deploy(req, warn=warnings.append)
    assert current_system(target) == evaluation.out_path and not warnings, warnings
    assert result.push.bytes < 256 * 1024, result.push  # the derivations only: the system went builder -> jump -> target
    assert in_host(jump, "nix-store", "--check-validity", evaluation.out_path, check=False).returncode != 0


async def test_a_failed_build_on_the_build_host_changes_nothing(new_host: HostFactory, tmp_path: Path) -> None:
    builder, target = new_host(), new_host()
    flake = write_flake(tmp_path / "f", """{ outputs = { self }: let lab = import ./lib.nix; in {
      nixosConfigurations.broken = lab.nixosConfiguration { version = "broken";
        packages = [ (derivation { name = "fails-1"; system = "x86_64-linux"; builder = "/bin/sh";
                                   args = [ "-c" "echo this package does not build >&2; exit 3" ]; }) ]; };
    }; }""")
    evaluation = await Nix().evaluate(parse_flake_ref(f"{flake}#broken"))
    before = current_system(target)
    req = DeployRequest(remote_for(target), evaluation.out_path, build_drv=evaluation.drv_path,
                        build_host=remote_for(builder))
    with pytest.raises(EngineError) as failed:
        await engine.deploy(req)
    said = str(failed.value)
    assert re.match(rf"building {re.escape(evaluation.drv_path)} on the build host root@{re.escape(builder.address)}:"
                    rf"{builder.port} failed \(exit \d+\):", said), said
    assert "this package does not build" in said
    assert current_system(target) == before


def passphrase_login(host: labctl.LabHost, tmp_path: Path) -> Remote:
    """A new key with the passphrase `s3cret`, authorized for root on host: the login that uses it."""
    key = tmp_path / "id_pass"
    labctl.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret", "-f", str(key)])
    auth = host.state / "etc-upper/lab/authorized_keys/root"
    auth.write_text(auth.read_text() + (tmp_path / "id_pass.pub").read_text())
    return Remote(host.address, host.port, "root", Credentials(private_key=key.read_text(), private_key_password="s3cret"))


@contextlib.asynccontextmanager
async def agent_login(host: labctl.LabHost, tmp_path: Path) -> AsyncIterator[Remote]:
    """An ssh-agent holding the lab key, for as long as the block runs: the login through it."""
    sock = tmp_path / "agent.sock"
    agent = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", str(sock), stdout=asyncio.subprocess.DEVNULL)
    try:
        while not sock.exists():
            await asyncio.sleep(0.05)
        labctl.run(["ssh-add", host.privateKeyPath], env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        yield Remote(host.address, host.port, "root", Credentials(agent_socket_path=str(sock)))
    finally:
        agent.kill()
        await agent.wait()


async def test_passphrase_key_and_agent(lab_host: labctl.LabHost, tmp_path: Path) -> None:
    with_pass = passphrase_login(lab_host, tmp_path)
    key = tmp_path / "id_pass"
    assert (await engine.read_state(with_pass, Profile())).host_key == lab_host.hostKey
    wrong = dataclasses.replace(with_pass, credentials=Credentials(private_key=key.read_text(),
                                                                   private_key_password="nope"))
    with pytest.raises(ConnectError, match="the passphrase of the private key is wrong"):
        await engine.read_state(wrong, Profile())
    async with agent_login(lab_host, tmp_path) as via_agent:
        assert (await engine.read_state(via_agent, Profile())).host_key == lab_host.hostKey


async def test_push_through_ssh_with_a_passphrase_key_and_with_an_agent(new_host: HostFactory, systems: Systems,
                                                                        tmp_path: Path) -> None:
    # `ssh` gets the key decrypted, in memory (it must not prompt), or the agent.
    host = new_host()
    with_pass = passphrase_login(host, tmp_path)
    result = await engine.deploy(DeployRequest(with_pass, systems["web"], compress="none"))
    assert result.push.transport == "openssh" and result.push.paths == 4
    assert current_system(host) == systems["web"]
    async with agent_login(host, tmp_path) as via_agent:
        result = await engine.deploy(DeployRequest(via_agent, systems["web-v2"], compress="none"))
        assert result.push.transport == "openssh" and result.push.paths == 2
        assert current_system(host) == systems["web-v2"]


async def test_every_local_nix_call_uses_the_configured_installation(
        lab_host: labctl.LabHost, systems: Systems, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nixCommand names an installation: its nix-store does the export, never the one PATH finds first."""
    real_nix = shutil.which("nix")
    assert real_nix is not None
    install = tmp_path / "nix-install" / "bin"
    install.mkdir(parents=True)
    (install / "nix").symlink_to(real_nix)
    calls = tmp_path / "nix-store-calls"
    (install / "nix-store").write_text(
        f'#!/bin/bash\necho "$*" >> {calls}\nexec -a nix-store {real_nix} "$@"\n')
    (install / "nix-store").chmod(0o755)
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "nix-store").write_text("#!/bin/sh\necho 'the nix-store on PATH was used' >&2\nexit 97\n")
    (decoy / "nix-store").chmod(0o755)
    monkeypatch.setenv("PATH", f"{decoy}:{os.environ['PATH']}")

    nix = Nix([str(install / "nix")])
    result = await engine.deploy(DeployRequest(remote_for(lab_host), systems["web"]), nix)
    assert result.push.paths == 4
    assert current_system(lab_host) == systems["web"]
    used = calls.read_text().splitlines()
    assert any(line.startswith("-qR ") for line in used)
    assert any(line.startswith("--export ") for line in used)

    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "nix").symlink_to(real_nix)
    with pytest.raises(NixError, match="has no `nix-store` beside it"):
        await Nix([str(lonely / "nix")]).closure(systems["web"])


COMPRESSIBLE_FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.logs = lab.nixosConfiguration { version = "logs"; packages = [ (derivation {
    name = "logs-1.0"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    args = [ "-c" "mkdir -p $out/share && yes 'GET /index.html HTTP/1.1 200' | head -c 8388608 > $out/share/access.log" ];
  }) ]; };
}; }"""


async def test_zstd_push_sends_a_fraction_and_falls_back_without_zstd(
        new_host: HostFactory, tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "f", COMPRESSIBLE_FLAKE)
    system = await Nix().build(parse_flake_ref(f"{flake}#logs"))
    host = new_host()
    statuses: list[str] = []
    result = await engine.deploy(DeployRequest(remote_for(host), system), status=statuses.append)
    assert result.push.compression == "zstd"  # "auto", and both sides have zstd
    assert result.push.bytes > 8 * 1024 * 1024
    assert result.push.wire_bytes < result.push.bytes / 50
    assert current_system(host) == system
    assert any("sent with zstd" in s for s in statuses)

    # A target without zstd: "zstd" says so and sends the stream as it is.
    bare = new_host()
    in_host(bare, "mount", "--bind", "/dev/null", "/usr/bin/zstd")
    statuses.clear()
    result = await engine.deploy(DeployRequest(remote_for(bare), system, compress="zstd"), status=statuses.append)
    assert result.push.compression == "none" and result.push.wire_bytes == result.push.bytes
    assert any("zstd is not installed on" in s and "sending uncompressed" in s for s in statuses)
    assert current_system(bare) == system


# -- destroy's rollback (the supervisor's rollback-to task) -----------------------------


async def test_rollback_to_returns_to_the_generation_and_reactivates_it(lab_host: labctl.LabHost,
                                                                        systems: Systems) -> None:
    await deploy(lab_host, systems["web"])
    await deploy(lab_host, systems["web-v2"])
    status: list[str] = []
    now = await engine.rollback_to(remote_for(lab_host), Profile(), 2, status=status.append)
    assert current_system(lab_host) == systems["web"] and http_version(lab_host) == "1"
    assert current_gen(lab_host) == 2 and now.generation is not None and now.generation.number == 2
    assert now.current_system == systems["web"]
    assert f"re-activating generation 2 ({systems['web']})" in status
    # The supervisor's workdir is gone; so is its lock holder.
    assert in_host(lab_host, "sh", "-c", "ls -d /tmp/pulumi-nixos.* 2>/dev/null", check=False).stdout == ""


async def test_rollback_to_a_collected_generation_registers_its_path_again(lab_host: labctl.LabHost,
                                                                           systems: Systems) -> None:
    await deploy(lab_host, systems["web"])
    await deploy(lab_host, systems["web-v2"])
    in_host(lab_host, "nix-env", "-p", SYSTEM, "--delete-generations", "2")
    with pytest.raises(EngineError, match=r"generation 2 of /nix/var/nix/profiles/system no longer exists on .*"
                                          r"so there is nothing to roll back to"):
        await engine.rollback_to(remote_for(lab_host), Profile(), 2)
    assert current_system(lab_host) == systems["web-v2"] and gens(lab_host) == [1, 3]
    status: list[str] = []
    now = await engine.rollback_to(remote_for(lab_host), Profile(), 2, status=status.append,
                                   fallback_path=systems["web"])
    assert f"generation 2 is gone; re-registering {systems['web']}" in status
    assert current_system(lab_host) == systems["web"] and http_version(lab_host) == "1"
    assert gens(lab_host) == [1, 3, 4] and now.generation is not None and now.generation.number == 4


async def test_a_rollback_whose_activation_fails_says_where_the_profile_points(lab_host: labctl.LabHost,
                                                                               systems: Systems) -> None:
    with pytest.raises(DeployError):
        await deploy(lab_host, systems["web-activation-fails"], auto_rollback=False)
    await deploy(lab_host, systems["web"])
    output: list[str] = []
    with pytest.raises(EngineError) as err:
        await engine.rollback_to(remote_for(lab_host), Profile(), 2, output=output.append)
    msg = str(err.value)
    assert msg.startswith(f"rolling /nix/var/nix/profiles/system on {remote_for(lab_host).target} back to "
                          "generation 2: its activation exited with status 4; the profile now points at generation 2")
    assert "activation output (last lines):" in msg and current_gen(lab_host) == 2
    assert any("the following units failed: lab-service.service" in line for line in output)
