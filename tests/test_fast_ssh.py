"""The fast tier: the engine over real SSH to a server in this process. No root, no lab, no Nix.

`pytest -m "not lab"` runs these (and the other tests that need no lab) in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
from inproc_ssh import Doorman, InProcessSSHServer, free_port
from nixos_provider.engine.errors import ConnectError, HostBusy, RemoteCommandError
from nixos_provider.engine.models import Credentials, Remote
from nixos_provider.engine.target import activation
from nixos_provider.engine.target.activation import Supervisor
from nixos_provider.engine.target.supervisor_protocol import ActivationSpec, Cause, Phase, RollbackSpec
from nixos_provider.engine.transport.process import Target
from nixos_provider.engine.transport.ssh import Connection, connect, fingerprint

pytestmark = pytest.mark.timeout(60)
HOSTILE = ["x; touch /tmp/pwned #", "$(id)", "`id`", "a'b\"c", "new\nline", "*", "-n", ""]


@pytest.fixture
async def server() -> AsyncIterator[InProcessSSHServer]:
    s = InProcessSSHServer()
    await s.start()
    yield s
    await s.stop()


def remote(server: InProcessSSHServer, user: str = "deployer", **kw: object) -> Remote:
    return Remote("127.0.0.1", server.port, user, Credentials(private_key=server.client_key_text),
                  **kw)  # type: ignore[arg-type]


@pytest.fixture
async def conn(server: InProcessSSHServer) -> AsyncIterator[Connection]:
    c = await connect(remote(server))
    yield c
    await c.close()


# -- commands: quoting and elevation, exactly as the host receives them --------


async def test_every_argument_reaches_the_host_as_it_was_given(server: InProcessSSHServer, conn: Connection) -> None:
    res = await Target(conn).run(["printf", "%s\\0", *HOSTILE])
    assert res.stdout.split("\0")[:-1] == HOSTILE
    assert server.record.commands == [shlex.join(["printf", "%s\\0", *HOSTILE])]
    assert not Path("/tmp/pwned").exists()


async def test_input_goes_to_the_command_and_its_failure_names_the_argv(conn: Connection) -> None:
    res = await Target(conn).run(["wc", "-c"], input=b"12345")
    assert res.stdout.strip() == "5"
    with pytest.raises(RemoteCommandError) as err:
        await Target(conn).run(["sh", "-c", "echo broken >&2; exit 3"])
    text = str(err.value)
    assert "deployer@127.0.0.1" in text and "exit" in text and "broken" in text and "sh -c" in text


@pytest.mark.parametrize(("run_as", "prefix"), [
    (None, []),
    ("deployer", []),
    ("root", ["sudo", "-n", "--"]),
    ("alice", ["sudo", "-n", "-H", "-u", "alice", "--"]),
])
async def test_elevation_is_the_only_difference_in_what_is_run(server: InProcessSSHServer, conn: Connection,
                                                               run_as: str | None, prefix: list[str]) -> None:
    await Target(conn, run_as).run(["nix-env", "--list-generations"], check=False)
    assert server.record.commands == [shlex.join([*prefix, "nix-env", "--list-generations"])]


async def test_a_command_past_its_timeout_fails_saying_so(conn: Connection) -> None:
    started = time.monotonic()
    with pytest.raises(RemoteCommandError, match="timed out after 1s"):
        await Target(conn).run(["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 5


async def test_a_connection_lost_during_a_command_is_a_connect_error(conn: Connection) -> None:
    running = asyncio.ensure_future(Target(conn).run(["sleep", "30"]))
    await asyncio.sleep(0.3)
    conn.abort()
    with pytest.raises(ConnectError, match=r"lost the SSH connection to deployer@127\.0\.0\.1:.* while running `sleep`"):
        await running


# -- connecting: retries, backoff, host keys, authentication ---------------------


async def test_retries_back_off_and_then_say_how_many_attempts_failed() -> None:
    door = Doorman()
    await door.start()
    try:
        with pytest.raises(ConnectError) as err:
            await connect(Remote("127.0.0.1", door.port, "root", Credentials(password="x"), retries=2))
    finally:
        await door.stop()
    assert "after 3 attempts" in str(err.value)  # retries: how many more after the first
    assert len(door.arrivals) == 3
    gaps = [b - a for a, b in zip(door.arrivals, door.arrivals[1:], strict=False)]
    assert 0.4 < gaps[0] < 0.9 and 0.9 < gaps[1] < 1.6, gaps  # 0.5 s, then twice that


async def test_a_refused_port_is_named_in_the_error() -> None:
    port = free_port()
    with pytest.raises(ConnectError, match=rf"cannot connect to root@127.0.0.1:{port}: connection refused "
                                           r"\(after 1 attempt\)"):
        await connect(Remote("127.0.0.1", port, "root", Credentials(password="x"), retries=0))


async def test_a_host_that_never_sends_its_banner_costs_each_attempt_one_connect_timeout() -> None:
    # A wedged machine: the kernel accepts the TCP connection, sshd never answers. With a pinned key, no second
    # connection asks it for its key: that one would wait as long again.
    arrivals: list[float] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrivals.append(time.monotonic())
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pinned = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    started = time.monotonic()
    try:
        with pytest.raises(ConnectError) as err:
            await connect(Remote("127.0.0.1", port, "root", Credentials(password="x"), host_key=pinned,
                                 connect_timeout=1, retries=1))
    finally:
        server.close()
    waited = time.monotonic() - started
    assert str(err.value) == (f"cannot connect to root@127.0.0.1:{port}: timed out during the SSH banner and key "
                              "exchange (connectTimeout 1 s, 2 attempts)")
    assert len(arrivals) == 2
    assert 2.4 < waited < 3.5, waited  # (retries + 1) × connectTimeout, plus 0.5 s of backoff


async def test_a_host_that_comes_up_late_is_reached_by_retrying() -> None:
    late = InProcessSSHServer()
    port = free_port()

    async def start_later() -> None:
        await asyncio.sleep(0.7)
        await late.start(port)

    starting = asyncio.ensure_future(start_later())
    try:
        c = await connect(Remote("127.0.0.1", port, "root", Credentials(private_key=late.client_key_text),
                                 retries=4))
        await c.close()
    finally:
        await starting
        await late.stop()
    assert late.record.connections == 1


async def test_aes_gcm_is_chosen_when_the_host_offers_it(conn: Connection) -> None:
    # asyncssh's own first choice, chacha20-poly1305, costs the deployer far more CPU per byte pushed.
    assert conn.conn.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
    assert conn.conn.get_extra_info("recv_cipher") == "aes128-gcm@openssh.com"


@pytest.mark.parametrize("offered", ["chacha20-poly1305@openssh.com", "aes128-ctr"])
async def test_a_host_without_aes_gcm_is_reached_with_a_cipher_it_has(offered: str) -> None:
    only = InProcessSSHServer(encryption_algs=[offered])
    await only.start()
    try:
        async with await connect(remote(only)) as c:
            assert c.conn.get_extra_info("send_cipher") == offered
            assert (await Target(c).run(["echo", "reached"])).stdout == "reached\n"
    finally:
        await only.stop()


async def test_first_use_returns_the_host_key_to_pin(server: InProcessSSHServer) -> None:
    c = await connect(remote(server))
    await c.close()
    assert c.host_key == server.host_key_line


async def test_a_pinned_key_that_differs_is_refused_before_any_credential_is_sent(server: InProcessSSHServer) -> None:
    other = InProcessSSHServer().host_key_line
    with pytest.raises(ConnectError) as err:
        await connect(remote(server, host_key=other, retries=3))
    text = str(err.value)
    assert f"the pinned key is {fingerprint(other)} but the host presented {fingerprint(server.host_key_line)}" in text
    assert server.record.auth_attempts == 0 and server.record.users == []
    assert server.record.connections == 1  # a mismatch is not retried


async def test_a_pinned_key_of_another_type_is_still_named_as_a_mismatch(server: InProcessSSHServer) -> None:
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048).export_public_key("openssh").decode().strip()
    with pytest.raises(ConnectError, match=r"host key mismatch .* but the host presented .*ssh-ed25519"):
        await connect(remote(server, host_key=rsa))
    assert server.record.auth_attempts == 0


async def test_a_refused_login_is_not_retried_and_says_which_credential(server: InProcessSSHServer) -> None:
    server.refuse_logins = True
    with pytest.raises(ConnectError, match=r"authentication as deployer@127\.0\.0\.1:.* failed: permission denied"):
        await connect(remote(server, retries=3))
    assert server.record.connections == 1


# -- the supervisor protocol, with the real supervisor.sh ---------------------------


def profile_spec(tmp_path: Path, activate: str, *, magic: bool = True, ready_timeout: int = 30) -> ActivationSpec:
    """A new profile (no previous generation) of a small store path, whose activation runs `activate`. The
    supervisor registers it with this machine's nix-env."""
    new = tmp_path / "new-path"
    new.mkdir(exist_ok=True)
    (new / "app").write_text("app\n")
    added = subprocess.run(["nix-store", "--add", str(new)], capture_output=True, text=True, check=True)
    return ActivationSpec("profile", str(tmp_path / "profiles" / "app"), added.stdout.strip(), None, None, None,
                          "switch", magic, 3, True, 20, activate, ready_timeout)


