"""nix_versions against what each real Nix version printed (tests/data/nix-outputs/<version>/, made by its record.sh)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from nixos_provider.engine.nix.versions import (
    PATH_INFO_JSON_FORMAT,
    NixOutputError,
    NixVersion,
    error_summary,
    evaluation_error,
    parse_build_outputs,
    parse_copied_paths,
    parse_gc_summary,
    parse_generations,
    parse_path_info,
    rejects_flag,
)

RECORDED = Path(__file__).parent / "data" / "nix-outputs"
VERSIONS = sorted((d.name for d in RECORDED.iterdir() if d.is_dir()), key=lambda v: tuple(map(int, v.split("."))))


def test_every_supported_version_is_recorded() -> None:
    assert VERSIONS == ["2.8.0", "2.26.3", "2.34.8"]


def out(version: str, name: str, stream: str = "stdout") -> str:
    return (RECORDED / version / f"{name}.{stream}").read_text()


def status(version: str, name: str) -> int:
    return int(out(version, name, "status"))


@pytest.mark.parametrize("version", VERSIONS)
def test_version_is_read(version: str) -> None:
    assert str(NixVersion.parse(out(version, "version"))) == version


def test_version_forms() -> None:
    assert NixVersion.parse("nix (Nix) 2.8.0") == NixVersion(2, 8, 0)
    assert NixVersion.parse("nix (Determinate Nix 3.8.2) 2.30.2") == NixVersion(2, 30, 2)
    assert NixVersion.parse("nix (Nix) 2.24.0pre20240601_dirty") == NixVersion(2, 24, 0)
    assert NixVersion(2, 8) < NixVersion(2, 26, 3) < NixVersion(2, 34, 8)
    with pytest.raises(NixOutputError):
        NixVersion.parse("command not found")


@pytest.mark.parametrize("version", VERSIONS)
def test_build_outputs(version: str) -> None:
    [outputs] = parse_build_outputs(out(version, "build"))
    assert list(outputs) == ["out"]
    assert outputs["out"].startswith("/nix/store/") and outputs["out"].endswith("-top-2.0")


@pytest.mark.parametrize("version", VERSIONS)
def test_closure_from_plain_json(version: str) -> None:
    """`--json` alone: a list up to 2.18, an object keyed by path after; both give the same closure."""
    infos = parse_path_info(out(version, "path-info-json"))
    closure = out(version, "store-qR").split()
    assert sorted(infos) == sorted(closure)
    top = next(p for p in infos if p.endswith("-top-2.0"))
    dep = next(p for p in infos if p.endswith("-dep-1.0"))
    assert infos[top].references == (dep,)
    assert infos[top].nar_size > 0 and infos[dep].references == ()


def test_the_shapes_really_differ() -> None:
    """The recordings hold both shapes, so the test above covers both."""
    assert out("2.8.0", "path-info-json").lstrip().startswith("[")
    assert out("2.26.3", "path-info-json").lstrip().startswith("{")
    assert "deprecated" in out("2.34.8", "path-info-json", "stderr")


@pytest.mark.parametrize("version", VERSIONS)
def test_json_format_flag(version: str) -> None:
    """Versions that know --json-format get format 1 (no warning); the others reject it, which the engine detects."""
    name = "path-info-json-format-1"
    if status(version, name) == 0:
        assert version == "2.34.8"
        assert "deprecated" not in out(version, name, "stderr")
        assert parse_path_info(out(version, name)) == parse_path_info(out(version, "path-info-json"))
    else:
        assert rejects_flag(out(version, name, "stderr"), PATH_INFO_JSON_FORMAT[0])


def test_json_format_2_is_read_too() -> None:
    """Format 2 (2.33+) keys by base name and nests under `info`: the same closure comes out."""
    v2 = parse_path_info(out("2.34.8", "path-info-json-format-2"))
    assert v2 == parse_path_info(out("2.34.8", "path-info-json-format-1"))


@pytest.mark.parametrize("version", VERSIONS)
def test_invalid_path_is_left_out(version: str) -> None:
    assert parse_path_info(out(version, "path-info-invalid")) == {}


@pytest.mark.parametrize("version", VERSIONS)
def test_generations(version: str) -> None:
    gens = parse_generations(out(version, "list-generations"))
    assert [(g.number, g.current) for g in gens] == [(1, False), (2, True)]
    assert gens[0].date.endswith("Z") and "T" in gens[0].date
    assert status(version, "list-generations-missing") == 0
    assert parse_generations(out(version, "list-generations-missing")) == []


@pytest.mark.parametrize("version", VERSIONS)
def test_deleted_generations_and_the_garbage_collectors_summary(version: str) -> None:
    assert status(version, "delete-generations") == 0
    assert [(g.number, g.current) for g in parse_generations(out(version, "list-generations-after-delete"))] == [
        (2, True)]
    assert status(version, "gc") == 0
    paths, freed = parse_gc_summary(out(version, "gc"))
    assert paths > 0 and re.fullmatch(r"[\d.]+ [KMG]iB", freed), (paths, freed)


def test_generations_reject_what_they_do_not_know() -> None:
    with pytest.raises(NixOutputError, match="unexpected line"):
        parse_generations("   1   yesterday\n")


@pytest.mark.parametrize("version", VERSIONS)
def test_untracked_file_in_a_git_flake(version: str) -> None:
    """A flake in a git repository does not see untracked files; a path: flake does. The error says which file."""
    assert status(version, "git-eval-uses-untracked") == 1
    assert status(version, "path-eval-uses-untracked") == 0
    msg = error_summary(out(version, "git-eval-uses-untracked", "stderr"))
    assert "extra.nix" in msg
    assert "…" not in msg and "while calling" not in msg and "|" not in msg
    if version == "2.34.8":
        assert "is not tracked by Git" in msg


@pytest.mark.parametrize("version", VERSIONS)
def test_error_summary_of_an_unknown_flag(version: str) -> None:
    if status(version, "path-info-json-format-1") != 0:
        assert error_summary(out(version, "path-info-json-format-1", "stderr")) == "unrecognised flag '--json-format'"


def test_error_summary_keeps_build_logs() -> None:
    stderr = (
        "error: builder for '/nix/store/x-a.drv' failed with exit code 1;\n"
        "       last 2 log lines:\n       > compiling\n       > boom\n"
        "       For full logs, run 'nix log /nix/store/x-a.drv'.\n"
        "error: 1 dependencies of derivation '/nix/store/y-b.drv' failed to build\n"
    )
    assert error_summary(stderr) == (
        "builder for '/nix/store/x-a.drv' failed with exit code 1; last 2 log lines: > compiling > boom")


# What each Nix printed for real NixOS configurations (nixpkgs 20.09 on 2.8, 26.05 on 2.26 and 2.34) that fail
# evaluation, with --show-trace (record-nixos-errors.sh). The user sees the cause, the option and the position in
# their own flake where Nix names one; never the frames inside nixpkgs.
@pytest.mark.parametrize("version", VERSIONS)
def test_evaluation_error_of_an_option_that_does_not_exist(version: str) -> None:
    msg = evaluation_error(out(version, "eval-error-nooption", "stderr"))
    assert msg.startswith("The option `services.nginx.enabel' ")
    assert "does not exist" in msg
    assert "…" not in msg and "|" not in msg and "lib/modules.nix" not in msg


@pytest.mark.parametrize("version", VERSIONS)
def test_evaluation_error_of_a_failed_assertion(version: str) -> None:
    msg = evaluation_error(out(version, "eval-error-assertion", "stderr"))
    assert msg == "Failed assertions: - The ‘fileSystems’ option does not specify your root file system."


@pytest.mark.parametrize("version", VERSIONS)
def test_evaluation_error_of_a_value_of_the_wrong_type(version: str) -> None:
    msg = evaluation_error(out(version, "eval-error-type", "stderr"))
    assert "services.openssh.ports" in msg and "is not of type `16 bit unsigned integer" in msg
    assert "(option" not in msg  # the message names its option; another from the trace would confuse
    assert "…" not in msg and "|" not in msg


@pytest.mark.parametrize("version", VERSIONS)
def test_evaluation_error_of_a_throw(version: str) -> None:
    msg = evaluation_error(out(version, "eval-error-throws", "stderr"))
    if version == "2.8.0":  # 2.8 does not say where a throw is
        assert msg == "no domain for this machine (option `networking.domain`)"
    else:
        assert msg.startswith("no domain for this machine (option `networking.domain`, at /nix/store/")
        # The line Nix showed under the position, so the user sees which definition it was.
        assert msg.endswith('-source/flake.nix:23:51: `throws = machine "e4" { networking.domain = throw "no domain '
                            'for this machine"; };`)')


@pytest.mark.parametrize("version", VERSIONS)
def test_copied_paths(version: str) -> None:
    """`nix copy --to file://…?secret-key=…`: one line per path uploaded, none when the cache has them all."""
    assert status(version, "copy-to-cache") == 0
    assert sorted(parse_copied_paths(out(version, "copy-to-cache", "stderr"))) == sorted(out(version, "store-qR").split())
    assert parse_copied_paths(out(version, "copy-to-cache-again", "stderr")) == []
