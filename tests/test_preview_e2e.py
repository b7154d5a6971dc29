"""Preview tells what will change on each machine: package versions, closure size, units to restart."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import HostFactory, PulumiProject, current_system, write_flake
from test_provider_e2e import connection, program, strip_ansi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.before = lab.nixosConfiguration { version = "1"; packages = [
    { name = "nginx"; version = "1.24.0"; size = 65536; }
    { name = "openssl"; version = "3.0.13"; size = 131072; }
    { name = "lab-tools"; size = 2048; } ]; };
  nixosConfigurations.after = lab.nixosConfiguration { version = "2"; service.nonce = "@NONCE@"; packages = [
    { name = "nginx"; version = "1.26.1"; size = 65536; }
    { name = "openssl"; version = "3.0.13"; size = 262144; }
    { name = "redis"; version = "7.2.4"; size = 32768; } ]; };
}; }"""


def test_preview_shows_package_changes_size_and_units_per_machine(
        project: PulumiProject, new_host: HostFactory, tmp_path: Path) -> None:
    # A new system every run, so the preview really has to build it.
    flake = write_flake(tmp_path / "flake", FLAKE.replace("@NONCE@", uuid.uuid4().hex))
    changing, steady = new_host(), new_host()

    def prog(config: str) -> None:
        program(project, {
            "changing": {"type": "nixos:NixosMachine", "properties": {
                "connection": connection(changing), "flake": f"{flake}#{config}",
                "buildOnPreview": True, "dryActivate": True}},
            "steady": {"type": "nixos:NixosMachine", "properties": {
                "connection": connection(steady), "flake": f"{flake}#before"}},
        })

    prog("before")
    project.run("stack", "init", "dev")
    project.up()
    before_path = current_system(changing)
    # Forget the new system locally: preview must build it (buildOnPreview) and say so.
    prog("after")
    # (`pulumi preview --diff` shows the property diff; plain preview shows the diagnostics.)
    preview = strip_ansi(project.run("preview").stdout)
    assert "for the preview (buildOnPreview)" in preview
    section = preview.split("nixos:index:NixosMachine (changing)")[1].split("nixos:index:NixosMachine (steady)")[0] \
        if "nixos:index:NixosMachine (steady)" in preview.split("nixos:index:NixosMachine (changing)")[1] \
        else preview.split("nixos:index:NixosMachine (changing)")[1]
    assert "nginx: 1.24.0 → 1.26.1" in section
    assert re.search(r"openssl: 3\.0\.13 → 3\.0\.13 \(\+128\.\d KiB\)", section)
    assert "+ redis-7.2.4" in section and "- lab-tools" in section
    assert re.search(r"1 version change|2 version changes", section) and "paths to push" in section
    assert "would restart: lab-service.service" in section
    assert "(steady)" not in preview or "nginx" not in preview.split("(steady)")[-1]
    assert current_system(changing) == before_path  # preview changed nothing
    # Written for people: no raw JSON, and each progress line once.
    assert '{"' not in preview and "pendingChanges" not in preview, preview
    progress = [line for line in preview.splitlines() if "(changing)" not in line and "changing update" in line]
    assert all(a != b for a, b in itertools.pairwise(progress)), progress

    # The same, structured, for programs: the previewed update's `pendingChanges` output, in Pulumi's streaming
    # JSON (a plain `--json` digest leaves a preview's outputs out).
    events = [json.loads(line) for line in project.run(
        "preview", "--json", env={"PULUMI_ENABLE_STREAMING_JSON_PREVIEW": "1"}).stdout.splitlines()]
    outputs = {e["resOutputsEvent"]["metadata"]["urn"].rsplit("::", 1)[1]: e["resOutputsEvent"]["metadata"]["new"]
               .get("outputs", {}) for e in events if "resOutputsEvent" in e
               and e["resOutputsEvent"]["metadata"]["type"] == "nixos:index:NixosMachine"}
    pending = outputs["changing"]["pendingChanges"]
    assert outputs["steady"].get("pendingChanges") is None
    diagnostics = [e["diagnosticEvent"] for e in events if "diagnosticEvent" in e]
    assert not [d for d in diagnostics if d.get("urn", "").endswith("::steady")]
    assert not [d for d in diagnostics if '{"' in d["message"]]
    assert {c["name"]: (c["before"], c["after"]) for c in pending["changed"]}["nginx"] == (["1.24.0"], ["1.26.1"])
    assert pending["added"] == ["redis-7.2.4"] and pending["removed"] == ["lab-tools"]
    assert pending["sizeAfter"] - pending["sizeBefore"] > 0
    assert pending["wouldRestart"] == ["lab-service.service"]

    # Cross-check against Nix's own diff-closures (text output on Nix 2.8).
    after_path = pending["systemPathAfter"]
    nix = subprocess.run(["nix", "--extra-experimental-features", "nix-command", "store", "diff-closures",
                          before_path, after_path], capture_output=True, text=True, check=True).stdout
    nix_changed = {line.split(":")[0].strip() for line in strip_ansi(nix).splitlines() if ":" in line}

    def nix_style(name: str) -> str:
        # diff-closures folds a trailing `-<letters>` into an output name (lab-tools -> lab).
        return re.sub(r"-[a-z]+$", "", name)

    ours = {c["name"] for c in pending["changed"]}
    ours |= {re.sub(r"-[0-9].*$", "", a) for a in pending["added"]} | set(pending["removed"])
    assert {nix_style(n) for n in ours} == nix_changed - {"nixos-system-lab"}, (ours, nix)

    project.up()
    last = next(r for r in project.state()["deployment"]["resources"]  # type: ignore[index]
                if r["urn"].endswith("::changing"))
    assert last["outputs"]["lastChanges"]["added"] == ["redis-7.2.4"]
    assert "pendingChanges" not in last["outputs"]