async def supervise(server: InProcessSSHServer, conn: Connection, spec: ActivationSpec,
                    status: list[str], before_go: float = 0, keep_alive: bool = True) -> Supervisor:
    Path(spec.profile).parent.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(Target(conn), lambda: connect(remote(server, retries=1)), spec, status.append)
    await sup.upload()
    await sup.start()
    await sup.wait_ready(time.monotonic() + 10)
    async with (sup.kept_alive() if keep_alive else contextlib.nullcontext()):
        await asyncio.sleep(before_go)  # the deployer reading the host
        await sup.go(hold=10)
    return sup


async def test_supervisor_activates_is_confirmed_over_a_new_connection_and_finishes(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path) -> None:
    marker = tmp_path / "activated"
    status: list[str] = []
    spec = profile_spec(tmp_path, f"echo \"$PROFILE\" > {shlex.quote(str(marker))}")
    sup = await supervise(server, conn, spec, status)
    registered = await sup.registration(time.monotonic() + 20)
    # The supervisor made the profile's first generation, under its lock.
    assert (registered.new_gen, registered.prev_gen, registered.prev_path) == (1, None, None)
    assert os.readlink(spec.profile) == "app-1-link" and os.readlink(f"{spec.profile}-1-link") == spec.new_path
    outcome = await sup.follow(time.monotonic() + 20)
    assert outcome.state.phase is Phase.CONFIRMED
    assert marker.read_text().strip() == str(tmp_path / "profiles" / "app")
    assert server.record.connections == 2  # the deployer's, and the one that carried the token
    done = await sup.finish(time.monotonic() + 10)
    assert done.state.phase is Phase.DONE
    # (`activating` may pass between two polls.)
    waiting, active = "waiting for confirmation (magic rollback)", f"{spec.new_path} is active"
    assert waiting in status and active in status and status.index(waiting) < status.index(active)
    # What ran on the host, in order: upload, probe for systemd, start (detached), then polls and control files.
    commands = server.record.commands
    assert "supervisor.sh" in commands[0] and "systemd-run" in commands[1]
    assert shlex.split(commands[2])[5:8] == ["setsid", "-f", "/bin/sh"]
    assert any("go" in shlex.split(c) for c in commands) and any("finish" in shlex.split(c) for c in commands)
    await sup.cleanup()
    assert not Path(sup.workdir).exists()


