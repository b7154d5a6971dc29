#!/usr/bin/env python3
"""Fleet preview: N new machines of one synthetic flake against 1, through the real `pulumi` CLI.

Not what a real fleet's evaluation costs: that is bench/real_fleet.py, on real
nixpkgs. Here every configuration shares one costly evaluation by construction
(a real `nixosSystem` does not: each evaluates its own module system and
`pkgs`), and each evaluation is in its own Nix process, so what this measures
is the provider's own cost per machine (Checks, processes, the plan) on top of
evaluations that cost little. The runs alternate 1, N, 1, N, ... so a drifting
machine speed hits both alike. The peak memory of the Nix processes is read by
a small wrapper around the nix command (getrusage of its child).

Run with `python bench/fleet.py` (or `make bench`); no lab host is needed:
preview of a machine that does not exist yet evaluates its flake and connects
to nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "tests" / "lab"
RUNS = 3
# ~1.5 s of evaluation that every configuration needs, evaluated once per Nix process.
HEAVY_FLAKE = """{ outputs = { self }: let
  lab = import ./lib.nix;
  heavy = builtins.foldl' (a: b: a + b) 0 (builtins.genList (x: x * x) 1500000);
  machine = i: lab.nixosConfiguration { hostName = "m${toString i}"; version = "${toString heavy}-${toString i}"; };
in {
  nixosConfigurations = builtins.listToAttrs (map (i: { name = "m${toString i}"; value = machine i; })
    (builtins.genList (i: i) 60));
}; }"""

NIX_WRAPPER = """#!{python}
import os, resource, subprocess, sys
code = subprocess.call(["{nix}", *sys.argv[1:]])
with open("{log}", "a") as f:
    f.write(f"{{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}} {{' '.join(sys.argv[1:4])}}\\n")
sys.exit(code)
"""


def make_project(work: Path, machines: int, nix: Path) -> Path:
    proj = work / f"p{machines}"
    proj.mkdir()
    resources: dict[str, object] = {
        "nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(nix)]}}}
    for i in range(machines):
        resources[f"m{i}"] = {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"}, "properties": {
            "connection": {"host": f"127.0.99.{i + 1}", "port": 2222, "password": "unused"},
            "flake": f"path:{work / 'flake'}#m{i}"}}
    (proj / "Pulumi.yaml").write_text(json.dumps({
        "name": f"fleet{machines}", "runtime": "yaml",
        "plugins": {"providers": [{"name": "nixos", "path": str(REPO / "provider")}]},
        "resources": resources}))
    return proj


def main() -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="pulumi-nixos-bench-fleet."))
    try:
        (work / "flake").mkdir()
        for f in ("lib.nix", "switch-to-configuration.sh", "lab-service.py"):
            shutil.copy(LAB / f, work / "flake" / f)
        (work / "flake" / "flake.nix").write_text(HEAVY_FLAKE)
        log = work / "nix-rss"
        bindir = work / "nix-bin"
        bindir.mkdir()
        real_nix, real_store = shutil.which("nix"), shutil.which("nix-store")
        assert real_nix and real_store, "nix is not on PATH"
        (bindir / "nix").write_text(NIX_WRAPPER.format(python=sys.executable, nix=real_nix, log=log))
        (bindir / "nix").chmod(0o755)
        (bindir / "nix-store").symlink_to(real_store)
        (work / "state").mkdir()
        env = {**os.environ, "PULUMI_BACKEND_URL": f"file://{work / 'state'}", "PULUMI_CONFIG_PASSPHRASE": "bench",
               "PULUMI_SKIP_UPDATE_CHECK": "1", "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "1"}
        sizes = [1, 10, 50]
        projects = {n: make_project(work, n, bindir / "nix") for n in sizes}

        def pulumi(n: int, *args: str) -> float:
            started = time.monotonic()
            subprocess.run(["pulumi", "--non-interactive", *args], cwd=projects[n], env=env, check=True,
                           capture_output=True)
            return time.monotonic() - started

        for n in sizes:
            pulumi(n, "stack", "init", f"bench{n}")
            pulumi(n, "preview")  # warm-up: plugin start, flake copied into the store
        times: dict[int, list[float]] = {n: [] for n in sizes}
        rss: dict[int, list[int]] = {n: [] for n in sizes}
        evals: dict[int, int] = {}
        for _ in range(RUNS):
            for n in sizes:
                log.unlink(missing_ok=True)
                times[n].append(pulumi(n, "preview"))
                lines = log.read_text().splitlines()
                rss[n].append(max(int(line.split()[0]) for line in lines))
                evals[n] = sum(1 for line in lines if " eval" in f" {line}")
        base = statistics.median(times[1])
        rows = []
        for n in sizes:
            med = statistics.median(times[n])
            ratios = [t / b for t, b in zip(times[n], times[1], strict=True)]
            rows.append((f"`pulumi preview`, {n} new machines of one heavy flake",
                         f"{med:.1f} s (median of {RUNS}); ratio to 1 machine {statistics.median(ratios):.2f}x "
                         f"(pairwise, min {min(ratios):.2f} max {max(ratios):.2f}); {evals[n]} nix eval process(es); "
                         f"peak RSS of a Nix process {max(rss[n]) / 1024:.0f} MiB"))
        print(f"\n1 machine: {base:.1f} s")
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    print("| benchmark | result |\n| --- | --- |")
    for name, value in main():
        print(f"| {name} | {value} |")
