"""Push once through a binary cache, through the real `pulumi` CLI.

The cache is real: the deployer writes it with `nix copy --to file://DIR`,
signed with a key from `nix-store --generate-binary-cache-key`, and a real
HTTP server (python's http.server on a lab address) serves DIR to the lab
hosts, whose own Nix substitutes from it. The server's access log says what
the targets fetched.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import LAB_NET, HostFactory, PulumiProject, Systems, current_system
from test_fleet_e2e import recording_nix
from test_provider_e2e import LAB, connection, program

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
# Not a lab host address (those end in .1 to .250), on this run's net.
SERVER_ADDRESS = f"127.0.{LAB_NET}.251"


@dataclass
class CacheServer:
    root: Path  # what the HTTP server serves
    name: str  # the cache directory under root (unique, so no Nix remembers an earlier cache at its URL)
    port: int
    log: Path
    public_key: str
    secret_key_file: Path

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def url(self) -> str:
        return f"http://{SERVER_ADDRESS}:{self.port}/{self.name}"

    @property
    def upload_url(self) -> str:
        return f"file://{self.dir}"

    def setting(self, **overrides: Any) -> dict[str, Any]:
        return {"url": self.url, "uploadUrl": self.upload_url, "publicKey": self.public_key,
                "signingKeyFile": str(self.secret_key_file), **overrides}

    def requests(self) -> list[str]:
        """The paths of the GET requests the server answered, in order."""
        text = self.log.read_text() if self.log.exists() else ""
        return re.findall(r'"GET (\S+) HTTP/[\d.]+" 200', text)

    def narinfos(self) -> list[Path]:
        return sorted(self.dir.glob("*.narinfo")) if self.dir.exists() else []


def _key_pair(where: Path, name: str) -> tuple[str, Path]:
    where.mkdir(parents=True, exist_ok=True)
    secret, public = where / f"{name}.secret", where / f"{name}.public"
    subprocess.run(["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)], check=True)
    return public.read_text().strip(), secret


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((SERVER_ADDRESS, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cache_server(tmp_path: Path) -> Iterator[CacheServer]:
    root = tmp_path / "served"
    root.mkdir()
    public, secret = _key_pair(tmp_path / "keys", "lab-cache-1")
    port = _free_port()
    log = tmp_path / "http-access.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", SERVER_ADDRESS, "--directory", str(root), str(port)],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True)
    try:
        for _ in range(100):
            try:
                socket.create_connection((SERVER_ADDRESS, port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"the HTTP server did not start: {log.read_text()}")
        yield CacheServer(root, f"cache-{uuid.uuid4().hex[:8]}", port, log, public, secret)
    finally:
        server.terminate()
        server.wait(timeout=10)


def closure_of(path: str) -> list[str]:
    return subprocess.run(["nix-store", "-qR", path], check=True, capture_output=True, text=True).stdout.split()


def missing_on(host: Any, paths: list[str]) -> list[str]:
    from conftest import in_host
    res = in_host(host, "nix-store", "--check-validity", "--print-invalid", *paths, check=False)
    return res.stdout.split()


def nix_copies(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if re.search(r"(^| )copy( |$)", line)] if log.exists() else []


def test_machines_of_one_system_fetch_it_from_the_cache_uploaded_once(
        project: PulumiProject, new_host: HostFactory, systems: Systems, cache_server: CacheServer,
        tmp_path: Path) -> None:
    """Provider config `nixos:binaryCache`: one upload, three targets substitute, nothing pushed over SSH."""
    system = systems["web-v2"]
    hosts = [new_host() for _ in range(3)]
    needed = missing_on(hosts[0], closure_of(system))
    assert needed, "the lab host already has the whole system: the test would prove nothing"
    nix, calls = recording_nix(tmp_path)
    program(project, {f"m{i}": {"type": "nixos:NixosMachine",
                                "properties": {"connection": connection(h), "flake": f"path:{LAB}#web-v2"}}
                      for i, h in enumerate(hosts)},
            {f"m{i}": f"${{m{i}.pushedPaths}}" for i in range(3)})
    project.run("stack", "init", "dev")
    project.run("config", "set", "--path", "nixos:nixCommand[0]", str(nix))
    for key, value in cache_server.setting().items():
        project.run("config", "set", "--path", f"nixos:binaryCache.{key}", value)

    res = project.up()
    out = res.stdout + res.stderr

    for host in hosts:
        assert current_system(host) == system
    assert "binaryCache:" not in out, out  # no fallback warning
    # Nothing went over SSH: every target substituted the whole closure.
    assert project.outputs() == {f"m{i}": 0 for i in range(3)}
    # The deployer uploaded once: one `nix copy`, one narinfo per closure
    # path, each signed with the cache's key.
    assert len(nix_copies(calls)) == 1, calls.read_text()
    narinfos = cache_server.narinfos()
    assert sorted(p.name.split(".")[0] for p in narinfos) == sorted(
        Path(p).name.split("-")[0] for p in closure_of(system))
    for info in narinfos:
        assert re.search(r"^Sig: lab-cache-1:", info.read_text(), re.M), info.read_text()
    # Each target fetched every NAR it lacked from the HTTP server.
    gets = Counter(cache_server.requests())
    nar_urls = {f"/{cache_server.name}/" + re.search(r"^URL: (\S+)", i.read_text(), re.M).group(1)  # type: ignore[union-attr]
                for i in narinfos}
    needed_hashes = {Path(p).name.split("-")[0] for p in needed}
    needed_nars = {f"/{cache_server.name}/" + re.search(r"^URL: (\S+)", i.read_text(), re.M).group(1)  # type: ignore[union-attr]
                   for i in narinfos if i.name.split(".")[0] in needed_hashes}
    assert needed_nars and needed_nars <= nar_urls
    for nar in needed_nars:
        assert gets[nar] == 3, (nar, gets)
    assert gets[f"/{cache_server.name}/{Path(system).name.split('-')[0]}.narinfo"] >= 1, gets


@pytest.mark.parametrize("broken", ["unsigned", "wrong-key"])
def test_a_cache_the_target_cannot_trust_falls_back_to_the_direct_push(
        project: PulumiProject, new_host: HostFactory, systems: Systems, cache_server: CacheServer,
        tmp_path: Path, broken: str) -> None:
    """Per-machine `binaryCache`: the target refuses what it cannot verify; the push goes over SSH, with a warning."""
    system = systems["web-v3"]
    host = new_host()
    if broken == "unsigned":
        setting = cache_server.setting()
        del setting["signingKeyFile"]
    else:
        other_public, _ = _key_pair(tmp_path / "other-keys", "someone-else-1")
        setting = cache_server.setting(publicKey=other_public)
    program(project, {"m": {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"path:{LAB}#web-v3", "binaryCache": setting}}},
        {"pushed": "${m.pushedPaths}"})
    project.run("stack", "init", "dev")

    res = project.up()
    out = res.stdout + res.stderr

    assert current_system(host) == system
    assert cache_server.narinfos(), "the deployer did not upload to the cache"
    # The target did ask the cache, and then got the closure over SSH.
    assert any(r.endswith(".narinfo") for r in cache_server.requests()), cache_server.requests()
    assert int(project.outputs()["pushed"]) > 0  # type: ignore[call-overload]
    flat = " ".join(out.split())
    assert f"binaryCache: root@{host.address}:{host.port} could not fetch {system} from {cache_server.url}" in flat, out
    assert "pushing directly over SSH instead" in flat
    assert "Traceback" not in out


def test_check_names_the_binary_cache_property_and_never_echoes_the_key(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path) -> None:
    host = new_host()
    public, secret_file = _key_pair(tmp_path / "keys", "mine-1")
    _, other_secret_file = _key_pair(tmp_path / "keys", "other-1")
    other_secret = other_secret_file.read_text().strip()
    cases = [
        ({"url": "cache.example.org", "publicKey": public}, "binaryCache.url", "must be a Nix store URL"),
        ({"url": "https://cache.example.org", "publicKey": "not-a-key"}, "binaryCache.publicKey",
         "must be a Nix public key"),
        ({"url": "https://cache.example.org", "publicKey": public, "signingKey": {"fn::secret": other_secret}},
         "binaryCache.signingKey", "is not the secret key of `publicKey`"),
        ({"url": "https://cache.example.org", "publicKey": public, "signingKeyFile": "keys/cache.secret"},
         "binaryCache.signingKeyFile", "must be the absolute path"),
    ]
    for i, (setting, prop, reason) in enumerate(cases):
        program(project, {"m": {"type": "nixos:NixosMachine", "properties": {
            "connection": connection(host), "flake": f"path:{LAB}#web", "binaryCache": setting}}})
        if i == 0:
            project.run("stack", "init", "dev")
        res = project.run("preview", check=False)
        out = " ".join((res.stdout + res.stderr).split())
        assert res.returncode != 0, out
        assert f"property {prop} " in out and reason in out, out
        assert other_secret.split(":")[1] not in out
        assert secret_file.read_text().split(":")[1] not in out
        assert "Traceback" not in out


def test_provider_config_is_checked_naming_the_property(project: PulumiProject, new_host: HostFactory) -> None:
    host = new_host()
    program(project, {"m": {"type": "nixos:NixosMachine",
                            "properties": {"connection": connection(host), "flake": f"path:{LAB}#web"}}})
    project.run("stack", "init", "dev")
    project.run("config", "set", "--path", "nixos:binaryCache.url", "ftp://cache.example.org")
    res = project.run("preview", check=False)
    out = " ".join((res.stdout + res.stderr).split())
    assert res.returncode != 0
    assert "binaryCache.url" in out and "must be a Nix store URL" in out, out
    assert "binaryCache.publicKey" in out and "is required" in out, out


def test_state_keeps_the_signing_key_secret(project: PulumiProject, new_host: HostFactory, systems: Systems,
                                            cache_server: CacheServer) -> None:
    host = new_host()
    secret = cache_server.secret_key_file.read_text().strip()
    setting = cache_server.setting(signingKey=secret)
    del setting["signingKeyFile"]
    program(project, {"m": {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"path:{LAB}#web", "binaryCache": setting}}})
    project.run("stack", "init", "dev")
    res = project.up()
    assert current_system(host) == systems["web"]
    assert "binaryCache:" not in res.stdout + res.stderr
    assert cache_server.narinfos()
    exported = json.dumps(project.state())
    assert secret.split(":")[1] not in exported
    assert secret.split(":")[1] not in (res.stdout + res.stderr)
    assert os.path.exists(cache_server.secret_key_file)


def test_a_target_with_another_nix_fetches_from_the_cache(
        project: PulumiProject, new_host: HostFactory, systems: Systems, cache_server: CacheServer) -> None:
    """The deployer's Nix writes the cache, a systemd host's own Nix (another version) reads it:
    2.8 or 2.26 to sid's 2.34 in the bookworm and trixie legs, 2.34 to trixie's 2.26 in the sid leg."""
    from conftest import in_host
    deployer = subprocess.run(["nix-store", "--version"], text=True, capture_output=True, check=True).stdout.split()[-1]
    host = new_host("systemd", release="trixie" if deployer.startswith("2.34.") else "sid")
    target = in_host(host, "nix-store", "--version").stdout.split()[-1]
    assert deployer != target, (deployer, target)
    program(project, {"m": {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"path:{LAB}#web-v2", "binaryCache": cache_server.setting()}}},
        {"pushed": "${m.pushedPaths}"})
    project.run("stack", "init", "dev")
    res = project.up()
    assert current_system(host) == systems["web-v2"]
    assert "binaryCache:" not in res.stdout + res.stderr, res.stdout + res.stderr
    assert project.outputs() == {"pushed": 0}
    assert any("/nar/" in r for r in cache_server.requests()), cache_server.requests()
