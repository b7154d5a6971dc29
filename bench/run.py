#!/usr/bin/env python3
"""Benchmarks: push throughput and deployer memory, redeploy cost, preview time for 10 machines, install.

Run with `make bench` (root, lab hosts on 127.0.40.N). Prints a Markdown table; the figures
in bench/README.md come from it.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lab"))
sys.path.insert(0, str(REPO / "tests"))
import labctl  # noqa: E402

LAB_DIR = REPO / ".lab" / "bench"
FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations = builtins.listToAttrs (map (mib: {
    name = "size${toString mib}";
    value = lab.nixosConfiguration { version = "b${toString mib}";
      packages = [ { name = "blob"; version = toString mib; size = mib * 1048576; } ]; };
  }) [ 16 64 256 ]);
}; }"""

DEPLOY_ONE = r"""
import asyncio, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from conftest import remote_for
import labctl
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.models import DeployRequest
host = labctl.LabHost(**json.loads(sys.argv[2]))
started = time.monotonic()
result = asyncio.run(engine.deploy(DeployRequest(remote_for(host), sys.argv[3])))
print(json.dumps({"seconds": time.monotonic() - started, "paths": result.push.paths, "bytes": result.push.bytes,
                  "push_seconds": result.push.seconds,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def deploy_in_subprocess(host: labctl.LabHost, system: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", DEPLOY_ONE, str(REPO / "tests"), json.dumps(host.__dict__), system],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


INSTALL_ONE = r"""
import asyncio, json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from conftest import remote_for
import labctl
from nixos_provider.engine import install
from nixos_provider.engine.models import InstallRequest
host = labctl.LabHost(**json.loads(sys.argv[2]))
steps = {}
started = time.monotonic()
def output(line):
    steps[line] = time.monotonic() - started
req = InstallRequest(remote_for(host), sys.argv[3], disko_script=sys.argv[4], post_kexec_ssh_port=host.port,
                     substitute_on_destination="never",
                     disk_encryption_keys=(("/tmp/disk.key", "bench-passphrase"),))
result = asyncio.run(install.install(req, output=output))
assert result.installed and result.current_system == sys.argv[3]
done = steps.get("nixos-anywhere: Done!", 0.0)
print(json.dumps({"seconds": time.monotonic() - started, "nixos_anywhere_done": done,
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_install(rows: list[tuple[str, str]]) -> None:
    """A bare lab host to an installed, verified NixOS through engine/install/ and the lab's stand-in."""
    system = labctl.build_system("web")
    disko = json.loads(subprocess.run(
        [*labctl.NIX, "build", "--no-link", "--json",
         f"path:{labctl.LAB_FLAKE}#nixosConfigurations.web.config.system.build.diskoScript"],
        check=True, capture_output=True, text=True).stdout)[0]["outputs"]["out"]
    host = labctl.add_host(LAB_DIR, "install1", "127.0.42.1", mode="bare")
    env = {**os.environ, "PATH": f"{labctl.LAB_FLAKE}:{os.environ['PATH']}", "LAB_DIR": str(LAB_DIR),
           "NIXOS_ANYWHERE_STANDIN_LOG": str(LAB_DIR / "nixos-anywhere-calls.jsonl")}
    out = json.loads(subprocess.run(
        [sys.executable, "-c", INSTALL_ONE, str(REPO / "tests"), json.dumps(host.__dict__), system, disko],
        check=True, capture_output=True, text=True, env=env).stdout)
    rows.append(("install a bare host (stand-in kexec, disko, install, reboot; then verify and pin)",
                 f"{out['seconds']:.1f} s total, {out['nixos_anywhere_done']:.1f} s until nixos-anywhere's Done!, "
                 f"deployer peak RSS {out['max_rss_mib']:.0f} MiB"))
    labctl.stop_host(host.state)


def bench_push(rows: list[tuple[str, str]]) -> None:
    work = Path(tempfile.mkdtemp())
    for f in ("lib.nix", "switch-to-configuration.sh", "lab-service.py"):
        shutil.copy(labctl.LAB_FLAKE / f, work / f)
    (work / "flake.nix").write_text(FLAKE)
    for mib in (16, 64, 256):
        system = labctl.build_system(f"size{mib}", work)
        host = labctl.add_host(LAB_DIR, f"push{mib}", f"127.0.40.{mib % 250}")
        first = deploy_in_subprocess(host, system)
        again = deploy_in_subprocess(host, system)
        rate = first["bytes"] / 1048576 / max(first["push_seconds"], 1e-6)
        rows.append((f"push {mib} MiB closure (first deploy)",
                     f"{first['seconds']:.1f} s total, {first['push_seconds']:.1f} s copying ({rate:.0f} MiB/s), "
                     f"deployer peak RSS {first['max_rss_mib']:.0f} MiB"))
        rows.append((f"redeploy {mib} MiB closure (unchanged)",
                     f"{again['seconds']:.1f} s, {int(again['paths'])} paths pushed, peak RSS {again['max_rss_mib']:.0f} MiB"))
        labctl.stop_host(host.state)


def bench_preview(rows: list[tuple[str, str]]) -> None:
    hosts = [labctl.add_host(LAB_DIR, f"pv{i}", f"127.0.41.{i}") for i in range(1, 11)]
    work = Path(tempfile.mkdtemp())
    (work / "state").mkdir()
    env = {**os.environ, "PULUMI_BACKEND_URL": f"file://{work / 'state'}", "PULUMI_CONFIG_PASSPHRASE": "bench"}

    def write(config: str) -> None:
        resources = {h.name: {"type": "nixos:NixosMachine", "properties": {
            "connection": {"host": h.address, "port": h.port,
                           "privateKey": {"fn::secret": {"fn::readFile": h.privateKeyPath}}},
            "flake": f"path:{labctl.LAB_FLAKE}#{config}"}} for h in hosts}
        (work / "Pulumi.yaml").write_text(json.dumps({
            "name": "bench", "runtime": "yaml",
            "plugins": {"providers": [{"name": "nixos", "path": str(REPO / "provider")}]},
            "resources": resources}))

    def pulumi(*args: str) -> float:
        started = time.monotonic()
        subprocess.run(["pulumi", "--non-interactive", *args], cwd=work, env=env, check=True, capture_output=True)
        return time.monotonic() - started

    write("web")
    pulumi("stack", "init", "bench")
    up = pulumi("up", "--yes", "--skip-preview")
    rows.append(("`pulumi up`, 10 machines adopted and deployed in parallel", f"{up:.1f} s"))
    unchanged = min(pulumi("preview") for _ in range(3))
    rows.append(("`pulumi preview`, 10 unchanged machines (no SSH, no build)", f"{unchanged:.1f} s"))
    write("web-v3")
    changed = min(pulumi("preview", "--diff") for _ in range(3))
    rows.append(("`pulumi preview --diff`, 10 changed machines (evaluation only)", f"{changed:.1f} s"))
    for h in hosts:
        labctl.stop_host(h.state)


def main() -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    labctl.down(LAB_DIR)
    rows: list[tuple[str, str]] = []
    try:
        bench_push(rows)
        bench_preview(rows)
        bench_install(rows)
    finally:
        labctl.down(LAB_DIR)
    print(f"\nmachine: {os.cpu_count()} cores; deployer max RSS of this runner "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB\n")
    print("| benchmark | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
