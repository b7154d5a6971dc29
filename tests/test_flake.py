"""The project's own flake (flake.nix), evaluated against real nixpkgs.

Nothing can be built here (no binary cache, no bootstrap binaries), so this evaluates what a Nix user's
`nix profile install`, `nix run` and `nix develop` would build: the package's derivation and its Python
dependencies, the app's program, the dev shell. The flake's `nixpkgs` is the nixos-unstable of early 2026
(`../shared/nixpkgs/`), which needs Nix 2.18 or later: the trixie and sid legs.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import realnixos
from conftest import PulumiProject

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "provider" / "pyproject.toml").read_text())["project"]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

# A module the provider imports -> the Python distribution (and nixpkgs attribute) that carries it.
DISTRIBUTION = {"pulumi": "pulumi", "grpc": "grpcio", "google.protobuf": "protobuf",
                "google.rpc": "googleapis-common-protos", "asyncssh": "asyncssh"}

OUTPUTS = """outputs: let
  package = outputs.packages.x86_64-linux.default;
  shell = outputs.devShells.x86_64-linux.default;
in {
  drvPath = package.drvPath;
  name = package.name;
  dependencies = map (p: p.pname) package.dependencies;
  wrapper = package.makeWrapperArgs;
  mainProgram = package.meta.mainProgram;
  out = "${package}";
  app = outputs.apps.x86_64-linux.default;
  shellDrvPath = shell.drvPath;
  shellPackages = map (p: p.name) shell.nativeBuildInputs;
  shellPython = (builtins.head shell.nativeBuildInputs).drvPath;
}"""


def imported_distributions() -> set[str]:
    """The third-party distributions the provider's source imports, read from its `import` statements."""
    found: set[str] = set()
    for source in (REPO / "provider" / "nixos_provider").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                if name.split(".")[0] in sys.stdlib_module_names or name.startswith("nixos_provider"):
                    continue
                key = next((k for k in DISTRIBUTION if name == k or name.startswith(k + ".")), name)
                found.add(DISTRIBUTION.get(key, key))
    return found


def python_inputs(drv: str) -> set[str]:
    """The Python packages a derivation's own derivation file names as inputs (python3.13-NAME-VERSION.drv)."""
    references = subprocess.run(["nix-store", "-q", "--references", drv], capture_output=True, text=True,
                                check=True).stdout.split()
    return {m.group(1) for r in references if (m := re.match(r"/nix/store/[^-]+-python3\.\d+-(.+)-[^-]+\.drv$", r))}


@pytest.fixture(scope="module")
def flake(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The flake's outputs, from a copy of what it reads (a `path:` flake of the checkout would copy .venv too)."""
    if realnixos.nix_version() < (2, 18):
        pytest.skip("the flake follows nixos-unstable, which needs Nix >= 2.18 (the trixie and sid legs)")
    nixpkgs = realnixos.find_nixpkgs()
    if nixpkgs is None:
        pytest.skip(realnixos.HOW)
    copy = tmp_path_factory.mktemp("flake")
    # The flake as a user's flake would take it, with its nixpkgs input pointed at the leg's.
    original = (REPO / "flake.nix").read_text()
    url = 'inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";'
    assert url in original
    (copy / "flake.nix").write_text(original.replace(url, f"inputs.nixpkgs.url = {json.dumps(nixpkgs.url)};"))
    shutil.copy(REPO / "schema.json", copy)
    shutil.copytree(REPO / "provider", copy / "provider",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "pulumi-resource-nixos"))
    expression = f"({OUTPUTS}) (builtins.getFlake {json.dumps(f'path:{copy}')})"
    done = subprocess.run(["nix", "eval", "--json", "--impure", "--expr", expression],
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_the_package_depends_on_exactly_what_the_provider_imports(flake: dict[str, Any]) -> None:
    imported = imported_distributions()
    assert imported == {"pulumi", "grpcio", "protobuf", "googleapis-common-protos", "asyncssh"}
    # bcrypt: asyncssh's optional extra for passphrase-protected OpenSSH keys, as pyproject.toml has it.
    runtime = imported | {"bcrypt"}
    assert sorted(flake["dependencies"]) == sorted(runtime)
    assert {pin.split("==")[0] for pin in PROJECT["dependencies"]} == runtime
    assert flake["name"] == f"pulumi-resource-nixos-{PROJECT['version']}"
    assert python_inputs(flake["drvPath"]) >= runtime


def test_the_app_runs_the_entry_point_the_plugin_archive_runs(flake: dict[str, Any]) -> None:
    assert flake["app"] == {"type": "app", "program": f"{flake['out']}/bin/pulumi-resource-nixos"}
    assert flake["mainProgram"] == "pulumi-resource-nixos"
    assert PROJECT["scripts"]["pulumi-resource-nixos"] == "nixos_provider.__main__:main"
    launcher = (REPO / "provider" / "pulumi-resource-nixos").read_text()
    assert "-m nixos_provider" in launcher and "PULUMI_NIXOS_SCHEMA=" in launcher
    # The wrapper gives the schema the way the archive's launcher does: the checkout's schema.json, in the store.
    flag, variable, schema = flake["wrapper"]
    assert (flag, variable) == ("--set-default", "PULUMI_NIXOS_SCHEMA")
    assert Path(schema).read_bytes() == (REPO / "schema.json").read_bytes()


def test_the_dev_shell_has_python_with_the_test_tools_nix_openssh_and_zstd(flake: dict[str, Any]) -> None:
    names = flake["shellPackages"]
    assert names[0].startswith("python3-") and names[0].endswith("-env")
    for tool in ("ruff", "nix", "openssh", "zstd", "pulumi"):
        assert any(n.startswith(tool + "-") for n in names), (tool, names)
    modules = python_inputs(flake["shellPython"])
    assert {"pytest", "pytest-asyncio", "pytest-timeout", "hypothesis", "mypy"} <= modules, modules
    assert set(flake["dependencies"]) <= modules
    assert flake["shellDrvPath"].endswith("-nix-shell.drv")


def test_pulumi_finds_the_plugin_on_path(project: PulumiProject, tmp_path: Path) -> None:
    """What `nix profile install` gives: `pulumi-resource-nixos` on PATH, which the engine runs (an ambient plugin)
    for a program that names no plugin path and declares no package."""
    bin_dir = tmp_path / "profile" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "pulumi-resource-nixos").symlink_to(project.plugin_dir / "pulumi-resource-nixos")
    (project.dir / "Pulumi.yaml").write_text(json.dumps({"name": "on-path", "runtime": "yaml", "resources": {
        "web": {"type": "nixos:NixosMachine", "properties": {"connection": {"host": "127.0.0.1", "port": 70000},
                                                            "flake": ".#web"}}}}))
    project.run("stack", "init", "dev")
    path = {"PATH": f"{bin_dir}:{project.env['PATH']}"}
    preview = project.run("preview", check=False, env=path)
    assert "connection.port" in preview.stdout and "must be between 1 and 65535, not 70000" in preview.stdout, preview
    # The engine says which one it ran (this checkout's .venv/bin has another, further down PATH).
    assert f"using pulumi-resource-nixos from $PATH at {bin_dir}/pulumi-resource-nixos" in preview.stdout
