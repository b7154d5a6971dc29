#!/usr/bin/env python3
"""Deployer bytes for a fleet of one system: direct pushes against one upload through a binary cache.

Ten lab hosts get the same system (a 32 MiB payload) twice over, each time
into fresh stores: once pushed directly to every host over SSH, once through
`binaryCache` (the deployer writes a signed `file://` cache that a real HTTP
server on a lab address serves, and each host substitutes from it). The
figure is what the deployer itself sent: the bytes written into the SSH
channels plus, with the cache, the bytes written into the cache, each as a
multiple of one closure. NARs are stored and sent uncompressed on both sides
(`compress: none`, `?compression=none`), so compression does not blur the
count; the access log of the HTTP server says how much the hosts fetched.

Run with `python bench/cache.py` as root (it starts lab hosts on
127.0.BENCH_NET.N, 44 unless set).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lab"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "provider"))
import labctl  # noqa: E402
from conftest import remote_for  # noqa: E402
from nixos_provider.engine import deploy as engine  # noqa: E402
from nixos_provider.engine.closures.binary_cache import CacheUploads  # noqa: E402
from nixos_provider.engine.models import BinaryCache, DeployRequest, DeployResult  # noqa: E402
from nixos_provider.engine.nix.cli import Nix  # noqa: E402

MACHINES = 10
PARALLEL = 4  # deployments at once, as the provider's maxParallelTransfers default
MIB = 32
NET = int(os.environ.get("BENCH_NET", "44"))
LAB_DIR = REPO / ".lab" / "bench-cache"
FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.fleet = lab.nixosConfiguration { version = "cache-bench";
    packages = [ { name = "blob"; version = "1"; size = MIB * 1048576; } ]; };
}; }""".replace("MIB", str(MIB))


async def deploy_all(hosts: list[labctl.LabHost], system: str, cache: BinaryCache | None) -> tuple[int, int, float]:
    """Deploy system to every host at once; (bytes sent over SSH, NAR bytes pushed, seconds)."""
    uploads = CacheUploads()
    slots = asyncio.Semaphore(PARALLEL)

    async def one(host: labctl.LabHost) -> DeployResult:
        async with slots:
            return await engine.deploy(
                DeployRequest(remote_for(host), system, compress="none", binary_cache=cache), Nix(),
                warn=lambda s: print(f"warning: {s}", file=sys.stderr), uploads=uploads)

    started = time.monotonic()
    results = await asyncio.gather(*(one(h) for h in hosts))
    return (sum(r.push.wire_bytes for r in results), sum(r.push.bytes for r in results),
            time.monotonic() - started)


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="pulumi-nixos-bench-cache."))
    server: subprocess.Popen[bytes] | None = None
    hosts: list[labctl.LabHost] = []
    try:
        for f in ("lib.nix", "switch-to-configuration.sh", "lab-service.py"):
            shutil.copy(labctl.LAB_FLAKE / f, work / f)
        (work / "flake.nix").write_text(FLAKE)
        system = labctl.build_system("fleet", work)
        direct_hosts = [labctl.add_host(LAB_DIR, f"d{i}", f"127.0.{NET}.{i + 1}") for i in range(MACHINES)]
        hosts += direct_hosts
        closure = asyncio.run(Nix().closure(system))
        missing = subprocess.run(labctl.nsenter(direct_hosts[0].state, [
            "nix-store", "--check-validity", "--print-invalid", *[p.path for p in closure]]),
            capture_output=True, text=True).stdout.split()
        one = sum(p.nar_size for p in closure if p.path in missing)  # what one host lacks

        sent, _, direct_seconds = asyncio.run(deploy_all(direct_hosts, system, None))

        cache_hosts = [labctl.add_host(LAB_DIR, f"c{i}", f"127.0.{NET}.{i + 101}") for i in range(MACHINES)]
        hosts += cache_hosts
        keys = work / "keys"
        keys.mkdir()
        subprocess.run(["nix-store", "--generate-binary-cache-key", "bench-1", str(keys / "sk"), str(keys / "pk")],
                       check=True)
        served = work / "served"
        (served / "cache").mkdir(parents=True)
        address = f"127.0.{NET}.251"
        with socket.socket() as s:
            s.bind((address, 0))
            port = s.getsockname()[1]
        log = work / "access.log"
        server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", address, "--directory",
                                   str(served), str(port)], stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        labctl.wait_for_port(address, port)
        cache = BinaryCache(url=f"http://{address}:{port}/cache", public_key=(keys / "pk").read_text().strip(),
                            upload_url=f"file://{served / 'cache'}?compression=none",
                            signing_key_file=str(keys / "sk"))
        ssh_bytes, pushed, cache_seconds = asyncio.run(deploy_all(cache_hosts, system, cache))
        uploaded = tree_bytes(served / "cache")
        fetched = len(re.findall(r'"GET /cache/nar/\S+ HTTP', log.read_text()))
        return [
            (f"deployer bytes, {MACHINES} machines of one system, direct pushes",
             f"{sent / 1048576:.1f} MiB = **{sent / one:.2f}** closures ({one / 1048576:.1f} MiB each); "
             f"{direct_seconds:.1f} s"),
            (f"deployer bytes, {MACHINES} machines of one system, through `binaryCache`",
             f"{(uploaded + ssh_bytes) / 1048576:.1f} MiB = **{(uploaded + ssh_bytes) / one:.2f}** closures "
             f"({uploaded / 1048576:.1f} MiB into the cache, {ssh_bytes / 1048576:.1f} MiB over SSH, {pushed} NAR "
             f"bytes pushed directly); the hosts fetched {fetched} NARs over HTTP; {cache_seconds:.1f} s"),
        ]
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        for h in hosts:
            labctl.stop_host(h.state)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print("| benchmark | result |\n| --- | --- |")
    for name, result in main():
        print(f"| {name} | {result} |")
