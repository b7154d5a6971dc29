"""A machine that moves to another host, through the real CLI (issue 24): the replacement is created first, so a
move that cannot reach its new host, or reaches a host with another key, leaves the old host as it was. (The
fault suite repeats this, and the wedged host: tests/test_faults.py.)"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import labctl
import pytest
from conftest import LAB_NET, HostFactory, PulumiProject, Systems, current_system, in_host
from test_provider_e2e import connection, machine, program, strip_ansi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def system_link(host: labctl.LabHost) -> str:
    return in_host(host, "readlink", "/nix/var/nix/profiles/system").stdout.strip()


@contextmanager
def second_name(host: labctl.LabHost, address: str) -> Iterator[None]:
    """The host's sshd reachable at another address too, as one machine under two DNS names is."""
    listener = socket.create_server((address, host.port))

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with src, dst:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((host.address, host.port))
            threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=pipe, args=(upstream.dup(), client.dup()), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        listener.close()


def without_ciphertexts(outputs: dict[str, Any]) -> dict[str, Any]:
    """Each up encrypts the secrets in state afresh: compare the rest."""
    return {k: ({**v, "privateKey": None} if k == "connection" else v) for k, v in outputs.items()}


def test_a_failed_move_changes_nothing_and_a_move_deploys_before_the_old_host_is_rolled_back(
        project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    old, new = new_host(), new_host()
    at_old = machine(old, "web")
    program(project, {"web": at_old}, {"systemPath": "${web.systemPath}", "generation": "${web.generation}"})
    project.run("stack", "init", "dev")
    project.up()
    state_before = project.resource("NixosMachine")

    # 1. A typo in the new address: nothing listens there.
    typo = {**connection(old), "host": f"127.0.{LAB_NET + 9}.251", "retries": 1}
    program(project, {"web": {**at_old, "properties": {**at_old["properties"], "connection": typo}}})
    failed = project.up(check=False)
    out = strip_ansi(failed.stdout + failed.stderr)
    assert failed.returncode != 0
    assert f"cannot connect to root@127.0.{LAB_NET + 9}.251:{old.port}: connection refused" in out, out
    # 2. The new host is not the machine whose key the program pins (the old one's, copied with its connection).
    wrong_key = {**connection(new), "hostKey": old.hostKey}
    program(project, {"web": {**at_old, "properties": {**at_old["properties"], "connection": wrong_key}}})
    refused = project.up(check=False)
    out = strip_ansi(refused.stdout + refused.stderr)
    assert refused.returncode != 0
    assert f"host key mismatch for root@{new.address}:{new.port}" in out, out
    # Neither touched the old host, nor the state; the program as it was plans nothing.
    assert current_system(old) == systems["web"] and system_link(old) == "system-2-link"
    assert current_system(new) == systems["base"]
    after = project.resource("NixosMachine")
    assert after["id"] == state_before["id"]
    assert without_ciphertexts(after["outputs"]) == without_ciphertexts(state_before["outputs"])
    assert "pendingReplacement" not in after
    program(project, {"web": at_old})
    project.run("preview", "--expect-no-changes")

    # 3. The move: the new host runs the system before the old one goes back to its baseline.
    program(project, {"web": machine(new, "web")}, {"systemPath": "${web.systemPath}"})
    moved = strip_ansi(project.up().stdout)
    assert moved.index("created replacement") < moved.index("deleted original"), moved
    assert current_system(new) == systems["web"]
    assert current_system(old) == systems["base"] and system_link(old) == "system-1-link"
    assert project.outputs()["systemPath"] == systems["web"]

    # 4. The same machine under another name: the replacement deploys there, and the delete leaves it.
    alias = f"127.0.{LAB_NET + 9}.252"
    with second_name(new, alias):
        program(project, {"web": machine(new, "web-v2") | {"properties": {
            **machine(new, "web-v2")["properties"], "connection": {**connection(new), "host": alias}}}})
        renamed = strip_ansi(project.up().stdout)
    assert "its replacement manages the same machine" in renamed, renamed
    assert current_system(new) == systems["web-v2"] and system_link(new) == "system-3-link"
