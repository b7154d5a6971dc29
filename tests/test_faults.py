"""The fault suite (issue 13): each fault repeated against lab hosts, counted.

`make test` runs every fault a few times. `make faults` runs the counts that
docs/reliability.md promises (PULUMI_NIXOS_FAULTS=full) and rewrites the
table there from what this run saw.  Every row is a test with assertions: a
run that does not meet "pass means" fails the suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import labctl
import pytest
from conftest import LAB_NET, REPO, HostFactory, PulumiProject, Systems, current_system, in_host, remote_for, write_flake
from google.protobuf import struct_pb2
from hypothesis import HealthCheck as HypothesisHealthCheck
from hypothesis import given, settings
from hypothesis import strategies as st
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.errors import DeployError, EngineError
from nixos_provider.engine.models import DeployRequest, HealthCheck
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc
from test_engine import current_gen, gens
from test_provider_e2e import PROVIDER_DIR, connection, machine, program, strip_ansi
from test_reliability import descendants, is_provider, supervisor_state, up_while_activating
from test_systemd import reboot_during_activation
from test_unreachable_hosts_e2e import system_link, without_ciphertexts

FULL = os.environ.get("PULUMI_NIXOS_FAULTS") == "full"
pytestmark = [pytest.mark.timeout(3600 if FULL else 900)]
REPORT = REPO / "docs" / "reliability.md"


def runs(full: int, quick: int) -> int:
    return full if FULL else quick


# -- the table ------------------------------------------------------------------------------


@dataclass
class Row:
    fault: str
    runs: int
    passed: int
    means: str
    figure: str = ""


ORDER = ["push", "sigint", "sigkill", "magic", "fails", "fleet", "malformed", "hostile", "secrets", "hostkey",
         "wedged", "move", "reboot", "registration", "partial"]
TABLE: dict[str, Row] = {}


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    if not FULL or not TABLE:
        return
    text = REPORT.read_text()
    begin, end = "<!-- faults:begin -->\n", "<!-- faults:end -->"
    old = text[text.index(begin) + len(begin):text.index(end)]
    # Rows this run did not make (`make faults PYTEST_ARGS=-k...`) keep what the last run wrote, and its date.
    nix = subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout.strip()
    rows = {m[1]: m[0] for m in re.findall(r"^(\| <!--(\w+)--> .*)$", old, re.M)}
    for key, row in TABLE.items():
        rows[key] = (f"| <!--{key}--> {row.fault} | {row.runs} | {row.passed} | {row.means} | {row.figure} "
                     f"| {time.strftime('%Y-%m-%d')}, {nix} |")
    lines = ["| fault | runs | passed | pass means | measured | run |", "|---|---|---|---|---|---|"]
    lines += [rows[key] for key in ORDER if key in rows]
    REPORT.write_text(text[:text.index(begin) + len(begin)] + "\n".join(lines) + "\n" + text[text.index(end):])


def record(key: str, fault: str, means: str, results: list[str | None], figure: str = "") -> None:
    """results: one entry per run, None when it passed, else what went wrong. Fails the test on any failure."""
    failures = [r for r in results if r is not None]
    TABLE[key] = Row(fault, len(results), len(results) - len(failures), means, figure)
    print(f"fault {key}: {TABLE[key]}")
    assert not failures, f"{len(failures)} of {len(results)} runs failed:\n" + "\n".join(failures[:10])


# -- 1. SSH killed at a random point of a push -------------------------------------------------


def heavy_flake(dest: Path, count: int) -> str:
    """Systems heavy-0..heavy-N, each with its own 48 MB in six paths, so a push takes a while."""
    configs = "\n".join(
        f'heavy-{i} = lab.nixosConfiguration {{ version = "heavy-{i}"; packages = ['
        + " ".join(f'{{ name = "blob{j}"; version = "{i}"; size = 8000000; }}' for j in range(6))
        + "]; };" for i in range(count))
    return write_flake(dest, f"{{ outputs = {{ self }}: let lab = import ./lib.nix; in {{\n"
                             f"  nixosConfigurations = {{\n{configs}\n  }};\n}}; }}")


def kill_ssh_sessions(host: labctl.LabHost) -> int:
    """SIGKILL every SSH session process on the host (never the listener); how many there were."""
    ns = (host.state / "ns").read_text().strip()
    killed = 0
    for pid in labctl.processes_in_namespace(ns):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"sshd: ") and b"[listener]" not in cmdline and b"/usr/sbin/sshd" not in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
    return killed


def half_registered(host: labctl.LabHost, closure: list[str]) -> list[str]:
    """Paths valid on the host whose references are not: what an interrupted import must never leave."""
    invalid = set(in_host(host, "nix-store", "--check-validity", "--print-invalid", *closure).stdout.split())
    broken = []
    for path in closure:
        if path in invalid:
            continue
        refs = in_host(host, "nix-store", "-q", "--references", path).stdout.split()
        if any(r in invalid for r in refs):
            broken.append(path)
    return broken


async def test_ssh_killed_at_a_random_point_of_a_push(lab_host: labctl.LabHost, systems: Systems,
                                                      tmp_path: Path) -> None:
    n = runs(21, 2)  # the first system is pushed whole to time a push; the others are the runs
    flake = heavy_flake(tmp_path / "f", n)
    built = json.loads(labctl.run([*labctl.NIX, "build", "--no-link", "--json",
                                   *(f"{flake}#nixosConfigurations.heavy-{i}.config.system.build.toplevel"
                                     for i in range(n))]).stdout)
    heavy = sorted((b["outputs"]["out"] for b in built), key=lambda p: int(p.rsplit("-", 1)[-1]))
    await engine.deploy(DeployRequest(remote_for(lab_host), systems["web"]))
    # How long one push takes here: the kills land anywhere from its start to its end.
    started = time.monotonic()
    await engine.deploy(DeployRequest(remote_for(lab_host), heavy[0]))
    push_seconds = time.monotonic() - started
    rng = random.Random(13)
    results: list[str | None] = []
    interrupted = 0
    for system in heavy[1:] + [heavy[0]] * (1 if n == 1 else 0):
        closure = labctl.run(["nix-store", "-qR", system]).stdout.split()
        before = gens(lab_host)
        task = asyncio.create_task(engine.deploy(DeployRequest(remote_for(lab_host), system)))
        await asyncio.sleep(rng.uniform(0.05, push_seconds))
        kill_ssh_sessions(lab_host)
        try:
            await task
        except EngineError:
            interrupted += 1
        after = gens(lab_host)
        problems = []
        if after != before and not (after == [*before, max(before) + 1] and current_system(lab_host) == system):
            problems.append(f"generations {before} -> {after}")
        if broken := half_registered(lab_host, closure):
            problems.append(f"half-registered: {broken}")
        try:
            await engine.deploy(DeployRequest(remote_for(lab_host), system))
            if current_system(lab_host) != system:
                problems.append("the next deploy did not switch")
        except EngineError as e:
            problems.append(f"the next deploy failed: {e}")
        results.append("; ".join(problems) or None)
    record("push", "SSH killed at a random point of a push", "no half-registered path or generation; "
           "the next deploy succeeds", results,
           f"{interrupted} of {len(results)} deploys failed with a clear error, the others finished "
           "(the kill found no copy running; later steps open their own connection); "
           f"a push took {push_seconds:.1f} s")


# -- 2. SIGINT of `pulumi up` during activation, then an immediate up ---------------------------


def test_sigint_during_activation_then_an_immediate_up(tmp_path: Path, lab_host: labctl.LabHost,
                                                       systems: Systems, pulumi_available: str) -> None:
    results: list[str | None] = []
    for i in range(runs(10, 1)):
        (tmp_path / f"run{i}" / "state").mkdir(parents=True)
        (tmp_path / f"run{i}" / "prog").mkdir()
        project = PulumiProject(tmp_path / f"run{i}" / "prog", tmp_path / f"run{i}" / "state")
        proc = up_while_activating(project, lab_host, subprocess.PIPE)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
        problems = []
        if current_system(lab_host) != systems["web"] or "the deployment was cancelled. Rolled back" not in out:
            problems.append(f"the cancelled deployment did not roll back: {strip_ansi(out)[-600:]}")
        project.up(check=False)
        time.sleep(5 + 2)  # past confirmTimeout: a stale supervisor would roll back now
        running = current_system(lab_host)
        recorded = project.resource("NixosMachine")["outputs"]["systemPath"]  # type: ignore[index]
        if running != systems["web-slow"] or recorded != running:
            problems.append(f"host runs {running}, state says {recorded}")
        results.append("; ".join(problems) or None)
    record("sigint", "SIGINT of `pulumi up` during activation, then an immediate up",
           "the cancelled up rolls back; host and state agree after the next up", results)


# -- 3. SIGKILL of the CLI at random points ----------------------------------------------------


def group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def converge(project: PulumiProject) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """What a user does after a killed CLI: `pulumi cancel` when the stack is locked, `refresh`, `up`
    (once more if the host is still busy with the killed run's deployment)."""
    steps = []
    up = project.up(check=False)
    for _ in range(5):
        out = up.stdout + up.stderr
        if up.returncode == 0:
            break
        if "locked" in out:
            steps.append("cancel")
            project.run("cancel", "--yes", check=False)
        elif "is being deployed by someone else" in out:
            steps.append("wait")
            time.sleep(10)
        steps.append("refresh")
        project.run("refresh", "--yes", "--skip-preview", "--clear-pending-creates", check=False)
        up = project.up(check=False)
    return up, steps


def test_sigkill_of_the_cli_at_random_points(project: PulumiProject, lab_host: labctl.LabHost,
                                             systems: Systems) -> None:
    configs = ["web-v2", "web-v3"]
    program(project, {"web": machine(lab_host, "web", confirmTimeout=5)}, {"systemPath": "${web.systemPath}"})
    project.run("stack", "init", "dev")
    started = time.monotonic()
    project.up()
    up_seconds = time.monotonic() - started
    rng = random.Random(17)
    results: list[str | None] = []
    user_steps: dict[str, int] = {}
    for i in range(runs(10, 1)):
        config = configs[i % 2]
        program(project, {"web": machine(lab_host, config, confirmTimeout=5)}, {"systemPath": "${web.systemPath}"})
        proc = subprocess.Popen(["pulumi", "--non-interactive", "up", "--yes", "--skip-preview"],
                                cwd=project.dir, env=project.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        time.sleep(rng.uniform(0.2, up_seconds))
        proc.kill()
        proc.wait()
        problems = []
        deadline = time.monotonic() + 30
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left := group_alive(proc.pid):
            problems.append(f"processes of the killed run still alive after 30 s: {left}")
        up, steps = converge(project)
        for s in steps:
            user_steps[s] = user_steps.get(s, 0) + 1
        if up.returncode != 0:
            problems.append(f"no convergence: {strip_ansi(up.stdout + up.stderr)[-800:]}")
        running = current_system(lab_host)
        recorded = project.resource("NixosMachine")["outputs"]["systemPath"]  # type: ignore[index]
        if running != systems[config] or recorded != running:
            problems.append(f"host runs {running}, state says {recorded}, declared {systems[config]}")
        results.append("; ".join(problems) or None)
    steps_text = ", ".join(f"{k} ×{v}" for k, v in sorted(user_steps.items())) or "none"
    record("sigkill", "SIGKILL of the CLI at a random point of `pulumi up`",
           "no process of the killed run left after 30 s; `up` converges after what a user does "
           "(`pulumi cancel` if locked, `refresh`, `up`)", results, f"user steps needed: {steps_text}")


# -- 4. activation moves sshd: magic rollback ---------------------------------------------------


async def test_magic_rollback_when_activation_moves_sshd(lab_host: labctl.LabHost, systems: Systems) -> None:
    confirm = 4
    await engine.deploy(DeployRequest(remote_for(lab_host), systems["web"]))
    results: list[str | None] = []
    slowest = 0.0
    for _ in range(runs(20, 2)):
        before = gens(lab_host)
        # The clock starts when the new generation is registered, just before activation: from then on the
        # deployer can lose the host. (Polling may never see the short `activating` state itself.)
        activating: list[float] = []

        def status(line: str, activating: list[float] = activating) -> None:
            if line.startswith(("registering generation", "activating", "waiting for confirmation")) \
                    and not activating:
                activating.append(time.monotonic())

        try:
            await engine.deploy(DeployRequest(remote_for(lab_host), systems["web-moves-ssh"],
                                              confirm_timeout=confirm), status=status)
            results.append("the deployment that moved sshd was confirmed")
            continue
        except DeployError as e:
            err: DeployError | None = e
        elapsed = time.monotonic() - activating[0] if activating else float("inf")
        slowest = max(slowest, elapsed)
        problems = []
        if err is None or not err.rolled_back:
            problems.append(f"not rolled back: {err}")
        if elapsed > confirm + 10:
            problems.append(f"took {elapsed:.1f} s")
        if current_system(lab_host) != systems["web"] or gens(lab_host) != before:
            problems.append(f"runs {current_system(lab_host)}, generations {before} -> {gens(lab_host)}")
        results.append("; ".join(problems) or None)
    record("magic", "activation moves sshd (magic rollback)",
           f"back on the previous generation within confirmTimeout + 10 s ({confirm} + 10)", results,
           f"slowest: {slowest:.1f} s from registering the generation to the error that says it rolled back")


# -- 5. activation or a health check fails: auto rollback ---------------------------------------


async def test_failed_activation_or_health_check_rolls_back(lab_host: labctl.LabHost, systems: Systems) -> None:
    await engine.deploy(DeployRequest(remote_for(lab_host), systems["web-v2"]))
    http = HealthCheck(http=f"http://{lab_host.address}:8080/", retries=1, interval=0.2)
    cases = [("web-activation-fails", ()), ("web-http-500", (http,)),
             ("web", (HealthCheck(command="exit 3", retries=0, name="always fails"),))]
    results: list[str | None] = []
    for i in range(runs(21, 3)):
        config, checks = cases[i % len(cases)]
        before = gens(lab_host)
        try:
            await engine.deploy(DeployRequest(remote_for(lab_host), systems[config], health_checks=checks))
            results.append(f"{config}: the failing deployment succeeded")
            continue
        except DeployError as e:
            rolled_back = e.rolled_back
        problems = []
        if not rolled_back:
            problems.append("not rolled back")
        if current_system(lab_host) != systems["web-v2"] or gens(lab_host) != before or current_gen(lab_host) != 2:
            problems.append(f"runs {current_system(lab_host)}, generations {before} -> {gens(lab_host)}")
        if in_host(lab_host, "sh", "-c", "ls -d /tmp/pulumi-nixos.* 2>/dev/null", check=False).stdout:
            problems.append("a work directory was left in /tmp")
        results.append(f"{config}: " + "; ".join(problems) if problems else None)
    record("fails", "activation or a health check fails", "rolled back; the failed generation removed; "
           "nothing left in /tmp", results, "activation exit 4, HTTP 500, a failing command, in turn")


# -- 6. many hosts, many rounds, at once ---------------------------------------------------------


def test_hosts_and_rounds_concurrently(project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    n_hosts, n_rounds = runs(20, 3), runs(10, 2)
    hosts = [new_host() for _ in range(n_hosts)]
    configs = ["web", "web-v2", "web-v3"]
    results: list[str | None] = []
    slowest = 0.0
    for r in range(n_rounds):
        declared = {f"m{i}": configs[(i + r) % 3] for i in range(n_hosts)}
        program(project, {name: machine(h, declared[name]) for name, h in zip(declared, hosts, strict=True)})
        if r == 0:
            project.run("stack", "init", "dev")
        started = time.monotonic()
        up = project.up(check=False)
        slowest = max(slowest, time.monotonic() - started)
        states = {r["urn"].rsplit("::", 1)[1]: r["outputs"].get("systemPath")  # type: ignore[index]
                  for r in project.state()["deployment"]["resources"]  # type: ignore[index]
                  if r["type"].endswith("NixosMachine")}
        for (name, config), host in zip(declared.items(), hosts, strict=True):
            running = current_system(host)
            if up.returncode != 0 or running != systems[config] or states.get(name) != running:
                results.append(f"round {r} {name}: up exit {up.returncode}, runs {running}, "
                               f"state {states.get(name)}, declared {systems[config]}")
            else:
                results.append(None)
    record("fleet", f"{n_hosts} hosts × {n_rounds} rounds, one `pulumi up` per round",
           "every deploy succeeds; every host runs what its state says and what was declared", results,
           f"slowest round: {slowest:.0f} s")


# -- 7 and 8. malformed and hostile inputs, straight to the provider's Check -------------------


class ProviderProcess:
    """The real provider process, spoken to over gRPC as the engine would."""

    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([f"{PROVIDER_DIR}/pulumi-resource-nixos"], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        port = self.proc.stdout.readline().strip()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)
        self.stub.Configure(provider_pb2.ConfigureRequest(acceptSecrets=True), timeout=30)

    def check(self, type_: str, news: dict[str, Any]) -> provider_pb2.CheckResponse:
        s = struct_pb2.Struct()
        s.update(news)
        urn = f"urn:pulumi:dev::faults::{type_}::r"
        return self.stub.Check(provider_pb2.CheckRequest(urn=urn, type=type_, news=s, olds=struct_pb2.Struct()),
                               timeout=120)

    def create(self, type_: str, properties: struct_pb2.Struct) -> None:
        urn = f"urn:pulumi:dev::faults::{type_}::r"
        self.stub.Create(provider_pb2.CreateRequest(urn=urn, type=type_, properties=properties), timeout=300)

    def close(self) -> str:
        self.channel.close()
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[ProviderProcess]:
    p = ProviderProcess(tmp_path)
    yield p
    written = p.close()
    assert "Traceback" not in written, f"the plugin wrote a traceback to its stderr:\n{written}"


SCHEMA = json.loads((REPO / "schema.json").read_text())
TYPE_REF = "#/types/"


def leaves(props: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every input property path of the schema (objects by field, arrays by element 0), with its spec."""
    for name, spec in props.items():
        path = f"{prefix}{name}"
        yield path, spec
        ref = spec.get("$ref") or spec.get("items", {}).get("$ref")
        if ref and ref.startswith(TYPE_REF):
            sub = SCHEMA["types"][ref[len(TYPE_REF):]]["properties"]
            yield from leaves(sub, f"{path}[0]." if spec.get("type") == "array" else f"{path}.")


def base_inputs(type_: str, host: labctl.LabHost) -> dict[str, Any]:
    conn = {"host": host.address, "port": host.port, "privateKey": Path(host.privateKeyPath).read_text()}
    if type_.endswith("NixProfile"):
        return {"connection": conn, "profile": "app", "flake": f"path:{labctl.LAB_FLAKE}#app-v1"}
    return {"connection": conn, "flake": f"path:{labctl.LAB_FLAKE}#web"}


# A valid first element for arrays of objects, so that only the value put into it is wrong.
VALID_ELEMENT: dict[str, dict[str, Any]] = {"healthChecks": {"tcp": 8080}, "nixOptions": {"name": "a", "value": "b"},
                                           "secretFiles": {"path": "/etc/lab-fault/file", "content": "x"}}


def put(inputs: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """inputs with `value` at `path` (a.b[0].c), creating objects and one-element arrays on the way."""
    out = json.loads(json.dumps(inputs))
    node = out
    parts = re.findall(r"([A-Za-z]+)(\[0\])?", path)
    for i, (name, indexed) in enumerate(parts):
        last = i == len(parts) - 1
        if indexed:
            node[name] = [value] if last else [dict(VALID_ELEMENT.get(name, {}))]
            node = node[name][0]
        elif last:
            node[name] = value
        else:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise AssertionError(path)
    return out


def kind(spec: dict[str, Any]) -> str:
    if "$ref" in spec:
        return "object"
    return str(spec.get("type", "object"))


WRONG: dict[str, st.SearchStrategy[Any]] = {
    "string": st.one_of(st.integers(-10**6, 10**6), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "integer": st.one_of(st.text(alphabet="abcxyz;$` ", min_size=1, max_size=8), st.booleans(),
                         st.floats(0.1, 0.9), st.lists(st.integers(), max_size=2)),
    "number": st.one_of(st.text(alphabet="abcxyz;$` ", min_size=1, max_size=8), st.booleans(),
                        st.lists(st.integers(), max_size=2)),
    "boolean": st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=8), st.integers(2, 10**6),
                         st.lists(st.booleans(), max_size=2)),
    "array": st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=8), st.integers(),
                       st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=3), st.integers(), max_size=2)),
    "object": st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=8), st.integers(),
                        st.lists(st.integers(), max_size=2)),
}


def named(res: provider_pb2.CheckResponse, path: str) -> bool:
    return any(f.property == path or f.property.startswith(path + ".") or f.property.startswith(path + "[")
               for f in res.failures)


def test_malformed_inputs_fail_check_naming_the_property(provider: ProviderProcess, lab_host: labctl.LabHost) -> None:
    targets = [(t, path, spec) for t, r in SCHEMA["resources"].items()
               for path, spec in leaves(r["inputProperties"])]
    results: list[str | None] = []
    seen: set[str] = set()

    @settings(max_examples=runs(500, 100), deadline=None, database=None, derandomize=not FULL,
              suppress_health_check=list(HypothesisHealthCheck))
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        type_, path, spec = data.draw(st.sampled_from(targets))
        value = data.draw(WRONG[kind(spec)])
        seen.add(f"{type_.rsplit(':', 1)[1]}.{path}")
        news = put(base_inputs(type_, lab_host), path, value)
        try:
            res = provider.check(type_, news)
        except grpc.RpcError as e:
            results.append(f"{path} = {value!r}: Check raised {e.code()}: {e.details()}")  # type: ignore[attr-defined]
            return
        bad = [f"{f.property}: {f.reason}" for f in res.failures
               if "Traceback" in f.reason or "internal error" in f.reason]
        if not named(res, path) or bad:
            results.append(f"{path} = {value!r}: failures {[(f.property, f.reason) for f in res.failures]}")
        else:
            results.append(None)

    case()
    record("malformed", "malformed inputs: a value of the wrong type at a random property of the schema "
           "(hypothesis)", "a Check failure naming the property; never an internal error", results,
           f"{len(seen)} of {len(targets)} property paths hit")


HOSTILE_FORMS = ["$(touch /tmp/pwned-{n})", "x; touch /tmp/pwned-{n}; echo", "`touch /tmp/pwned-{n}`",
                 "'\"; touch /tmp/pwned-{n} #"]
# Fields that are commands by design (run through a shell on the target, or as argv).
COMMANDS = {"healthChecks[0].command", "activate", "install.command"}


def test_hostile_strings_in_every_string_input(provider: ProviderProcess, lab_host: labctl.LabHost,
                                               systems: Systems) -> None:
    results: list[str | None] = []
    created = 0
    n = 0
    for type_, r in SCHEMA["resources"].items():
        for path, spec in leaves(r["inputProperties"]):
            items = spec.get("items", {}).get("type") if kind(spec) == "array" else None
            if (kind(spec) != "string" and items != "string") or path in COMMANDS:
                continue
            # Every form for every input in the full run; in turn, one per input, in the quick one.
            for form in (HOSTILE_FORMS if FULL else [HOSTILE_FORMS[n % len(HOSTILE_FORMS)]]):
                n += 1
                marker = f"/tmp/pwned-{n}"
                value = form.format(n=n)
                news = put(base_inputs(type_, lab_host), path, [value] if items else value)
                outcome = "refused by Check"
                try:
                    res = provider.check(type_, news)
                    if not res.failures:
                        outcome = "created"
                        try:
                            provider.create(type_, res.inputs)
                            created += 1
                        except grpc.RpcError as e:
                            outcome = f"create failed: {e.details()}"  # type: ignore[attr-defined]
                            if e.code() == grpc.StatusCode.INTERNAL:  # type: ignore[attr-defined]
                                results.append(f"{path} = {value!r}: {outcome}")
                                continue
                except grpc.RpcError as e:
                    results.append(f"{path} = {value!r}: Check raised {e.details()}")  # type: ignore[attr-defined]
                    continue
                if Path(marker).exists() or in_host(lab_host, "test", "-e", marker, check=False).returncode == 0:
                    results.append(f"{path} = {value!r} ran a command ({outcome})")
                else:
                    results.append(None)
    record("hostile", f"shell metacharacters in every string input ({'4 forms each' if FULL else 'one form each'})",
           "no command runs on the deployer or the target", results,
           f"{created} of {len(results)} were accepted and deployed; the rest refused by Check. "
           f"Excluded, commands by design: {', '.join(sorted(COMMANDS))}")


# -- 9. secrets ------------------------------------------------------------------------------------


def test_secrets_never_appear_in_plain_text(project: PulumiProject, new_host: HostFactory, systems: Systems,
                                            tmp_path: Path) -> None:
    jump, target = new_host(), new_host()
    # Fresh values, so that finding one anywhere means this run leaked it.
    passphrase, password = f"key-pass-{secrets.token_hex(8)}", f"jump-pass-{secrets.token_hex(8)}"
    file_secret = f"file-secret-{secrets.token_hex(8)}"
    labctl.run(labctl.nsenter(jump.state, ["chpasswd"]), input=f"{jump.nonRootUser}:{password}\n")
    key = tmp_path / "id_pass"
    labctl.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(key)])
    auth = target.state / "etc-upper/lab/authorized_keys/root"
    auth.write_text(auth.read_text() + (tmp_path / "id_pass.pub").read_text())

    def web(flake: str) -> dict[str, Any]:
        return {"type": "nixos:NixosMachine", "properties": {
            "connection": {"host": target.address, "port": target.port,
                           "privateKey": {"fn::readFile": str(key)}, "privateKeyPassword": "${keyPass}",
                           "proxy": {"host": jump.address, "port": jump.port, "user": jump.nonRootUser,
                                     "password": "${jumpPass}"}},
            "flake": f"path:{labctl.LAB_FLAKE}#{flake}",
            "secretFiles": [{"path": "/etc/lab-secrets/key", "content": "${fileSecret}"}]}}

    def write(flake: str) -> None:
        program(project, config={"keyPass": {"type": "string", "secret": True},
                                 "jumpPass": {"type": "string", "secret": True},
                                 "fileSecret": {"type": "string", "secret": True}}, resources={
            "web": web(flake),
            # No key of its own: nixos:defaultPrivateKey.
            "app": {"type": "nixos:NixProfile", "properties": {
                "connection": {"host": target.address, "port": target.port},
                "user": "alice", "profile": "app", "flake": f"path:{labctl.LAB_FLAKE}#app-v1"}}})

    write("web")
    project.run("stack", "init", "dev")
    project.run("config", "set", "--secret", "keyPass", passphrase)
    project.run("config", "set", "--secret", "jumpPass", password)
    project.run("config", "set", "--secret", "fileSecret", file_secret)
    project.run("config", "set", "--secret", "nixos:defaultPrivateKey", "--", Path(target.privateKeyPath).read_text())
    up = project.up("--logtostderr", "-v=3")
    refresh = project.run("refresh", "--yes", "--skip-preview", "--logtostderr", "-v=3")
    # A failing up: the wrong passphrase, to see the error path too.
    write("web-v2")
    project.run("config", "set", "--secret", "keyPass", passphrase + "-wrong")
    failed = project.up("--logtostderr", "-v=3", check=False)
    assert current_system(target) == systems["web"]
    assert in_host(target, "cat", "/etc/lab-secrets/key").stdout == file_secret
    # The third line of a key file: the second is the same for every unencrypted ed25519 key (the format's
    # header), so finding it would only say that some key file exists.
    values = {
        "connection.privateKey": key.read_text().splitlines()[2],
        "connection.privateKeyPassword": passphrase,
        "connection.proxy.password": password,
        "secretFiles[0].content": file_secret,
        "nixos:defaultPrivateKey": Path(target.privateKeyPath).read_text().splitlines()[2],
    }
    places = {"stack export": project.run("stack", "export").stdout,
              "CLI output and engine logs": "\n".join(p.stdout + p.stderr for p in (up, refresh, failed))}
    # Files on the deployer: the project, its state and PULUMI_HOME, and whatever the run left in /tmp.
    for root in (tmp_path, Path("/tmp")):
        for dirpath, _, files in os.walk(root):
            if root != tmp_path and (dirpath.startswith("/tmp/pytest-") or "/hosts/" in dirpath):
                continue  # test directories (this test's is searched as tmp_path); lab hosts' own disks
            for f in files:
                p = Path(dirpath) / f
                if p == key or p.name == "id_pass":
                    continue
                try:
                    if p.is_file() and p.stat().st_size < 4_000_000:
                        places[str(p)] = p.read_text(errors="replace")
                except OSError:
                    pass
    results: list[str | None] = []
    for name, secret in values.items():
        found = [where for where, text in places.items() if secret in text]
        results.append(f"{name} found in {found}" if found else None)
    assert "`connection.privateKeyPassword` is wrong" in strip_ansi(failed.stdout + failed.stderr)
    record("secrets", "secrets in `stack export`, CLI output with engine logs (-v=3), errors, files on the deployer",
           "0 occurrences", results, f"{len(values)} secret inputs through up, refresh and a failing up; "
           f"{len(places)} places searched")


# -- 10. the host key changed --------------------------------------------------------------------


def test_a_changed_host_key_is_refused(project: PulumiProject, new_host: HostFactory) -> None:
    results: list[str | None] = []
    for key_type in ("ed25519", "ecdsa"):
        host = new_host()
        program(project, {"web": machine(host, "web")})
        project.run("stack", "init", key_type)
        project.up()  # pins the ed25519 key
        in_host(host, "sh", "-c", "rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub")
        in_host(host, "ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", "/etc/ssh/ssh_host_ed25519_key")
        in_host(host, "sh", "-c", 'kill "$(cat /run/sshd.pid)"')
        labctl.boot(host)
        refresh = project.run("refresh", "--yes", "--skip-preview", check=False)
        out = strip_ansi(refresh.stdout + refresh.stderr)
        seen = {"ed25519": "(ssh-ed25519)", "ecdsa": "(ecdsa-sha2-nistp256)"}[key_type]
        ok = refresh.returncode != 0 and "host key mismatch" in out and seen in out and "Connection lost" not in out
        results.append(None if ok else f"{key_type}: {out[-600:]}")
    record("hostkey", "the host key changed (same type, another type)", "refused, naming the mismatch", results)



# -- 11. a wedged host in a fleet (issue 24) -------------------------------------------------------


@contextmanager
def wedged(host: labctl.LabHost) -> Iterator[None]:
    """sshd stopped as a hung machine's is: the kernel still accepts connections; nothing answers."""
    in_host(host, "sh", "-c", 'kill -STOP "$(cat /run/sshd.pid)"')
    try:
        yield
    finally:
        in_host(host, "sh", "-c", 'kill -CONT "$(cat /run/sshd.pid)"')


def test_a_wedged_host_costs_only_its_machine(project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    hosts = [new_host() for _ in range(3)]
    timeout, retries = 4, 1
    bound = (retries + 1) * timeout + 0.5  # each attempt one connectTimeout, then 0.5 s of backoff

    def fleet(config: str) -> dict[str, Any]:
        return {f"m{i}": {**machine(h, config), "properties": {
            **machine(h, config)["properties"],
            "connection": {**connection(h), "connectTimeout": timeout, "retries": retries}}}
            for i, h in enumerate(hosts)}

    program(project, fleet("web"))
    project.run("stack", "init", "dev")
    project.up()
    results: list[str | None] = []
    slowest = 0.0
    configs = ["web-v2", "web"]
    for r in range(runs(5, 1)):
        stuck, declared = hosts[r % 3], configs[r % 2]
        before = current_system(stuck)
        program(project, fleet(declared))
        with wedged(stuck):
            started = time.monotonic()
            up = project.up(check=False)
            took = time.monotonic() - started
        slowest = max(slowest, took)
        out = strip_ansi(up.stdout + up.stderr)
        said = (f"cannot connect to root@{stuck.address}:{stuck.port}: timed out during the SSH banner and key "
                f"exchange (connectTimeout {timeout} s, {retries + 1} attempts)")
        others = [current_system(h) for h in hosts if h is not stuck]
        refresh = strip_ansi(project.run("refresh", "--yes", "--skip-preview").stdout)
        problems = [what for what, bad in [
            ("up succeeded", up.returncode == 0), ("no error naming the host and the phase", said not in out),
            (f"took {took:.1f} s", took > bound + 15), ("another machine was not deployed", others != [systems[declared]] * 2),
            ("the wedged host changed", current_system(stuck) != before), ("refresh found a change", "updated" in refresh)]
            if bad]
        results.append(f"run {r}: {', '.join(problems)}:\n{out[-800:]}" if problems else None)
        project.up()  # the wedged machine catches up
    record("wedged", "a wedged host (sshd accepts connections, never answers) in a fleet of 3",
           f"its machine fails, naming the host and the phase, within (retries + 1) × connectTimeout + backoff "
           f"({bound:g} s) plus the CLI's time; the others deploy; refresh agrees", results,
           f"slowest `pulumi up`: {slowest:.1f} s (connectTimeout {timeout} s, retries {retries})")


# -- 12. a machine that moves, to a host that cannot be reached or is not the one pinned (issue 24) --


def test_a_failed_move_leaves_the_old_host(project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    a, b = new_host(), new_host()
    program(project, {"web": machine(a, "web")})
    project.run("stack", "init", "dev")
    project.up()
    results: list[str | None] = []
    here, there = a, b
    for r in range(runs(5, 1)):
        at_here = machine(here, "web")
        before = project.resource("NixosMachine")
        link = system_link(here)
        attempts = {
            "a typo": {**connection(here), "host": f"127.0.{LAB_NET + 9}.251"},
            "another host key": {**connection(there), "hostKey": here.hostKey},
        }
        problems = []
        for what, conn in attempts.items():
            program(project, {"web": {**at_here, "properties": {**at_here["properties"], "connection": conn}}})
            if project.up(check=False).returncode == 0:
                problems.append(f"{what}: up succeeded")
        after = project.resource("NixosMachine")
        if (current_system(here), system_link(here)) != (systems["web"], link):
            problems.append(f"the old host changed: runs {current_system(here)}, {system_link(here)}")
        if without_ciphertexts(after["outputs"]) != without_ciphertexts(before["outputs"]) or "pendingReplacement" in after:
            problems.append("the state changed")
        program(project, {"web": at_here})
        if project.run("preview", "--expect-no-changes", check=False).returncode != 0:
            problems.append("the program as it was plans a change")
        program(project, {"web": machine(there, "web")})
        moved = strip_ansi(project.up(check=False).stdout)
        if current_system(there) != systems["web"] or "created replacement" not in moved:
            problems.append(f"the move failed:\n{moved[-800:]}")
        results.append(f"run {r}: {'; '.join(problems)}" if problems else None)
        here, there = there, here
    record("move", "a machine moves to a host that cannot be reached, or shows another key than the pinned one",
           "the old host keeps its system and generation; state unchanged; the program as it was plans nothing; "
           "a move to a good host then succeeds", results)


# -- 13. the machine reboots during activation (issue 24) --------------------------------------------


def test_a_reboot_during_activation(project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    if (why := labctl.systemd_unavailable()) is not None:
        pytest.skip(why)
    host = new_host("systemd")
    results: list[str | None] = []
    slowest = 0.0
    for r in range(runs(5, 1)):
        try:
            took = reboot_during_activation(project, host, systems)
            slowest = max(slowest, float(took.split()[0]))
            results.append(None)
        except AssertionError as e:
            results.append(f"run {r}: {str(e)[-1500:]}")
    record("reboot", "the machine restarts 3 s into a 20 s activation (systemd host; it boots the new system)",
           "noticed when the host answers again; rolled back to the confirmed generation, the new one removed; "
           "the error says so and what runs; state and refresh agree with the host", results,
           f"slowest: {slowest:.0f} s from the restart to the end of `pulumi up` (the lab's boot runs the new system's "
           "20 s activation)")


# -- 14. the deployer stalls while the generation is registered (issue 24) ---------------------------

SLOW_REGISTRATION = 35  # seconds: longer than the supervisor waits for a silent deployer (30)


@contextmanager
def slow_registration(host: labctl.LabHost) -> Iterator[None]:
    """`nix-env --set` on this host takes SLOW_REGISTRATION seconds (and says so in /run/registering), whoever runs
    it: a nix-env in front of the real one, bind-mounted over /usr/local/bin in this host's mount namespace only
    (made a slave first, so nothing propagates back to the machine)."""
    wrapper = (f"#!/bin/sh\ncase \" $* \" in *\" --set \"*) touch /run/registering; sleep {SLOW_REGISTRATION}; "
               "rm -f /run/registering ;; esac\nexec /usr/bin/nix-env \"$@\"\n")
    subprocess.run(labctl.nsenter(host.state, [
        "sh", "-c", "mkdir -p /run/slow-bin && cat > /run/slow-bin/nix-env && chmod 755 /run/slow-bin/nix-env "
        "&& mount --make-rslave / && mount --bind /run/slow-bin /usr/local/bin"]), input=wrapper, text=True, check=True)
    try:
        yield
    finally:
        in_host(host, "umount", "/usr/local/bin", check=False)


def agreement(project: PulumiProject, host: labctl.LabHost) -> tuple[str, str, object]:
    """(the profile's generation, /run/current-system, the state's systemPath)."""
    profile = in_host(host, "readlink", "-e", "/nix/var/nix/profiles/system").stdout.strip()
    outputs = project.resource("NixosMachine")["outputs"]
    return profile, current_system(host), outputs["systemPath"]  # type: ignore[index]


def test_a_deployer_that_stalls_during_registration(project: PulumiProject, new_host: HostFactory,
                                                     systems: Systems) -> None:
    host = new_host()
    program(project, {"web": machine(host, "web", confirmTimeout=5)})
    project.run("stack", "init", "dev")
    project.up()
    results: list[str | None] = []
    with slow_registration(host):
        for r in range(runs(3, 1)):
            program(project, {"web": machine(host, "web-v2", confirmTimeout=5)})
            up = subprocess.Popen(["pulumi", "--non-interactive", "up", "--yes", "--skip-preview"], cwd=project.dir,
                                  env=project.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
            deadline = time.monotonic() + 120
            while in_host(host, "test", "-e", "/run/registering", check=False).returncode != 0:
                assert up.poll() is None and time.monotonic() < deadline, "registration never started"
                time.sleep(0.2)
            # The deployer stops answering (a laptop lid, a stalled CI runner) while nix-env makes the generation.
            providers = [pid for pid in descendants(up.pid) if is_provider(pid)]
            for pid in providers:
                os.kill(pid, signal.SIGSTOP)
            deadline = time.monotonic() + SLOW_REGISTRATION + 60
            while not supervisor_state(host).startswith(("rolled-back", "failed", "done")):
                assert time.monotonic() < deadline, f"the supervisor is still {supervisor_state(host)!r}"
                time.sleep(0.5)
            time.sleep(1)
            for pid in providers:
                os.kill(pid, signal.SIGCONT)
            out, _ = up.communicate(timeout=180)
            profile, running, recorded = agreement(project, host)
            ok = (up.returncode != 0 and profile == running == recorded == systems["web"]
                  and in_host(host, "test", "-e", "/run/registering", check=False).returncode != 0)
            results.append(None if ok else f"run {r}: profile {profile}, running {running}, state {recorded}, "
                                           f"up exit {up.returncode}:\n{strip_ansi(out)[-1000:]}")
            program(project, {"web": machine(host, "web", confirmTimeout=5)})
            project.run("refresh", "--yes", "--skip-preview")
    record("registration", f"the deployer stops (SIGSTOP) while nix-env registers the generation ({SLOW_REGISTRATION} s, "
           "longer than the supervisor waits for a silent deployer)",
           "the profile, /run/current-system and the state agree, on the old system", results)


# -- 15. a health check fails with autoRollback: false, in a fleet (issue 24) ------------------------------------


def named_state(project: PulumiProject, name: str) -> dict[str, Any]:
    """The state of the NixosMachine called name."""
    return next(r for r in project.state()["deployment"]["resources"]  # type: ignore[index]
                if r["urn"].endswith(f"NixosMachine::{name}"))


def test_a_failed_health_check_without_auto_rollback(project: PulumiProject, new_host: HostFactory,
                                                     systems: Systems) -> None:
    """The failing machine keeps the new system, as the setting asks; its state says so. Pulumi keeps the inputs of
    the last successful update after a failed one (pulumi#2035), so refresh proposes that machine's `systemPath`
    and nothing else, until the next successful up (README, Refresh and import)."""
    hosts = [new_host() for _ in range(3)]
    failing = {"command": "test -e /run/healthy"}  # true once the test creates it

    def fleet(config: str, checked: int | None) -> dict[str, Any]:
        return {f"m{i}": machine(h, config, autoRollback=False, **({"healthChecks": [failing]} if i == checked else {}))
                for i, h in enumerate(hosts)}

    program(project, fleet("web", None))
    project.run("stack", "init", "dev")
    project.up()
    results: list[str | None] = []
    configs = ["web-v2", "web"]
    for r in range(runs(5, 1)):
        index, declared = r % 3, configs[r % 2]
        sick = hosts[index]
        generation = int(named_state(project, f"m{index}")["outputs"]["generation"])
        program(project, fleet(declared, index))
        up = project.up(check=False)
        out = " ".join(strip_ansi(up.stdout + up.stderr).split())
        outputs = named_state(project, f"m{index}")["outputs"]
        refresh = strip_ansi(project.run("refresh", "--yes", "--diff", "--expect-no-changes", check=False).stdout)
        proposed = set(re.findall(r"^\s+~ (\w+): ", refresh, re.M))
        machines = set(re.findall(r"NixosMachine::(m\d)\]", refresh))
        problems = [what for what, bad in [
            ("up succeeded", up.returncode == 0),
            ("the error does not say what runs", f"autoRollback is off, so generation {generation + 1} "
                                                 f"({systems[declared]}) stays active on" not in out),
            ("the machine was rolled back", current_system(sick) != systems[declared]),
            (f"the state says {outputs['systemPath']} at generation {outputs['generation']}",
             (outputs["systemPath"], outputs["generation"]) != (systems[declared], generation + 1)),
            ("another machine was not deployed", [current_system(h) for h in hosts if h is not sick]
             != [systems[declared]] * 2),
            (f"refresh proposed {proposed} on {machines}", (proposed, machines) != ({"systemPath"}, {f"m{index}"})),
        ] if bad]
        in_host(sick, "touch", "/run/healthy")
        program(project, fleet(declared, None))
        project.up()
        if project.run("refresh", "--yes", "--expect-no-changes", check=False).returncode != 0:
            problems.append("refresh still proposes a change after the next successful up")
        in_host(sick, "rm", "-f", "/run/healthy")
        results.append(f"run {r}: {'; '.join(problems)}:\n{out[-800:]}" if problems else None)
    record("partial", "a health check fails with `autoRollback: false`, in a fleet of 3",
           "the machine keeps the new system and its state says so (system, generation, the error); the others "
           "deploy; refresh proposes only that machine's `systemPath` (Pulumi keeps the old inputs) and nothing "
           "after the next successful up", results)
