"""Real NixOS configurations through the real `pulumi` CLI: what evaluation alone shows.

The flake's machines are `nixpkgs.lib.nixosSystem` configurations of the leg's real nixpkgs (tests/realnixos.py:
20.09 on Nix 2.8, the nixos-unstable of early 2026 on 2.26 and 2.34). They cannot be built here (no bootstrap
binaries, no binary cache), so these tests preview: the system path, how many Nix evaluations a preview makes,
the package diff from derivations with nothing built, and the module system's errors. Each evaluation costs 3 to
10 s here, so each test uses a few configurations; the large counts are in bench/real_fleet.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import realnixos
from conftest import HostFactory, PulumiProject
from test_fleet_e2e import recording_nix
from test_provider_e2e import connection, program, strip_ansi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
TOPLEVEL = re.compile(r"nixosConfigurations\.([\w-]+)\.config\.system\.build\.toplevel")


@pytest.fixture(scope="module")
def flake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    nixpkgs = realnixos.find_nixpkgs()
    if nixpkgs is None:
        pytest.skip(realnixos.HOW)
    return realnixos.write_flake(tmp_path_factory.mktemp("real-nixos") / "flake", machines=2, nixpkgs=nixpkgs)


def evaluated(log: Path) -> list[str]:
    """The configurations the logged `nix eval` calls evaluated, in order (a listing of names is not one)."""
    if not log.exists():
        return []
    return [m.group(1) for line in log.read_text().splitlines()
            if " eval " in f" {line} " and (m := TOPLEVEL.search(line))]


def nix_calls(log: Path, subcommand: str) -> int:
    return sum(1 for line in log.read_text().splitlines() if f" {subcommand} " in f" {line} ") if log.exists() else 0


def is_valid(path: str) -> bool:
    return subprocess.run(["nix-store", "--check-validity", path], capture_output=True).returncode == 0


def preview_inputs(project: PulumiProject, *args: str) -> dict[str, dict[str, Any]]:
    """`pulumi preview --json`: each machine's new inputs, by resource name."""
    return inputs_of(project.run("preview", "--json", *args).stdout)


def inputs_of(preview_json: str) -> dict[str, dict[str, Any]]:
    steps = json.loads(preview_json)["steps"]
    return {s["urn"].rsplit("::", 1)[1]: s["newState"]["inputs"] for s in steps
            if s["urn"].split("::")[2] == "nixos:index:NixosMachine"}


def fleet(project: PulumiProject, nix: Path, flake: Path, names: list[str]) -> None:
    """Machines that do not exist yet (preview connects to none of them), one per configuration."""
    resources: dict[str, Any] = {"nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(nix)]}}}
    for i, name in enumerate(names):
        resources[name] = {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"}, "properties": {
            "connection": {"host": f"127.0.99.{i + 1}", "password": "unused"}, "flake": f"path:{flake}#{name}"}}
    program(project, resources)


def engine_time(stamp: str) -> float:
    """A time in Pulumi's log (RFC 3339 in UTC, to the nanosecond, trailing zeros dropped) in seconds since the
    epoch."""
    whole, _, fraction = stamp.removesuffix("Z").partition(".")
    return datetime.fromisoformat(whole + "+00:00").timestamp() + float(f"0.{fraction or 0}")


def no_evaluation_left(flake: Path) -> bool:
    """No `nix eval` of this flake runs once the preview has returned (evaluations ahead are cancelled)."""
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return not any(" eval " in line and str(flake) in line for line in ps.splitlines())


def test_preview_evaluates_each_real_machine_once_then_never_again_until_the_flake_changes(
        project: PulumiProject, tmp_path: Path, flake: Path) -> None:
    nix, log = recording_nix(tmp_path, stamped=True)
    fleet(project, nix, flake, ["web1", "web2"])
    project.run("stack", "init", "dev")

    first = preview_inputs(project)
    ran = evaluated(log)
    # Each machine once; at most one configuration the stack does not use (the first preview's guess).
    assert ran.count("web1") == 1 and ran.count("web2") == 1, ran
    assert len(ran) <= 3, ran
    assert nix_calls(log, "build") == 0
    assert no_evaluation_left(flake)
    expected = realnixos.evaluate(flake, "web1")
    assert first["web1"]["systemPath"] == expected["out"]
    assert re.search(r"-nixos-system-web2-\d\d\.\d\d", first["web2"]["systemPath"])
    assert not is_valid(expected["out"])  # nothing was built

    # Nothing changed: no evaluation at all, the same answers.
    log.unlink()
    again = preview_inputs(project)
    assert evaluated(log) == [], log.read_text()
    assert {k: v["systemPath"] for k, v in again.items()} == {k: v["systemPath"] for k, v in first.items()}

    # The flake changed: exactly the stack's machines are evaluated again (the stack's plan), no guess. The plan
    # began when Pulumi started the provider in this project: its first Nix call (the flake's fingerprint)
    # came before the engine sent the first Check.
    with open(flake / "flake.nix", "a") as f:
        f.write("# changed\n")
    log.unlink(missing_ok=True)
    result = project.run("preview", "--json", "--logtostderr", "-v=9")
    changed, engine_log = inputs_of(result.stdout), result.stderr
    assert sorted(evaluated(log)) == ["web1", "web2"], log.read_text()
    first_nix_call = float(log.read_text().split(" ", 1)[0])
    first_check = min(engine_time(entry["time"]) for line in engine_log.splitlines() if line.startswith("{")
                      for entry in [json.loads(line)]
                      if re.search(r"\.Check\(urn:.*NixosMachine::web\d\) executing", entry.get("msg", "")))
    assert first_nix_call < first_check, (first_nix_call, first_check, log.read_text())
    assert changed["web1"]["systemPath"] == expected["out"]


