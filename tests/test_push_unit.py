"""The push's parts that need no host: the serve stream's bytes, the `ssh` command line, when `ssh` is used."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import struct
from pathlib import Path

import pytest
from nixos_provider.engine.closures import serve_stream, substitution
from nixos_provider.engine.models import Credentials, Remote
from nixos_provider.engine.nix.versions import PathInfo, parse_path_info
from nixos_provider.engine.transport import openssh
from nixos_provider.engine.transport.process import CommandResult
from nixos_provider.engine.transport.ssh import Connection

STORE = "/nix/store/"
TOP = STORE + "a" * 32 + "-top-2.0"
DEP = STORE + "b" * 32 + "-dep-1.0"


def read_string(data: bytes, at: int) -> tuple[str, int]:
    n = struct.unpack_from("<Q", data, at)[0]
    return data[at + 8:at + 8 + n].decode(), at + 8 + n + (-n % 8)


def test_strings_are_padded_to_eight_bytes() -> None:
    assert serve_stream.string("") == bytes(8)
    assert serve_stream.string("abc") == struct.pack("<Q", 3) + b"abc" + bytes(5)
    assert serve_stream.string("12345678") == struct.pack("<Q", 8) + b"12345678"
    assert serve_stream.strings(["a", "b"]) == struct.pack("<Q", 2) + serve_stream.string("a") + serve_stream.string("b")
    assert serve_stream.greeting() == struct.pack("<QQ", 0x390C9DEB, 0x205)


def test_add_to_store_nar_sends_the_registration_in_the_servers_order() -> None:
    info = PathInfo(TOP, 168, (DEP,), nar_hash="sha256-qkH8ZxXeehOKQP056kkOIqz8vEPzXus2gt3j+NP9gfs=",
                    deriver=STORE + "c" * 32 + "-top-2.0.drv", registration_time=1795683247, ultimate=True,
                    signatures=("cache:sig",), ca="fixed:r:sha256:00")
    data = serve_stream.add_to_store_nar(info)
    assert struct.unpack_from("<Q", data)[0] == 9  # AddToStoreNar
    at = 8
    fields = []
    for _ in range(3):  # path, deriver, narHash
        value, at = read_string(data, at)
        fields.append(value)
    assert fields == [TOP, info.deriver, info.nar_hash]
    assert struct.unpack_from("<Q", data, at)[0] == 1
    ref, at = read_string(data, at + 8)
    assert ref == DEP
    assert struct.unpack_from("<QQQQ", data, at) == (1795683247, 168, 1, 1)  # time, size, ultimate, 1 signature
    sig, at = read_string(data, at + 32)
    ca, at = read_string(data, at)
    assert (sig, ca, at) == ("cache:sig", "fixed:r:sha256:00", len(data))


def test_replies_count_what_the_server_added() -> None:
    hello = struct.pack("<QQ", 0x5452EECB, 0x207)
    assert serve_stream.replies_done(hello + struct.pack("<QQ", 1, 1), 2) == 2
    assert serve_stream.replies_done(hello + struct.pack("<Q", 1), 2) == 1  # it stopped after the first
    assert serve_stream.replies_done(b"", 2) == 0
    with pytest.raises(serve_stream.StreamError, match="not its greeting"):
        serve_stream.replies_done(b"error: something", 1)
    with pytest.raises(serve_stream.StreamError, match="other than success"):
        serve_stream.replies_done(hello + struct.pack("<Q", 7), 1)


def test_relay_rewrites_an_export_and_checks_its_shape(tmp_path: Path) -> None:
    # An export as `nix-store --export` writes it: 1, NAR, trailer; then 0.
    nar = b"nix-archive-1 fake nar bytes, 33."
    info = PathInfo(TOP, len(nar), (DEP,), nar_hash="sha256-x")
    trailer = (struct.pack("<Q", 0x4558494E) + serve_stream.string(TOP) + serve_stream.strings([DEP])
               + serve_stream.string("") + bytes(8))
    export = struct.pack("<Q", 1) + nar + trailer + bytes(8)

    def relay(data: bytes, infos: list[PathInfo]) -> bytes:
        (tmp_path / "export").write_bytes(data)
        src_r, src_w = os.pipe()
        out_r, out_w = os.pipe()
        os.write(src_w, data)
        os.close(src_w)
        moved: list[int] = []
        try:
            serve_stream.relay_export(src_r, out_w, infos, b"password\n", moved.append)
        finally:
            os.close(src_r)
            os.close(out_w)
            with os.fdopen(out_r, "rb") as f:
                out = f.read()
        assert sum(moved) <= len(nar)
        return out

    out = relay(export, [info])
    assert out == b"password\n" + serve_stream.greeting() + serve_stream.add_to_store_nar(info) + nar
    with pytest.raises(serve_stream.StreamError, match=f"is not {len(nar) - 1} bytes long"):
        relay(export, [dataclasses.replace(info, nar_size=len(nar) - 1)])
    with pytest.raises(serve_stream.StreamError, match="ended"):
        relay(export[:20], [info])
    with pytest.raises(serve_stream.StreamError, match=r"where .* was expected"):
        relay(export, [dataclasses.replace(info, path=DEP)])


def test_structured_content_addresses_become_text() -> None:
    ca = {"hash": "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=", "method": "nar"}
    entry = {"ca": ca, "deriver": None, "narHash": "sha256-x", "narSize": 120, "references": [],
             "registrationTime": 5, "signatures": ["k:s"], "ultimate": False, "version": 2}
    data = json.dumps({"info": {DEP.removeprefix(STORE): entry}, "storeDir": "/nix/store", "version": 2})
    info = parse_path_info(data)[DEP]
    assert info.ca == "fixed:r:sha256:" + base64.b64decode(ca["hash"].removeprefix("sha256-")).hex()
    assert (info.registration_time, info.signatures, info.deriver) == (5, ("k:s",), "")
    text = data.replace('"method": "nar"', '"method": "text"')
    assert parse_path_info(text)[DEP].ca.startswith("text:sha256:")


def connection(**remote: object) -> Connection:
    r = Remote("host.example", 2222, "deploy", Credentials(private_key="KEY"), **remote)  # type: ignore[arg-type]
    return Connection(r, None, "ssh-ed25519 AAAAkey")  # type: ignore[arg-type]


def test_ssh_argv_is_exactly_this() -> None:
    argv = openssh.ssh_argv(connection(), ["sh", "-c", 'zstd -d | "$@"', "sh", "nix-store", "--serve", "--write"],
                            known_hosts="/proc/1/fd/5", identity="/proc/1/fd/6")
    assert argv == [
        "ssh", "-F", "/dev/null", "-T", "-x", "-a",
        "-o", "BatchMode=yes", "-o", "HostKeyAlias=pulumi-nixos-target", "-o", "UserKnownHostsFile=/proc/1/fd/5",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
        "-o", "CheckHostIP=no", "-o", "PasswordAuthentication=no", "-o", "KbdInteractiveAuthentication=no",
        "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3",
        "-o", f"Ciphers={openssh.CIPHERS}", "-o", "Compression=no", "-o", "LogLevel=ERROR",
        "-o", "IdentityAgent=none", "-o", "IdentityFile=/proc/1/fd/6", "-o", "IdentitiesOnly=yes",
        "-p", "2222", "-l", "deploy", "--", "host.example",
        "sh -c 'zstd -d | \"$@\"' sh nix-store --serve --write",
    ]


def test_ssh_is_used_only_where_it_can_log_in_as_the_connection_did() -> None:
    assert openssh.unusable(connection()) is None
    jump = Remote("jump", 22, "root", Credentials(private_key="K"))
    assert openssh.unusable(connection(proxy=jump)) == "the host is reached through a jump host"
    by_password = connection()
    by_password.remote = dataclasses.replace(by_password.remote, credentials=Credentials(password="pw"))
    assert openssh.unusable(by_password) == "the login is by password"
    by_agent = connection()
    by_agent.remote = dataclasses.replace(by_agent.remote, credentials=Credentials(agent_socket_path="/run/agent"))
    argv = openssh.ssh_argv(by_agent, ["true"], known_hosts="/k", identity=None)
    assert "IdentityAgent=/run/agent" in argv and not any(a.startswith(("IdentityFile=", "IdentitiesOnly=")) for a in argv)


def test_ssh_failures_are_told_from_the_commands_own() -> None:
    lost = openssh.failed_to_connect(CommandResult(255, "", "ssh: connect to host h port 22: Connection refused\n"))
    assert lost is not None and str(lost) == "ssh: connect to host h port 22: Connection refused"
    assert openssh.failed_to_connect(CommandResult(-9, "", "")) is not None
    assert openssh.failed_to_connect(CommandResult(1, "", "error: path is not valid")) is None


def test_parallelism_settings_take_numbers_and_their_text() -> None:
    from nixos_provider.pulumi_layer.provider_config import _whole_number
    assert [_whole_number(v) for v in (4, 4.0, "4", " 16 ", "4.0")] == [4, 4, 4, 16, 4]
    assert [_whole_number(v) for v in (0, -1, 2.5, "x", "", "inf", "nan", True, None, [4])] == [None] * 10


def test_what_the_targets_caches_offer_is_read_from_nix_own_account() -> None:
    a, b, own = (STORE + c * 32 + n for c, n in (("4", "-pkg-a-1"), ("1", "-pkg-b-1"), ("9", "-own")))
    # Nix 2.8, a cache holding a, and an unreachable one (both on stderr, as `nix-store --realise` prints them).
    nix_2_8 = ("warning: error: unable to download 'https://cache.nixos.org/nix-cache-info': Couldn't resolve host "
               "name (6); retrying in 272 ms\n"
               f"warning: unable to download 'https://cache.nixos.org/nix-cache-info': Couldn't resolve host name (6)\n"
               f"these 2 paths will be fetched (1.50 MiB download, 6.00 MiB unpacked):\n  {a}\n  {b}\n"
               f"don't know how to build these paths:\n  {own}\n"
               f"copying path '{a}' from 'http://127.0.0.9:80/cache'...\n"
               f"error: build of '{own}' failed\n")
    offer = substitution.parse_realise_summary(nix_2_8)
    assert offer.paths == (a, b) and offer.download_bytes == 1572864
    assert offer.unreachable == ("https://cache.nixos.org: Couldn't resolve host name (6)",)
    # Nix 2.34 says KiB for small downloads, and "this path" for one.
    nix_2_34 = f"this path will be fetched (0.1 KiB download, 0.1 KiB unpacked):\n  {a}\n" \
               f"don't know how to build these paths:\n  {b}\n  {own}\n"
    offer = substitution.parse_realise_summary(nix_2_34)
    assert offer.paths == (a,) and offer.download_bytes == 102 and offer.unreachable == ()
    # Nothing offered: no cache, or paths built here.
    assert substitution.parse_realise_summary(f"don't know how to build these paths:\n  {own}\n").paths == ()


def test_caches_that_do_not_answer_are_not_asked_again_for_the_next_batch(
        monkeypatch: pytest.MonkeyPatch, local_nix: str) -> None:
    """Nix on this machine, a cache nothing listens on, one path per command: the first batch finds the cache
    silent; the later paths are left unasked (the push asks only whether they are missing)."""
    import asyncio

    from nixos_provider.engine.transport.process import LOCAL
    monkeypatch.setattr(substitution, "PATHS_PER_COMMAND", 1)
    monkeypatch.setenv("NIX_CONFIG", "substituters = http://127.0.0.1:1/nothing\nbuild-users-group =\nsandbox = false")
    paths = [STORE + c * 32 + "-absent" for c in "0123"]
    done = asyncio.run(substitution.fetch_missing(LOCAL, paths, "auto"))
    assert done.lacked == done.still_missing == (paths[0],)
    assert done.offer.paths == () and done.offer.unreachable[0].startswith("http://127.0.0.1:1/nothing: ")
    assert done.unasked == tuple(paths[1:])
