"""The programs in examples/, run from a copy through the real `pulumi` CLI against lab hosts."""

from __future__ import annotations

import shutil

import labctl
import pytest
from conftest import REPO, PulumiProject, Systems, current_system, http_version

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
EXAMPLES = REPO / "examples"


def copy_example(name: str, project: PulumiProject) -> None:
    """Copy an example into the project directory, pointing its provider path at this checkout."""
    shutil.copytree(EXAMPLES / name, project.dir, dirs_exist_ok=True)
    manifest = project.dir / "Pulumi.yaml"
    text = manifest.read_text()
    assert "path: ../../provider" in text
    manifest.write_text(text.replace("path: ../../provider", f"path: {REPO / 'provider'}"))


def test_yaml_single_host(project: PulumiProject, lab_host: labctl.LabHost, systems: Systems) -> None:
    copy_example("yaml-single-host", project)
    project.run("stack", "init", "dev")
    for key, value in {"host": lab_host.address, "port": str(lab_host.port), "keyPath": lab_host.privateKeyPath,
                       "flake": f"path:{labctl.LAB_FLAKE}#web",
                       "healthUrl": f"http://{lab_host.address}:{lab_host.httpPort}/"}.items():
        project.run("config", "set", key, value)
    project.up()
    outputs = project.outputs()
    assert outputs["systemPath"] == systems["web"] == current_system(lab_host)
    assert outputs["generation"] == 2 and outputs["baselineGeneration"] == 1
    assert http_version(lab_host) == "1"
    project.run("destroy", "--yes", "--skip-preview")
    assert current_system(lab_host) == systems["base"]