async def test_supervisor_rolls_back_by_itself_when_no_new_connection_can_confirm(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path) -> None:
    status: list[str] = []
    spec = profile_spec(tmp_path, "true")
    sup = await supervise(server, conn, spec, status)
    server.refuse_logins = True  # as if the new system broke SSH
    outcome = await sup.follow(time.monotonic() + 20)
    assert outcome.state.phase is Phase.ROLLED_BACK and outcome.state.cause is Cause.UNCONFIRMED
    assert any("cannot reach the host after activation" in s for s in status)
    assert "no confirmation within 3s" in outcome.output
    # The profile did not exist before: it is gone again, generation and all.
    assert not os.path.lexists(spec.profile) and not os.path.lexists(f"{spec.profile}-1-link")


async def test_a_failed_activation_rolls_back_and_the_output_says_why(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path) -> None:
    sup = await supervise(server, conn, profile_spec(tmp_path, "echo 'unit foo failed' >&2; exit 4"), [])
    outcome = await sup.follow(time.monotonic() + 20)
    assert outcome.state.phase is Phase.ROLLED_BACK and outcome.state.cause is Cause.ACTIVATION_FAILED
    assert outcome.state.exit_status == 4
    assert "unit foo failed" in outcome.output and "activation exited with status 4" in outcome.output


