"""The programs in examples/, run from a copy through the real `pulumi` CLI against lab hosts."""

from __future__ import annotations

import shutil
from pathlib import Path

import labctl
import pytest
from conftest import REPO, HostFactory, PulumiProject, Systems, current_system, http_version

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


def test_python_stacks_example(project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    src = REPO / "examples" / "python-stacks"
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, project.dir / f.name)
    text = (project.dir / "Pulumi.yaml").read_text()
    text = text.replace("../../.venv", str(REPO / ".venv")).replace("../../provider", str(REPO / "provider"))
    (project.dir / "Pulumi.yaml").write_text(text)
    staging, production = new_host(), new_host()
    for stack, host, release in (("staging", staging, "web-v2"), ("production", production, "web")):
        project.run("stack", "init", stack)
        project.run("config", "set", "host", host.address)
        project.run("config", "set", "flake", str(REPO / "tests" / "lab"))
        project.run("config", "set", "--secret", "privateKey", "--", Path(host.privateKeyPath).read_text())
        project.up()
        assert project.outputs()["systemPath"] == systems[release] == current_system(host)
    key_line = Path(staging.privateKeyPath).read_text().splitlines()[1]
    assert key_line not in (project.dir / "Pulumi.staging.yaml").read_text()
    assert key_line not in project.run("stack", "export").stdout
