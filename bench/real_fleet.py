#!/usr/bin/env python3
"""A fleet's evaluation on real nixpkgs, through the real `pulumi` CLI, against what users would otherwise run.

The flake is tests/realnixos.py's: `nixpkgs.lib.nixosSystem` servers (openssh, nginx, a user), each its own
configuration, from the real nixpkgs this Nix evaluates (20.09 on Nix 2.8, the nixos-unstable of early 2026 on
2.18 and later). Nothing is built and no host is contacted: a preview of machines that do not exist yet only
evaluates. Each line prints its ratio against its baseline, measured in the same run, pair by pair (the two sides
alternate, so a drifting machine speed hits both alike):

- fleet: `pulumi preview` of 10 new machines vs the same 10 configurations as separate `nix eval` processes, as
  many at once as the provider's pool runs (the cores). Twice: a first preview (nothing kept from earlier runs:
  the provider guesses what comes next), and a preview after the flake changed (the stack's plan known).
- memory: the largest Nix process of those previews vs one configuration's `nix eval`.
- one of twenty: `pulumi preview` of a 1-machine stack in a 20-configuration flake vs `nix eval` of that one
  configuration; and how many configurations the preview evaluated that the stack does not use. For the first
  preview, also when its first Nix call began: nothing is remembered then, so nothing begins before Pulumi's
  first Check, and that wait plus one evaluation is the least this provider could reach (the wait holds its own
  start). The fleet's first preview prints the same (the wait plus the baseline's ten evaluations).
- unchanged: a repeated `pulumi preview` of the 10 machines with nothing changed vs the preview of an empty stack
  (the same program without machines): how many Nix evaluations, and the ratio.
- package diff: a machine deployed (a lab system, for real; then the state says a real configuration was, see
  realnixos.as_deployed) previews a change of that configuration (nginx mainline, the newest kernel): whether
  the diff is shown, and how many `nix build`s ran (needs root: one lab host on 127.0.BENCH_NET.1, 42 unless set).

The provider is installed in a Pulumi home of the benchmark's own, laid out as `pulumi plugin install` lays out
the archive (install_plugin): the engine starts it as it starts a user's plugin, and caches its schema.

Each run changes the flake first (a comment), so neither side finds anything evaluated before, except where the
line says so. Peak memory comes from a wrapper around `nix` (the rusage its child exits with), which both sides run through.

`python bench/real_fleet.py` (or `make bench`) uses this machine's Nix; for another, run it in a release root:
`bash scripts/in-release.sh sid python bench/real_fleet.py`. RUNS (3) sets the pairs per line.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "lab"))
import labctl  # noqa: E402
import realnixos  # noqa: E402

RUNS = int(os.environ.get("RUNS", "3"))
NET = int(os.environ.get("BENCH_NET", "42"))
LAB_DIR = REPO / ".lab" / "bench-real"
FLEET = 10
FLAKE_SIZE = 20

# The child dies with the wrapper (PR_SET_PDEATHSIG 1, SIGKILL 9): an evaluation the provider cancels must not go
# on as an orphan and slow down the next measurement. Both sides run every Nix call through it, the provider some
# of them one after the other, so it is kept cheap: no site (-SE), no subprocess module, ctypes in the child only
# (15 ms a call here, where subprocess, resource and ctypes up front took 33).
NIX_WRAPPER = """#!{python} -SE
import os, sys, time
with open("{log}", "a") as f:
    f.write(f"start {{time.time():.3f}} {{' '.join(sys.argv[1:])}}\\n")
pid = os.fork()
if pid == 0:
    import ctypes
    ctypes.CDLL(None).prctl(1, 9)
    os.execv("{nix}", ["{nix}", *sys.argv[1:]])
