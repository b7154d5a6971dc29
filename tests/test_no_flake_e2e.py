"""Machines without a flake, through the real `pulumi` CLI: a `configuration.nix` with `nixpkgs`, or an
`attribute` of an `expression` file (issue #26, part 4).

- Deployed on lab hosts: the lab's stand-in nixpkgs (tests/lab/nixpkgs) has a `nixos` folder that evaluates a
  configuration.nix into a lab system, called with the same arguments as the real one.
- Evaluated on the leg's real nixpkgs (20.09 on Nix 2.8, the nixos-unstable of early 2026 on 2.26 and 2.34): the
  system path Nix itself gives, nothing built, and the module system's errors under the property that names the
  file. Real NixOS cannot be built here.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import realnixos
from conftest import HostFactory, PulumiProject, current_system, http_version
from test_fleet_e2e import recording_nix
from test_provider_e2e import connection, program, strip_ansi
from test_real_nixos_e2e import is_valid, nix_calls, preview_inputs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
LAB_NIXPKGS = Path(__file__).parent / "lab" / "nixpkgs"


def nix_eval(*args: str) -> dict[str, str]:
    """What `nix eval` itself says of a system (the baseline a user would run by hand)."""
    out = subprocess.run(["nix", "eval", "--json", *args, "--apply", "x: { out = x.outPath; drv = x.drvPath; }"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def evaluations(log: Path) -> int:
    """The logged `nix eval` calls of a system without a flake."""
    return sum(1 for line in log.read_text().splitlines()
               if " eval " in f" {line} " and " --file " in line) if log.exists() else 0


def test_a_configuration_nix_and_an_expression_attribute_deploy_like_a_flake(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path) -> None:
    host = new_host()
    nix, log = recording_nix(tmp_path)
    work = project.dir / "machines"
    work.mkdir()
    # Relative paths start at the project's folder.
    (work / "configuration.nix").write_text(
        '{ pkgs, ... }: { hostName = "web"; version = "classic"; packages = [ pkgs.nginx pkgs.openssl ]; }\n')
    (work / "default.nix").write_text(
        # A function with defaults, as `nixos-rebuild --file` calls it; `<nixpkgs>` is the `nixpkgs` input.
        '{ pkgs ? import <nixpkgs> { } }: {\n'
        '  machines.web = pkgs.lab.nixosConfiguration {\n'
        '    hostName = "web"; version = "expr";\n'
        # A package of this run's own, so the new system was never built before (the store outlives a run).
        f'    packages = [ pkgs.nginx {{ name = "stamp"; version = "{time.time_ns()}"; size = 16; }} ];\n'
        '  };\n}\n')
    provider = {"nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(nix)]}}}
    nixpkgs = str(LAB_NIXPKGS)

    def web(**source: Any) -> dict[str, Any]:
        return {**provider, "web": {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"},
                                    "properties": {"connection": connection(host), **source}}}

    program(project, web(configuration="machines/configuration.nix", nixpkgs=nixpkgs),
            {"systemPath": "${web.systemPath}", "generation": "${web.generation}"})
    classic = nix_eval("--file", f"{nixpkgs}/nixos", "--argstr", "configuration", str(work / "configuration.nix"),
                       "config.system.build.toplevel")
    project.run("stack", "init", "dev")
    project.up()
    assert project.outputs()["systemPath"] == classic["out"] == current_system(host)
    assert project.outputs()["generation"] == 2
    assert http_version(host) == "classic"
    assert project.resource("NixosMachine")["outputs"]["systemDerivation"] == classic["drv"]

    # Nothing tells what a configuration without a flake reads: each preview evaluates it again, and an unchanged
    # system is no change.
    log.unlink(missing_ok=True)
    preview = project.run("preview", "--expect-no-changes")
    assert evaluations(log) == 1, log.read_text()
    assert nix_calls(log, "build") == 0 and "Traceback" not in preview.stdout

    # The same machine from an attribute of a Nix file, which reads `<nixpkgs>`.
    program(project, web(expression="machines", attribute="machines.web", nixpkgs=nixpkgs),
            {"systemPath": "${web.systemPath}", "generation": "${web.generation}"})
    expr = nix_eval("--file", str(work / "default.nix"), "-I", f"nixpkgs={nixpkgs}",
                    "machines.web.config.system.build.toplevel")
    previewed = preview_inputs(project)
    assert previewed["web"]["systemPath"] == expr["out"]
    # The package diff, from the recorded derivation and the new one, with nothing built.
    shown = strip_ansi(project.run("preview").stdout)
    assert "  - openssl-3.0.13" in shown and "  + stamp-" in shown, shown
    assert "(from the derivations, nothing built" in shown, shown
    assert not is_valid(expr["out"])
    assert current_system(host) == classic["out"]  # preview changed nothing
    project.up()
    assert project.outputs()["systemPath"] == expr["out"] == current_system(host)
    assert project.outputs()["generation"] == 3 and http_version(host) == "expr"


def test_check_names_the_property_of_a_system_without_a_flake(project: PulumiProject, tmp_path: Path) -> None:
    (tmp_path / "configuration.nix").write_text("{ ... }: { }\n")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"configuration": str(tmp_path / "configuration.nix")}, "nixpkgs", "is required with `configuration`"),
        ({"configuration": str(tmp_path / "missing.nix"), "nixpkgs": str(LAB_NIXPKGS)}, "configuration",
         f"{tmp_path}/missing.nix does not exist"),
        ({"configuration": str(tmp_path / "configuration.nix"), "nixpkgs": str(tmp_path)}, "nixpkgs",
         f"{tmp_path} is not a nixpkgs tree: it has no nixos/default.nix"),
        ({"expression": str(tmp_path / "configuration.nix")}, "attribute", "is required with `expression`"),
        ({"expression": str(tmp_path / "configuration.nix"), "attribute": "--impure"}, "attribute",
         "is not an attribute path"),
        ({"flake": ".#web", "configuration": str(tmp_path / "configuration.nix"), "nixpkgs": str(LAB_NIXPKGS)},
         "configuration", "set exactly one of `flake`, `systemPath`, `configuration` and `expression`, not both "
                          "`flake` and `configuration`"),
        ({"flake": ".#web", "attribute": "web"}, "attribute", "goes with `expression` only"),
    ]
    for i, (props, prop, reason) in enumerate(cases):
        program(project, {"web": {"type": "nixos:NixosMachine", "properties": {
            "connection": {"host": "127.0.99.1", "password": "unused"}, **props}}})
        if i == 0:
            project.run("stack", "init", "dev")
        res = project.run("preview", check=False)
        out = strip_ansi(res.stdout + res.stderr)
        assert res.returncode != 0, out
        assert re.search(rf"property {re.escape(prop)} value .*? has a problem: .*{re.escape(reason)}", out), out
        assert "Traceback" not in out


@pytest.fixture(scope="module")
def real_nixpkgs() -> Path:
    tree = realnixos.find_nixpkgs_tree()
    if tree is None:
        pytest.skip(realnixos.HOW)
    return tree


def test_real_configuration_nix_previews_its_system_and_its_errors_with_nothing_built(
        project: PulumiProject, tmp_path: Path, real_nixpkgs: Path) -> None:
    nix, log = recording_nix(tmp_path)
    good, bad = realnixos.write_configuration(tmp_path / "good", real_nixpkgs), \
        realnixos.write_configuration(tmp_path / "bad", real_nixpkgs, "services.nginx.enabel = true;")
    provider = {"nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(nix)]}}}
    program(project, {**provider, "web": {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"},
                                          "properties": {"connection": {"host": "127.0.99.1", "password": "unused"},
                                                         "configuration": "${configuration}",
                                                         "nixpkgs": str(real_nixpkgs)}}},
            config={"configuration": {"type": "string"}})
    project.run("stack", "init", "dev")
    project.run("config", "set", "configuration", str(good))
    expected = nix_eval("--file", f"{real_nixpkgs}/nixos", "--argstr", "configuration", str(good),
                        "config.system.build.toplevel")
    assert preview_inputs(project)["web"]["systemPath"] == expected["out"]
    assert evaluations(log) == 1 and nix_calls(log, "build") == 0, log.read_text()
    assert not is_valid(expected["out"])  # nothing was built

    # The module system's error, in the user's own file, under `configuration`.
    project.run("config", "set", "configuration", str(bad))
    res = project.run("preview", check=False)
    out = strip_ansi(res.stdout + res.stderr)
    problem = next((ln for ln in out.splitlines() if "resource 'web': property configuration value" in ln), "")
    assert res.returncode != 0 and "services.nginx.enabel" in problem and "does not exist" in problem, out
    assert "Traceback" not in out