async def test_a_second_deployment_of_the_same_profile_is_told_who_holds_it(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path) -> None:
    spec = profile_spec(tmp_path, "sleep 2", magic=False)
    first = await supervise(server, conn, spec, [])
    second = Supervisor(Target(conn), lambda: connect(remote(server)), spec)
    await second.upload()
    await second.start()
    with pytest.raises(HostBusy, match=rf"being deployed by someone else: deployment {first.workdir} of "):
        await second.wait_ready(time.monotonic() + 10)
    assert (await first.follow(time.monotonic() + 20)).ok
    await first.finish(time.monotonic() + 10)


async def test_a_slow_deployer_is_waited_for_while_it_says_it_is_alive(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activation, "KEEPALIVE_INTERVAL", 0.5)
    marker = tmp_path / "activated"
    sup = await supervise(server, conn, profile_spec(tmp_path, f"touch {shlex.quote(str(marker))}", ready_timeout=2),
                          [], before_go=4)
    assert (await sup.follow(time.monotonic() + 20)).state.phase is Phase.CONFIRMED
    assert marker.exists()
    await sup.finish(time.monotonic() + 10)


async def test_a_deployer_that_says_nothing_frees_the_lock_after_the_ready_timeout(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path) -> None:
    marker = tmp_path / "activated"
    spec = profile_spec(tmp_path, f"touch {shlex.quote(str(marker))}", ready_timeout=2)
    sup = await supervise(server, conn, spec, [], before_go=4, keep_alive=False)
    outcome = await sup.follow(time.monotonic() + 20)
    assert outcome.state.phase is Phase.ROLLED_BACK and outcome.state.cause is Cause.NO_WORD
    assert not marker.exists() and not os.path.lexists(spec.profile)  # it never registered nor activated
    # The lock is free: the next deployment of the profile starts at once.
    second = Supervisor(Target(conn), lambda: connect(remote(server)), spec)
    await second.upload()
    await second.start()
    await second.wait_ready(time.monotonic() + 10)
    await second.stop_quietly()


# -- destroy's rollback, through the same supervisor ------------------------------------


async def test_a_rollback_waits_for_no_one_and_disturbs_no_deployment_in_progress(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path) -> None:
    spec = profile_spec(tmp_path, "sleep 2", magic=False)
    first = await supervise(server, conn, spec, [])
    rollback = Supervisor(Target(conn), lambda: connect(remote(server)),
                          RollbackSpec("profile", spec.profile, 1, None, 20, "touch rolled-back"))
    with pytest.raises(HostBusy, match=rf"{spec.profile} on .* is being deployed by someone else: "
                                       rf"deployment {first.workdir} of {spec.new_path}"):
        await rollback.roll_back_to(time.monotonic() + 10)
    assert not Path(rollback.workdir).exists()  # the refused rollback leaves nothing on the host
    assert (await first.follow(time.monotonic() + 20)).ok
    await first.finish(time.monotonic() + 10)
    assert not (Path(spec.new_path) / "rolled-back").exists()


async def test_a_rollback_to_a_generation_that_is_gone_changes_nothing_and_says_so(
        server: InProcessSSHServer, conn: Connection, tmp_path: Path) -> None:
    profile = tmp_path / "profiles" / "app"
    profile.parent.mkdir(parents=True)
    marker = tmp_path / "activated"
    rollback = Supervisor(Target(conn), lambda: connect(remote(server)),
                          RollbackSpec("profile", str(profile), 3, str(tmp_path / "not-in-any-store"), 20,
                                       f"touch {shlex.quote(str(marker))}"))
    outcome = await rollback.roll_back_to(time.monotonic() + 10)
    assert outcome.state.phase is Phase.FAILED and outcome.state.cause is Cause.GONE
    assert outcome.state.detail == f"generation 3 of {profile} no longer exists"
    assert not marker.exists() and not os.path.lexists(profile)