_, status, usage = os.wait4(pid, 0)
with open("{log}", "a") as f:
    f.write(f"{{usage.ru_maxrss}} {{' '.join(sys.argv[1:])}}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""
TOPLEVEL = ".config.system.build.toplevel"


def install_plugin(home: Path) -> dict[str, str]:
    """The provider installed in a Pulumi home as `pulumi plugin install` lays the archive out (the launcher,
    schema.json, lib/cpXY), the tree made of this checkout and this Python's libraries: Pulumi then runs it as it
    runs a user's plugin (the launcher's search, the schema cached in the plugin's folder), not the checkout's
    `plugins.providers` path, which the engine cannot cache a schema for. Returns the environment that finds it."""
    version = subprocess.run(["bash", str(REPO / "scripts" / "version.sh")], check=True, capture_output=True,
                             text=True).stdout.strip()
    plugin = home / "plugins" / f"resource-nixos-v{version}"
    tree = plugin / "lib" / f"cp{sys.version_info[0]}{sys.version_info[1]}"
    tree.mkdir(parents=True)
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.startswith(("__editable__", "nixos_provider")):  # the checkout's own, linked below
            (tree / entry.name).symlink_to(entry)
    (tree / "nixos_provider").symlink_to(REPO / "provider" / "nixos_provider")
    shutil.copy(REPO / "provider" / "pulumi-resource-nixos", plugin)
    shutil.copy(REPO / "schema.json", plugin)
    # A plugin on PATH (this checkout's virtualenv) would shadow the installed one; a user's PATH has none.
    # The archive carries its bytecode (scripts/dist.sh compiles it): a plugin that may not write any (an
    # environment with PYTHONDONTWRITEBYTECODE, as this one's can be) compiles every module at each start,
    # about 0.35 s a preview here. The bytecode goes to a cache of the benchmark's own, filled by the warm-up.
    return {"PULUMI_HOME": str(home), "PULUMI_IGNORE_AMBIENT_PLUGINS": "true", "PULUMI_NIXOS_PYTHON": sys.executable,
            "PYTHONPYCACHEPREFIX": str(home / "bytecode")}


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.log = work / "nix-calls"
        self.flake = realnixos.write_flake(work / "flake", machines=FLAKE_SIZE, extra=False)
        bindir = work / "nix-bin"
        bindir.mkdir()
        real_nix, real_store = shutil.which("nix"), shutil.which("nix-store")
        assert real_nix and real_store, "nix is not on PATH"
        self.nix = bindir / "nix"
        self.nix.write_text(NIX_WRAPPER.format(python=sys.executable, nix=real_nix, log=self.log))
        self.nix.chmod(0o755)
        (bindir / "nix-store").symlink_to(real_store)
        (work / "state").mkdir()
        self.store = work / "evaluations"
        self.env = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                    "PULUMI_BACKEND_URL": f"file://{work / 'state'}", "PULUMI_CONFIG_PASSPHRASE": "b",
                    "PULUMI_SKIP_UPDATE_CHECK": "1", "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "1",
                    "PULUMI_NIXOS_EVALUATION_STORE": str(self.store), **install_plugin(work / "pulumi-home")}
        self.changes = 0
        self.projects: dict[str, Path] = {}
        self.runs_started: list[list[str]] = []  # per timed run: the nix calls it started
        self.waits: list[float] = []  # per timed run: seconds from its start to its first nix call

    def project(self, name: str, machines: list[str] | dict[str, str], connection: dict[str, object] | None = None,
                flake: str | None = None) -> Path:
        """A stack of machines (resource name -> configuration; a list: the same names) of the flake."""
        configurations = machines if isinstance(machines, dict) else {m: m for m in machines}
        proj = self.work / name
        new = not proj.exists()
        proj.mkdir(exist_ok=True)
        resources: dict[str, object] = {
            "nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(self.nix)]}}}
        for i, (m, configuration) in enumerate(configurations.items()):
            resources[m] = {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"}, "properties": {
                "connection": connection or {"host": f"127.0.99.{i + 1}", "password": "unused"},
                "flake": f"{flake or f'path:{self.flake}'}#{configuration}"}}
        (proj / "Pulumi.yaml").write_text(json.dumps({"name": name, "runtime": "yaml", "resources": resources}))
        if new:  # after Pulumi.yaml: the CLI (v3.276.0) names the stack after the project it finds
            subprocess.run(["pulumi", "--non-interactive", "stack", "init", "bench"], cwd=proj, env=self.env,
                           check=True, capture_output=True)
        self.projects[name] = proj
        return proj

    def pulumi(self, name: str, *args: str) -> str:
        return subprocess.run(["pulumi", "--non-interactive", *args], cwd=self.projects[name], env=self.env,
                              check=True, capture_output=True, text=True).stdout

    def change_flake(self) -> None:
        self.changes += 1
        with open(self.flake / "flake.nix", "a") as f:
            f.write(f"# change {self.changes}\n")

    def forget(self) -> None:
        """As on a machine that never previewed this stack: no results, no plans, no measured peaks."""
        shutil.rmtree(self.store, ignore_errors=True)

    def calls(self) -> list[tuple[int, str]]:
        """(peak RSS in KiB, arguments) of each nix call since the last reset."""
        if not self.log.exists():
            return []
        return [(int(line.split(" ", 1)[0]), line.split(" ", 1)[1]) for line in self.log.read_text().splitlines()
                if not line.startswith("start ")]

    def started(self) -> list[str]:
        """The arguments of each nix call started since the last reset, finished or not (a guess still running
        when the preview ends is killed, and was evaluated all the same)."""
        return [args for _, args in self._starts()]

    def _starts(self) -> list[tuple[float, str]]:
        """(wall-clock time, arguments) of each nix call started since the last reset."""
        if not self.log.exists():
            return []
        return [(float(when), args) for line in self.log.read_text().splitlines() if line.startswith("start ")
                for _, when, args in [line.split(" ", 2)]]

    def evaluated(self) -> list[str]:
        names = []
        for _, args in self.calls():
            if " eval " in f" {args} " and TOPLEVEL in args:
                names.append(args.split("nixosConfigurations.", 1)[1].split(".", 1)[0])
        return names

    def timed(self, fn: Callable[[], None]) -> float:
        self.log.unlink(missing_ok=True)
        began, started = time.time(), time.monotonic()
        fn()
        took = time.monotonic() - started
        starts = self._starts()
        self.runs_started.append([args for _, args in starts])
        self.waits.append(min((when for when, _ in starts), default=float("inf")) - began)
        return took

    def first_call_floor(self, baseline: list[float]) -> str:
        """When the first Nix call began in the last len(baseline) first previews (the runs alternate: the
        previews are every second one), and that wait plus the paired baseline against the baseline.

        Nothing is remembered in a first preview, so nothing can begin before Pulumi's first Check names a
        machine: the first Nix call (the flake's fingerprint) follows it. Were the evaluations then to take what
        the baseline's take, that is the least this provider could reach here (the wait includes its own start,
        about 0.15 s of Python and imports, besides Pulumi's)."""
        waits = self.waits[-2 * len(baseline)::2]
        floors = [(w + y) / y for w, y in zip(waits, baseline, strict=True)]
        return (f"the first Nix call began {min(waits):.2f} to {max(waits):.2f} s into the preview (after Pulumi's "
                f"first Check), which with the baseline's evaluations is {statistics.median(floors):.2f}x")

    def unused_evaluations(self, runs: int) -> int:
        """The most configurations other than web1 whose evaluation started in one of the last `runs` timed runs
        of the 1-machine stack's preview (they alternate with the baseline's, which evaluates web1 alone)."""
        return max(sum(1 for args in run if " eval " in f" {args} " and TOPLEVEL in args
                       and "nixosConfigurations.web1." not in args) for run in self.runs_started[-2 * runs:])

    def preview(self, name: str) -> Callable[[], None]:
        def run() -> None:
            subprocess.run(["pulumi", "--non-interactive", "preview"], cwd=self.projects[name], env=self.env,
                           check=True, capture_output=True)
        return run

    def nix_evals(self, machines: list[str], parallel: int) -> Callable[[], None]:
        """What a user runs without the provider: one `nix eval` per configuration, `parallel` at a time."""
        def one(m: str) -> None:
            subprocess.run([str(self.nix), "eval", "--raw", f"path:{self.flake}#nixosConfigurations.{m}{TOPLEVEL}"
                            ".outPath"], env=self.env, check=True, capture_output=True)

        def run() -> None:
            with ThreadPoolExecutor(parallel) as pool:
                list(pool.map(one, machines))
        return run


