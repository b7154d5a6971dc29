"""The generated SDKs: fresh against schema.json, at the provider's version, and each one builds (tsc, go build, Python import)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SDK = REPO / "sdk"
# The SDK toolchains (Go, Node.js, the generator) are built by `make setup`: not the fast tier.
pytestmark = [pytest.mark.timeout(600), pytest.mark.lab]


def run(argv: list[str], cwd: Path, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, text=True, capture_output=True, timeout=timeout, env={**os.environ, **env})
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


# Left behind by `pip install -e sdk/python`, `tsc` and Python itself; never generated.
BUILD_ARTIFACTS = ["build", "bin", "node_modules", "__pycache__", "pulumi_nixos.egg-info"]


def differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b, ignore=BUILD_ARTIFACTS)
    out = [f"only in committed sdk: {a / n}" for n in cmp.left_only] + [f"only in regenerated: {b / n}" for n in cmp.right_only]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    out += [f"differs: {a / n}" for n in mismatch + errors]
    for sub in cmp.common_dirs:
        out += differences(a / sub, b / sub)
    return out


def test_committed_sdks_match_the_schema(tmp_path: Path) -> None:
    run(["bash", str(REPO / "scripts" / "gen-sdk.sh"), str(tmp_path)], REPO, 600)
    diff = [d for lang in ("python", "nodejs", "go") for d in differences(SDK / lang, tmp_path / lang)]
    assert not diff, "sdk/ is stale; run `make sdk` (scripts/gen-sdk.sh):\n" + "\n".join(diff)


def test_typescript_sdk_compiles(tmp_path: Path) -> None:
    tools = Path(run(["bash", str(REPO / "scripts" / "setup-node.sh")], REPO, 600).stdout.strip().splitlines()[-1])
    src = tmp_path / "nodejs"
    shutil.copytree(SDK / "nodejs", src)
    (src / "node_modules").symlink_to(tools / "node_modules")
    run([str(tools / "node_modules" / ".bin" / "tsc"), "-p", "tsconfig.json", "--outDir", str(tmp_path / "bin")], src, 300)
    assert (tmp_path / "bin" / "nixosMachine.js").is_file()
    assert (tmp_path / "bin" / "nixosMachine.d.ts").is_file()


def test_go_sdk_builds() -> None:
    # The module and build caches live outside the checkout, so a warm rerun takes seconds.
    run(["go", "build", "./..."], SDK / "go", 600, GOFLAGS="-mod=readonly")
    vet = run(["go", "list", "-f", "{{.ImportPath}}", "./..."], SDK / "go", 120, GOFLAGS="-mod=readonly")
    assert "github.com/pulumi-nixos/pulumi-nixos/sdk/go/nixos" in vet.stdout.split()


def test_python_sdk_imports() -> None:
    # Imports the committed sources (not an installed copy); its dependencies (parver, semver)
    # come from `pip install -e sdk/python` in the venv.
    code = (
        "import pulumi_nixos as n, inspect\n"
        "assert issubclass(n.NixosMachine, __import__('pulumi').CustomResource)\n"
        "assert issubclass(n.NixProfile, __import__('pulumi').CustomResource)\n"
        "assert callable(n.list_generations) and callable(n.resolve_flake)\n"
        "assert 'connection' in inspect.signature(n.NixosMachine._internal_init).parameters\n"
        "print(n.__file__)\n"
    )
    out = run([sys.executable, "-c", code], REPO, 120, PYTHONPATH=str(SDK / "python"))
    assert Path(out.stdout.strip()).is_relative_to(SDK / "python")


def test_one_version_everywhere() -> None:
    """provider/pyproject.toml holds the version; schema.json, every SDK and the YAML example carry it."""
    version = tomllib.loads((REPO / "provider" / "pyproject.toml").read_text())["project"]["version"]
    assert run(["bash", str(REPO / "scripts" / "version.sh")], REPO, 30).stdout.strip() == version
    assert json.loads((REPO / "schema.json").read_text())["version"] == version, "run `make sdk`"
    assert f'VERSION = "{version}"' in (SDK / "python" / "setup.py").read_text()
    assert json.loads((SDK / "nodejs" / "package.json").read_text())["version"] == version
    for plugin_json in (SDK / "python" / "pulumi_nixos" / "pulumi-plugin.json", SDK / "go" / "nixos" / "pulumi-plugin.json"):
        assert json.loads(plugin_json.read_text())["version"] == version, plugin_json
    declared = (REPO / "examples" / "yaml-single-host" / "sdks" / "nixos.yaml").read_text()
    assert f"\nversion: {version}\n" in declared