def test_preview_shows_package_changes_and_a_reboot_from_derivations_with_nothing_built(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path, flake: Path) -> None:
    host = new_host()
    nix, log = recording_nix(tmp_path)
    provider = {"nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(nix)]}}}
    lab = Path(__file__).parent / "lab"
    program(project, {**provider, "web": {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"},
                                          "properties": {"connection": connection(host), "flake": f"path:{lab}#web"}}})
    project.run("stack", "init", "dev")
    project.up()
    # A real NixOS system cannot be built here: the state is made to say what a deploy of `web1` records.
    state = realnixos.as_deployed(project.state(), flake, "web1", realnixos.evaluate(flake, "web1"))
    (tmp_path / "state.json").write_text(json.dumps(state))
    project.run("stack", "import", "--file", str(tmp_path / "state.json"))

    program(project, {**provider, "web": {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"},
                                          "properties": {"connection": connection(host),
                                                         "flake": f"path:{flake}#web1-next"}}},
            {"needsReboot": "${web.needsReboot}"})
    log.unlink(missing_ok=True)
    # (`preview --diff` shows the property diff; a plain preview shows the diagnostics too.)
    preview = strip_ansi(project.run("preview").stdout)
    assert "(from the derivations, nothing built; build-time dependencies included)" in preview, preview
    assert '{"' not in preview, preview  # written for people
    nginx = re.search(r"nginx: (\S+) → (\S+)", preview)
    assert nginx and nginx.group(1) != nginx.group(2), preview
    assert re.search(r"linux: \S+ → \S+", preview), preview
    assert "needs a reboot to run fully: new kernel, initrd, kernel-modules" in preview
    assert re.search(r"needsReboot\s*:\s*true", preview), preview
    assert nix_calls(log, "build") == 0
    assert evaluated(log).count("web1-next") == 1, log.read_text()
    new = realnixos.evaluate(flake, "web1-next")
    assert not is_valid(new["out"])  # nothing was built


ERRORS = {
    "error-nooption": ["The option `services.nginx.enabel'", "does not exist"],
    "error-assertion": ["Failed assertions:", "does not specify your root file system"],
    "error-type": ["services.openssh.ports", "is not of type `16 bit unsigned integer"],
    "error-throws": ["no domain for this machine", "option `networking.domain`"],
}


def test_module_system_errors_fail_check_on_flake_with_their_cause(
        project: PulumiProject, tmp_path: Path, flake: Path) -> None:
    nix, log = recording_nix(tmp_path)
    program(project, {
        "nixos": {"type": "pulumi:providers:nixos", "properties": {"nixCommand": [str(nix)]}},
        "web": {"type": "nixos:NixosMachine", "options": {"provider": "${nixos}"}, "properties": {
            "connection": {"host": "127.0.99.1", "password": "unused"}, "flake": f"path:{flake}#${{config}}"}},
    }, config={"config": {"type": "string"}})
    project.run("stack", "init", "dev")
    for config, words in ERRORS.items():
        project.run("config", "set", "config", config)
        log.unlink(missing_ok=True)
        res = project.run("preview", check=False)
        out = strip_ansi(res.stdout + res.stderr)
        assert res.returncode != 0
        # A Check failure naming `flake`: "resource 'web': property flake value {...} has a problem: ..."
        problem = next((ln for ln in out.splitlines() if "resource 'web': property flake value" in ln), "")
        assert "has a problem: evaluating" in problem, out
        for word in words:
            assert word in problem, problem
        assert "Traceback" not in out and "…" not in problem and "|" not in problem
        assert "lib/modules.nix" not in problem  # no frames inside nixpkgs
        if config == "error-throws" and not realnixos.nix_version() < (2, 13):
            # In the user's own file (not its copy in the store), with the line the position points into.
            assert re.search(rf"at {re.escape(str(flake))}/flake\.nix:\d+:\d+: `[^`]*networking\.domain = throw",
                             problem), problem
        assert evaluated(log).count(config) == 1, log.read_text()