def package_diff(bench: Bench) -> tuple[str, str]:
    """A real configuration's change previewed from derivations: shown, and nothing built."""
    flake = realnixos.write_flake(bench.work / "diff-flake", machines=1)
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    host = labctl.add_host(LAB_DIR, "real1", f"127.0.{NET}.1")
    try:
        connection = {"host": host.address, "port": host.port, "privateKey": Path(host.privateKeyPath).read_text()}
        bench.project("diff", ["web"], connection, flake=f"path:{labctl.LAB_FLAKE}")
        bench.pulumi("diff", "up", "--yes", "--skip-preview")
        state = realnixos.as_deployed(json.loads(bench.pulumi("diff", "stack", "export")), flake, "web1",
                                      realnixos.evaluate(flake, "web1"))
        (bench.work / "diff-state.json").write_text(json.dumps(state))
        bench.pulumi("diff", "stack", "import", "--file", str(bench.work / "diff-state.json"))
        bench.project("diff", {"web": "web1-next"}, connection, flake=f"path:{flake}")
        bench.log.unlink(missing_ok=True)
        started = time.monotonic()
        out = bench.pulumi("diff", "preview")
        seconds = time.monotonic() - started
        builds = sum(1 for _, args in bench.calls() if " build " in f" {args} ")
        shown = [ln.strip() for ln in out.splitlines()
                 if "(from the derivations" in ln or ln.strip().startswith(("nginx:", "linux:", "needs a reboot"))]
        return ("preview package diff of a real configuration change (nginx mainline, the newest kernel), nothing "
                "built", f"{'shown' if len(shown) >= 3 else 'NOT shown'} in {seconds:.1f} s: "
                         + "; ".join(f"`{ln}`" for ln in shown) + f"; `nix build` runs: {builds}")
    finally:
        labctl.stop_host(host.state)


