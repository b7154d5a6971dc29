"""The engine's FleetSource with real Nix: how a system without a flake is built from its evaluation, when a build
refuses to deploy something else than the evaluation said, and a store path that is realised only when missing."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from nixos_provider.engine.errors import EngineError
from nixos_provider.engine.lifecycle.source import FleetSource
from nixos_provider.engine.nix.builds import FleetBuilds
from nixos_provider.engine.nix.cli import Evaluation, FileRef, FlakeRef, Nix, SourceRef

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

SYSTEMS = """{{
  # A derivation built with nothing but /bin/sh, named per run so that each builds it anew.
  system = derivation {{ name = "fleet-source-{tag}"; system = builtins.currentSystem; builder = "/bin/sh";
                         args = [ "-c" "echo {tag} > $out" ]; }};
  # A store path that no derivation makes.
  given = {{ outPath = builtins.toFile "fleet-source-given" "{tag}"; }};
}}
"""


def _source(file: Path, attr: str, store_path: str | None, lines: list[str], *, check: bool) -> FleetSource:
    async def evaluate(ref: SourceRef, nix: Nix) -> Evaluation:
        return await nix.evaluate(ref)

    return FleetSource(FileRef(str(file), attr), store_path, Nix(), evaluate, FleetBuilds(_no_flake), lines.append,
                       check_evaluated=check)


def _systems(tmp_path: Path) -> tuple[Path, str]:
    """SYSTEMS written for this test: the file, and the tag its derivation's name and content carry (new for every
    run: the store outlives the test, and a path an earlier run built would be there already)."""
    tag = uuid.uuid4().hex[:12]
    file = tmp_path / "systems.nix"
    file.write_text(SYSTEMS.format(tag=tag))
    return file, tag


def test_a_system_without_a_flake_is_built_from_its_evaluation(tmp_path: Path) -> None:
    file, tag = _systems(tmp_path)
    lines: list[str] = []
    evaluated = asyncio.run(Nix().evaluate(FileRef(str(file), "system")))
    source = _source(file, "system", evaluated.out_path, lines, check=True)
    assert source.evaluated and source.flake is None
    assert asyncio.run(source.build()) == evaluated.out_path
    assert Path(evaluated.out_path).read_text() == f"{tag}\n"
    assert lines == [f"building system of {file}"]

    # What Check evaluated is what must be deployed: a build that gives another path fails, saying both.
    elsewhere = "/nix/store/" + "0" * 32 + "-fleet-source-other"
    with pytest.raises(EngineError) as e:
        asyncio.run(_source(file, "system", elsewhere, [], check=True).build())
    assert str(e.value) == (f"building system of {file} gave {evaluated.out_path}, but evaluation said {elsewhere}; "
                            "is the configuration impure?")
    assert asyncio.run(_source(file, "system", elsewhere, [], check=False).build()) == evaluated.out_path

    with pytest.raises(EngineError) as e:
        asyncio.run(_source(file, "given", None, [], check=True).build())
    assert str(e.value).startswith(f"given of {file} is the store path /nix/store/")
    assert str(e.value).endswith("-fleet-source-given, not a derivation to build")


def test_a_given_store_path_is_realised_only_when_it_is_missing(tmp_path: Path) -> None:
    file, _ = _systems(tmp_path)
    evaluated = asyncio.run(Nix().evaluate(FileRef(str(file), "system")))
    drv, out = evaluated.drv_path, evaluated.out_path
    assert drv is not None and not Path(out).exists()

    lines: list[str] = []
    given = FleetSource(None, out, Nix(), _no_evaluation, FleetBuilds(_no_flake), lines.append)
    assert not given.evaluated and given.flake is None
    with pytest.raises(ValueError, match="names no source to evaluate"):
        asyncio.run(given.evaluation())
    # Missing, and no cache here to fetch it from: the attempt is shown, and Nix's refusal is the error.
    with pytest.raises(EngineError, match=out):
        asyncio.run(given.build())
    assert lines == [f"realising {out}"]
    asyncio.run(Nix().realise(drv))
    assert asyncio.run(given.build()) == out and lines == [f"realising {out}"]


async def _no_evaluation(ref: SourceRef, nix: Nix) -> Evaluation:
    raise AssertionError("a given store path is never evaluated")


async def _no_flake(nix: Nix, ref: FlakeRef) -> str:
    raise AssertionError("no flake here")
