#!/usr/bin/env python3
"""Where a fleet's `pulumi up` spends its time: 1, 10 and 20 machines changed at once.

Each machine has its own configuration in one flake (as a fleet does), so a
change gives every machine a new system: evaluated, built, pushed, activated,
confirmed and health-checked. The provider writes its timeline
(PULUMI_NIXOS_TIMELINE, engine/timeline.py): one line per step per machine.
For each fleet size this prints the whole `pulumi up`, its ratio to the
1-machine run (same run), and per step: how long it took each machine (mean
and slowest) and the wall-clock span from the first machine starting it to the
last finishing it.

Run with `python bench/fleet_up.py` (root; lab hosts on 127.0.44.N), or `make bench`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lab"))
sys.path.insert(0, str(REPO / "tests"))
import labctl  # noqa: E402
from conftest import write_flake  # noqa: E402

LAB_DIR = REPO / ".lab" / "bench-fleet-up"
SIZES = (1, 10, 20)
STEPS = ("evaluate", "build", "connect", "wait-transfer", "push", "lock", "register", "activate", "confirm", "health-check", "finish")


def flake_text(machines: int, round_: int) -> str:
    configs = "\n".join(
        f'nixosConfigurations.m{i} = lab.nixosConfiguration {{ hostName = "m{i}"; version = "{round_}-{i}";'
        f' packages = [ {{ name = "app{i}"; version = "{round_}.0"; size = 4096; }} ]; }};'
        for i in range(machines))
    return f"{{ outputs = {{ self }}: let lab = import ./lib.nix; in {{\n{configs}\n}}; }}"


def write_program(work: Path, hosts: list[labctl.LabHost], round_: int) -> None:
    flake = write_flake(work / "flake", flake_text(len(hosts), round_))
    resources = {f"m{i}": {"type": "nixos:NixosMachine", "properties": {
        "connection": {"host": h.address, "port": h.port,
                       "privateKey": {"fn::secret": {"fn::readFile": h.privateKeyPath}}},
        "flake": f"{flake}#m{i}",
        "healthChecks": [{"http": f"http://{h.address}:{h.httpPort}/"}]}} for i, h in enumerate(hosts)}
    (work / "Pulumi.yaml").write_text(json.dumps({
        "name": "fleet-up", "runtime": "yaml",
        "plugins": {"providers": [{"name": "nixos", "path": str(REPO / "provider")}]},
        "resources": resources}))


def pulumi(work: Path, env: dict[str, str], *args: str) -> float:
    started = time.monotonic()
    res = subprocess.run(["pulumi", "--non-interactive", *args], cwd=work, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"pulumi {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return time.monotonic() - started


def measure(size: int) -> tuple[float, list[dict[str, object]]]:
    """Adopt `size` hosts (not measured), then change all of them: the up's seconds and its timeline."""
    hosts = [labctl.add_host(LAB_DIR, f"f{size}-{i}", f"127.0.44.{i + 1}") for i in range(size)]
    work = Path(tempfile.mkdtemp(prefix="fleet-up-"))
    (work / "state").mkdir()
    env = {**os.environ, "PULUMI_BACKEND_URL": f"file://{work / 'state'}", "PULUMI_CONFIG_PASSPHRASE": "bench",
           "PULUMI_SKIP_UPDATE_CHECK": "1", "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "1"}
    try:
        write_program(work, hosts, 1)
        pulumi(work, env, "stack", "init", "bench")
        if os.environ.get("FLEET_MAX_SSH"):
            pulumi(work, env, "config", "set", "nixos:maxParallelSsh", os.environ["FLEET_MAX_SSH"])
        pulumi(work, env, "up", "--yes", "--skip-preview")
        write_program(work, hosts, 2)
        timeline = work / "timeline.jsonl"
        seconds = pulumi(work, {**env, "PULUMI_NIXOS_TIMELINE": str(timeline)}, "up", "--yes", "--skip-preview")
        lines = [json.loads(line) for line in timeline.read_text().splitlines()]
        return seconds, lines
    finally:
        for h in hosts:
            labctl.stop_host(h.state)


def describe(size: int, lines: list[dict[str, object]]) -> str:
    parts = []
    for step in STEPS:
        spans = [(float(str(x["start"])), float(str(x["end"]))) for x in lines if x["step"] == step]
        if not spans:
            continue
        each = [end - start for start, end in spans]
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        if step in ("evaluate", "build"):
            parts.append(f"{step} {wall:.1f} s ({len(spans)} Nix process{'es' if len(spans) > 1 else ''})")
        elif size == 1:
            parts.append(f"{step} {each[0]:.1f} s")
        else:
            parts.append(f"{step} {statistics.mean(each):.1f} s each (slowest {max(each):.1f}, span {wall:.1f})")
    return "; ".join(parts)


def main() -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    labctl.down(LAB_DIR)
    labctl.build_system("base")  # the hosts' first generation, built once
    rows = []
    baseline: float | None = None
    try:
        for size in SIZES:
            seconds, lines = measure(size)
            baseline = baseline or seconds
            rows.append((f"`pulumi up`, {size} machine{'s' if size > 1 else ''} changed",
                         f"{seconds:.1f} s, ratio to 1 machine **{seconds / baseline:.2f}x**; {describe(size, lines)}"))
    finally:
        labctl.down(LAB_DIR)
    print(f"\nmachine: {os.cpu_count()} cores\n")
    print("| benchmark | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