def pairs(label: str, a: Callable[[], float], b: Callable[[], float]) -> tuple[list[float], list[float]]:
    sides: tuple[list[float], list[float]] = ([], [])
    for i in range(RUNS):
        sides[0].append(a())
        sides[1].append(b())
        print(f"  {label} run {i + 1}: {sides[0][-1]:.1f} s vs {sides[1][-1]:.1f} s", file=sys.stderr)
    return sides


def ratio(a: list[float], b: list[float]) -> str:
    r = [x / y for x, y in zip(a, b, strict=True)]
    return f"**{statistics.median(r):.2f}x** (pairwise min {min(r):.2f}, max {max(r):.2f})"


def main() -> list[tuple[str, str]]:
    nixpkgs = realnixos.find_nixpkgs()
    if nixpkgs is None:
        sys.exit(realnixos.HOW)
    version = subprocess.run(["nix", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="pulumi-nixos-bench-real."))
    try:
        bench = Bench(work)
        fleet = [f"web{i}" for i in range(1, FLEET + 1)]
        bench.project("fleet", fleet)
        bench.project("one", ["web1"])
        bench.project("empty", [])
        workers = len(os.sched_getaffinity(0))
        # Warm-up: the nixpkgs input into the store, the flake locked, plugins started once.
        bench.timed(bench.nix_evals(["web1"], 1))
        bench.timed(bench.preview("one"))
        rows = []

        def first_preview(name: str, record: list[list[tuple[int, str]]]) -> Callable[[], float]:
            def run() -> float:
                bench.change_flake()
                bench.forget()
                t = bench.timed(bench.preview(name))
                record.append(bench.calls())
                return t
            return run

        def changed_preview(name: str, record: list[list[tuple[int, str]]]) -> Callable[[], float]:
            def run() -> float:
                bench.change_flake()
                t = bench.timed(bench.preview(name))
                record.append(bench.calls())
                return t
            return run

        def baseline(machines: list[str], record: list[list[tuple[int, str]]]) -> Callable[[], float]:
            def run() -> float:
                bench.change_flake()
                t = bench.timed(bench.nix_evals(machines, workers))
                record.append(bench.calls())
                return t
            return run

        base_calls: list[list[tuple[int, str]]] = []
        first_calls: list[list[tuple[int, str]]] = []
        a, b = pairs("fleet, first preview", first_preview("fleet", first_calls), baseline(fleet, base_calls))
        rows.append((f"`pulumi preview`, {FLEET} new machines, first preview (nothing kept), vs {FLEET} `nix eval` "
                     f"processes, {workers} at a time",
                     f"{statistics.median(a):.1f} s vs {statistics.median(b):.1f} s: {ratio(a, b)}; "
                     f"{bench.first_call_floor(b)}"))
        bench.forget()
        bench.timed(bench.preview("fleet"))  # the stack's plan, as after any earlier preview
        changed_calls: list[list[tuple[int, str]]] = []
        a, b = pairs("fleet, after a change", changed_preview("fleet", changed_calls), baseline(fleet, base_calls))
        rows.append(("the same after the flake changed (the stack's plan known), vs the same baseline",
                     f"{statistics.median(a):.1f} s vs {statistics.median(b):.1f} s: {ratio(a, b)}"))

        def eval_rss(calls: list[tuple[int, str]]) -> list[int]:
            return [rss for rss, args in calls if " eval " in f" {args} " and TOPLEVEL in args]

        one_rss = statistics.median(r for run in base_calls for r in eval_rss(run))
        preview_rss = max(r for run in first_calls + changed_calls for r in eval_rss(run))
        rows.append(("peak RSS of the largest Nix process in those previews, vs one configuration's `nix eval` "
                     "(median)", f"{preview_rss / 1024:.0f} MiB vs {one_rss / 1024:.0f} MiB: "
                                 f"**{preview_rss / one_rss:.2f}x**"))

        one_first: list[list[tuple[int, str]]] = []
        one_base: list[list[tuple[int, str]]] = []
        a, b = pairs("one of twenty, first", first_preview("one", one_first), baseline(["web1"], one_base))
        unused = bench.unused_evaluations(len(one_first))
        rows.append((f"`pulumi preview`, a 1-machine stack in a {FLAKE_SIZE}-configuration flake, first preview, vs "
                     "`nix eval` of that configuration",
                     f"{statistics.median(a):.1f} s vs {statistics.median(b):.1f} s: {ratio(a, b)}; configurations "
                     f"evaluated that the stack does not use: at most {unused}; {bench.first_call_floor(b)}"))
        bench.forget()
        bench.timed(bench.preview("one"))
        one_changed: list[list[tuple[int, str]]] = []
        a, b = pairs("one of twenty, after a change", changed_preview("one", one_changed), baseline(["web1"], one_base))
        unused = bench.unused_evaluations(len(one_changed))
        rows.append(("the same after the flake changed (the stack's plan known)",
                     f"{statistics.median(a):.1f} s vs {statistics.median(b):.1f} s: {ratio(a, b)}; unused "
                     f"configurations evaluated: at most {unused}"))

        bench.timed(bench.preview("fleet"))  # everything evaluated and kept
        evaluations: list[int] = []

        def unchanged() -> float:
            t = bench.timed(bench.preview("fleet"))
            evaluations.append(len(bench.evaluated()))
            return t

        a, b = pairs("unchanged", unchanged, lambda: bench.timed(bench.preview("empty")))
        rows.append((f"`pulumi preview`, {FLEET} machines, nothing changed, vs the preview of an empty stack",
                     f"{statistics.median(a):.2f} s vs {statistics.median(b):.2f} s: {ratio(a, b)}; Nix evaluations: "
                     f"{max(evaluations)}"))
        rows.append(package_diff(bench))
        print(f"\n{version}, nixpkgs {nixpkgs.release}, {workers} cores, {RUNS} pairs per line", file=sys.stderr)
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    rows = main()
    print("| benchmark | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
