"""A fleet through the real `pulumi` CLI: each machine evaluated once, ahead of its Check; one build per flake."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import HostFactory, PulumiProject, current_system, write_flake
from test_provider_e2e import connection, program

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
MACHINES = 6


def recording_nix(tmp_path: Path, stamped: bool = False) -> tuple[Path, Path]:
    """A Nix installation whose `nix` logs each command line before running the real one (stamped: after the
    time it started, in seconds since the epoch)."""
    real_nix = shutil.which("nix")
    real_store = shutil.which("nix-store")
    assert real_nix and real_store
    bindir = tmp_path / "nix" / "bin"
    bindir.mkdir(parents=True)
    log = tmp_path / "nix-calls"
    line = '"$EPOCHREALTIME $*"' if stamped else '"$*"'
    (bindir / "nix").write_text(f'#!/bin/bash\nprintf "%s\\n" {line} >> {log}\nexec -a nix {real_nix} "$@"\n')
    (bindir / "nix").chmod(0o755)
    (bindir / "nix-store").symlink_to(real_store)
    return bindir / "nix", log


def subcommands(log: Path) -> list[str]:
    """The nix subcommand of each logged call (eval, build, path-info, ...)."""
    if not log.exists():
        return []
    words = {"eval", "build", "path-info", "--version"}
    return [next((w for w in line.split() if w in words), "?") for line in log.read_text().splitlines()]


def test_machines_of_one_flake_are_evaluated_once_each_and_share_one_build(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path) -> None:
    configs = "\n".join(
        f'nixosConfigurations.m{i} = lab.nixosConfiguration {{ hostName = "m{i}"; version = "fleet-{i}";'
        f' packages = [ {{ name = "tool{i}"; version = "1.{i}"; size = 1024; }} ]; }};'
        for i in range(MACHINES))
    flake = write_flake(tmp_path / "fleet", f"{{ outputs = {{ self }}: let lab = import ./lib.nix; in {{\n{configs}\n}}; }}")
    nix, log = recording_nix(tmp_path)
    hosts = [new_host() for _ in range(MACHINES)]
    resources: dict[str, Any] = {"nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(nix)]}}}
    for i, host in enumerate(hosts):
        resources[f"m{i}"] = {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"},
                              "properties": {"connection": connection(host), "flake": f"{flake}#m{i}"}}
    program(project, resources, {f"m{i}": f"${{m{i}.systemPath}}" for i in range(MACHINES)})
    project.run("stack", "init", "dev")

    # Check: one `nix eval` per machine (the first Check's guesses run ahead of the next Checks), plus the
    # list of the flake's configurations that the guesses come from.
    project.run("preview")
    evaluated = [line for line in log.read_text().splitlines() if " eval " in line and ".toplevel" in line]
    assert len(evaluated) == MACHINES, log.read_text()
    assert all(sum(f"nixosConfigurations.m{i}." in line for line in evaluated) == 1 for i in range(MACHINES))
    assert "build" not in subcommands(log)

    # The flake did not change: `up` evaluates nothing again (its Checks are answered from the results kept).
    log.unlink()
    project.up()
    calls = subcommands(log)
    assert calls.count("eval") == 0, log.read_text()
    # Create: the toplevels requested within a second share one nix build.
    # The engine dispatches the creates one after another, so a busy machine
    # may split them in two; never one build per machine.
    assert 1 <= calls.count("build") <= 2, log.read_text()
    outputs = project.outputs()
    for i, host in enumerate(hosts):
        assert str(outputs[f"m{i}"]).endswith(f"-nixos-system-m{i}-24.05.lab-fleet-{i}")
        assert current_system(host) == outputs[f"m{i}"]

    # A refresh checks nothing: though the flake changed and this project's plan is remembered, no evaluation
    # begins (the provider begins the plan at its start only for a command that checks).
    with open(Path(flake.removeprefix("path:")) / "flake.nix", "a") as f:
        f.write("# changed\n")
    log.unlink()
    project.run("refresh", "--yes")
    assert "eval" not in subcommands(log), log.read_text()


def test_one_broken_configuration_fails_only_its_machine(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path) -> None:
    """Each machine is evaluated alone, so the error lands on the broken one."""
    flake = write_flake(tmp_path / "fleet", """{ outputs = { self }: let lab = import ./lib.nix; in {
      nixosConfigurations.good = lab.nixosConfiguration { hostName = "good"; version = "good"; };
      nixosConfigurations.broken = lab.nixosConfiguration { hostName = "broken"; version = throw "broken on purpose"; };
    }; }""")
    good, bad = new_host(), new_host()
    program(project, {
        "good": {"type": "nixos:NixosMachine", "properties": {"connection": connection(good), "flake": f"{flake}#good"}},
        "bad": {"type": "nixos:NixosMachine", "properties": {"connection": connection(bad), "flake": f"{flake}#broken"}},
    })
    project.run("stack", "init", "dev")
    res = project.run("preview", check=False)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "broken on purpose" in out
    assert "Traceback" not in out
    assert "resource 'bad' has a problem" in out or "NixosMachine (bad)" in out
    assert "resource 'good'" not in out


def test_max_parallel_transfers_from_the_stack_config_bounds_the_copies(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path) -> None:
    # Set with `pulumi config set`, the setting arrives as text: it is taken
    # as the number it says. At most one machine copies its closure at a time.
    configs = "\n".join(
        f'nixosConfigurations.c{i} = lab.nixosConfiguration {{ hostName = "c{i}"; version = "copy-{i}";'
        f' packages = [ {{ name = "blob{i}"; version = "1.0"; size = 4194304; }} ]; }};' for i in range(3))
    flake = write_flake(tmp_path / "copies", f"{{ outputs = {{ self }}: let lab = import ./lib.nix; in {{\n{configs}\n}}; }}")
    hosts = [new_host() for _ in range(3)]
    program(project, {f"c{i}": {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"{flake}#c{i}"}} for i, host in enumerate(hosts)})
    project.run("stack", "init", "dev")
    project.run("config", "set", "nixos:maxParallelTransfers", "1")
    timeline = tmp_path / "timeline.jsonl"
    project.env["PULUMI_NIXOS_TIMELINE"] = str(timeline)
    project.up()
    pushes = sorted((float(x["start"]), float(x["end"])) for x in map(json.loads, timeline.read_text().splitlines())
                    if x["step"] == "push")
    assert len(pushes) == 3, timeline.read_text()
    for (_, first_end), (second_start, _) in itertools.pairwise(pushes):
        assert second_start >= first_end - 0.01, f"two copies overlapped: {pushes}"
    for i, host in enumerate(hosts):
        assert current_system(host).endswith(f"-nixos-system-c{i}-24.05.lab-copy-{i}")

    project.run("config", "set", "nixos:maxParallelTransfers", "0")
    refused = project.run("preview", check=False)
    assert refused.returncode != 0
    assert "maxParallelTransfers" in refused.stdout + refused.stderr
    assert "must be a whole number of at least 1" in refused.stdout + refused.stderr
