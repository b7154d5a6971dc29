"""The evaluation pool (engine/nix/evaluation.py) with the real `nix`, on small flakes of the lab's library.

What a fleet's preview relies on: each configuration evaluated once, in its own process; the stack's plan
evaluated ahead of its Checks; guesses bounded; results kept between runs until the flake changes; at most
`workers` processes; a Check's own evaluation before those ahead; everything stopped on close.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path

import pytest
from conftest import git_commit, write_flake
from nixos_provider.engine import timeline
from nixos_provider.engine.errors import NixError
from nixos_provider.engine.nix.cli import Evaluation, FileRef, Nix, parse_flake_ref
from nixos_provider.engine.nix.evaluation import EvaluationStore, Evaluator, nix_identity

# Each configuration's evaluation takes a moment (a sum over a long list), so overlaps show.
FLAKE = """{ outputs = { self }: let
  lab = import ./lib.nix;
  sum = n: builtins.foldl' (a: b: a + b) 0 (builtins.genList (x: x) n);
  # k sums one after another: slow, in little memory (each list is garbage before the next)
  slow = k: if k == 0 then 0 else sum 300000 + slow (k - 1);
  machine = name: k: lab.nixosConfiguration { hostName = name; version = "${name}-${toString (slow k)}"; };
in {
  nixosConfigurations = {
    a = machine "a" 2; b = machine "b" 2; c = machine "c" 2; d = machine "d" 2; e = machine "e" 2;
    f = machine "f" 2;
    broken = lab.nixosConfiguration { hostName = "broken"; version = throw "broken on purpose"; };
  };
}; }"""


@pytest.fixture
def flake(tmp_path: Path, local_nix: str) -> str:
    return write_flake(tmp_path / "flake", FLAKE)


@pytest.fixture
def slow_flake(tmp_path: Path, local_nix: str) -> str:
    """The flake with one more configuration, whose evaluation takes many seconds."""
    return write_flake(tmp_path / "slow-flake", FLAKE.replace('f = machine "f" 2;', 'f = machine "f" 2; slow = machine "slow" 400;'))


@pytest.fixture
def store(tmp_path: Path) -> EvaluationStore:
    return EvaluationStore(tmp_path / "store")


@pytest.fixture
def spans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(timeline.ENV, str(path))
    return path


def evaluations(path: Path) -> list[tuple[str, float, float]]:
    """(configuration, start, end) of each `nix eval` of a configuration, in the order they started."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        x = json.loads(line)
        if x["step"] == "evaluate" and "nixosConfigurations." in x["subject"]:
            found.append((x["subject"].split("nixosConfigurations.")[1].split(".")[0], x["start"], x["end"]))
    return sorted(found, key=lambda e: e[1])


def ref(flake: str, name: str):  # type: ignore[no-untyped-def]
    return parse_flake_ref(f"{flake}#{name}")


async def settle(evaluator: Evaluator) -> None:
    """Wait until nothing runs ahead any more."""
    for _ in range(600):
        if not evaluator.busy():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("evaluations ahead did not finish")


async def test_a_first_run_guesses_one_configuration_then_more_for_each_further_check(
        flake: str, store: EvaluationStore, spans: Path) -> None:
    evaluator = Evaluator(store, workers=2)
    nix = Nix()
    await evaluator.evaluate(nix, ref(flake, "a"), plan="p/dev")
    await settle(evaluator)
    assert sorted(e[0] for e in evaluations(spans)) == ["a", "b"]
    await evaluator.evaluate(nix, ref(flake, "b"), plan="p/dev")  # a fleet: two more follow, nearest first
    await settle(evaluator)
    assert sorted(e[0] for e in evaluations(spans)) == ["a", "b", "broken", "c"]
    await evaluator.aclose(5)


async def test_the_stack_plan_is_evaluated_ahead_and_results_are_kept_until_the_flake_changes(
        flake: str, store: EvaluationStore, spans: Path, tmp_path: Path) -> None:
    nix = Nix()
    first = Evaluator(store, workers=2)
    answers = {n: await first.evaluate(nix, ref(flake, n), plan="p/dev") for n in ("c", "e")}
    await settle(first)
    await first.aclose(5)

    # A later run of the same stack: nothing changed, nothing is evaluated.
    spans.unlink(missing_ok=True)
    second = Evaluator(store, workers=2)
    assert await second.evaluate(nix, ref(flake, "c"), plan="p/dev") == answers["c"]
    assert await second.evaluate(nix, ref(flake, "e"), plan="p/dev") == answers["e"]
    assert evaluations(spans) == [] and second.counts.from_store == 2 and second.counts.evaluated == 0
    await second.aclose(5)

    # The flake changed: the first Check starts the whole plan (c and e), and guesses nothing.
    with open(tmp_path / "flake" / "flake.nix", "a") as f:
        f.write("# changed\n")
    spans.unlink(missing_ok=True)
    third = Evaluator(store, workers=2)
    await third.evaluate(nix, ref(flake, "c"), plan="p/dev")
    await settle(third)
    assert sorted(e[0] for e in evaluations(spans)) == ["c", "e"]
    await third.evaluate(nix, ref(flake, "e"), plan="p/dev")
    assert len(evaluations(spans)) == 2
    await third.aclose(5)

    # Another stack has a plan of its own.
    other = Evaluator(store, workers=2)
    await other.evaluate(nix, ref(flake, "a"), plan="p/prod")
    await settle(other)
    assert "e" not in {n for n, _, _ in evaluations(spans)[2:]}
    await other.aclose(5)


async def test_a_git_flake_with_uncommitted_changes_is_kept_until_a_file_git_tracks_changes(
        store: EvaluationStore, spans: Path, tmp_path: Path, local_nix: str) -> None:
    """Where most users' flakes are: a Git checkout (`.#web`), edited and not committed. Nix fingerprints the
    work tree's tracked files, so results are kept between runs, and a file Git does not track changes nothing."""
    repo = Path(write_flake(tmp_path / "repo", FLAKE).removeprefix("path:"))
    git_commit(repo, ".")
    with open(repo / "flake.nix", "a") as f:
        f.write("# not committed\n")
    nix = Nix()

    async def run() -> tuple[Evaluation, int]:
        spans.unlink(missing_ok=True)
        evaluator = Evaluator(store, workers=1)
        answer = await evaluator.evaluate(nix, ref(str(repo), "a"))
        await evaluator.aclose(5)
        return answer, len(evaluations(spans))

    first, evaluated = await run()
    assert evaluated == 1
    assert await run() == (first, 0)
    (repo / "notes.txt").write_text("a file Git does not track\n")
    assert await run() == (first, 0)
    with open(repo / "lib.nix", "a") as f:
        f.write("# tracked, changed\n")
    assert await run() == (first, 1)


async def test_systems_without_a_flake_are_planned_ahead_but_never_kept_and_never_guessed(
        tmp_path: Path, store: EvaluationStore, spans: Path, local_nix: str) -> None:
    folder = Path(write_flake(tmp_path / "classic", FLAKE).removeprefix("path:"))
    # Machines in a plain Nix file, as `nixos-rebuild --file default.nix --attr a` takes them.
    (folder / "default.nix").write_text(
        "let lab = import ./lib.nix; machine = name: lab.nixosConfiguration { hostName = name; version = name; };\n"
        'in { a = machine "a"; b = machine "b"; c = machine "c"; }\n')
    file = str(folder / "default.nix")

    def started() -> list[str]:
        return sorted(x["subject"].split(" of ")[0] for x in map(json.loads, spans.read_text().splitlines())
                      if x["step"] == "evaluate") if spans.exists() else []

    nix = Nix()
    first = Evaluator(store, workers=2)
    answers = {n: await first.evaluate(nix, FileRef(file, n), plan="p/dev") for n in ("a", "c")}
    await settle(first)
    assert started() == ["a", "c"]  # no guesses: there is no flake to list
    assert answers["a"].out_path.endswith("-nixos-system-a-24.05.lab-a")
    await first.aclose(5)

    spans.unlink()
    second = Evaluator(store, workers=2)
    await second.evaluate(nix, FileRef(file, "a"), plan="p/dev")  # starts the plan: `c` ahead
    await settle(second)
    assert started() == ["a", "c"] and second.counts.from_store == 0 and second.counts.evaluated == 2
    await second.aclose(5)


async def test_at_most_the_set_number_of_processes_and_a_check_goes_first(
        flake: str, store: EvaluationStore, spans: Path) -> None:
    nix = Nix()
    planner = Evaluator(store, workers=1)
    for n in ("a", "b", "c", "d"):
        await planner.evaluate(nix, ref(flake, n), plan="p/dev")
    await planner.aclose(5)
    with open(Path(flake.removeprefix("path:")) / "flake.nix", "a") as f:
        f.write("# changed\n")
    spans.unlink(missing_ok=True)

    evaluator = Evaluator(store, workers=1)
    # The plan is a, b, c, d. The Check of a starts the plan; while a runs, the Check of d arrives: d goes
    # next, before b and c, which were waiting longer.
    checking_a = asyncio.ensure_future(evaluator.evaluate(nix, ref(flake, "a"), plan="p/dev"))
    await asyncio.sleep(0)
    await evaluator.evaluate(nix, ref(flake, "d"), plan="p/dev")
    await checking_a
    await settle(evaluator)
    ran = evaluations(spans)
    assert [n for n, _, _ in ran][:2] == ["a", "d"], ran
    for (_, _, end), (_, start, _) in itertools.pairwise(ran):
        assert start >= end - 0.01, f"two evaluations overlapped with workers=1: {ran}"
    await evaluator.aclose(5)


async def test_an_error_is_the_configurations_own_even_when_evaluated_ahead(
        flake: str, store: EvaluationStore) -> None:
    nix = Nix()
    evaluator = Evaluator(store, workers=2)
    await evaluator.evaluate(nix, ref(flake, "a"), plan="p/dev")
    with pytest.raises(NixError, match="broken on purpose"):
        await evaluator.evaluate(nix, ref(flake, "broken"), plan="p/dev")  # a failure is not kept...
    await evaluator.aclose(5)
    again = Evaluator(store, workers=2)
    with pytest.raises(NixError, match="broken on purpose"):  # ...so the next run says it again
        await again.evaluate(nix, ref(flake, "broken"), plan="p/dev")
    await again.aclose(5)


async def test_close_kills_evaluations_that_run_ahead(slow_flake: str, store: EvaluationStore) -> None:
    flake = slow_flake
    nix = Nix()
    evaluator = Evaluator(store, workers=2)
    await evaluator.evaluate(nix, ref(flake, "a"), plan="p/dev")
    with pytest.raises(TimeoutError):  # asked for, so in the plan; not waited for
        await asyncio.wait_for(evaluator.evaluate(nix, ref(flake, "slow"), plan="p/dev"), 0.5)
    await evaluator.aclose(5)
    restarted = Evaluator(store, workers=2)
    await restarted.evaluate(nix, ref(flake, "a"), plan="p/dev")  # starts `slow` ahead (the plan)
    await asyncio.sleep(1.0)
    assert restarted.busy()
    await restarted.aclose(5)
    ps = os.popen("ps -eo args").read()
    assert not any(" eval " in line and "nixosConfigurations.slow" in line and flake.removeprefix("path:") in line
                   for line in ps.splitlines())


async def test_a_provider_starting_where_a_stack_ran_begins_its_plan_before_any_check(
        slow_flake: str, store: EvaluationStore, spans: Path, tmp_path: Path) -> None:
    """The plugin starts in the project's directory (plugin.place()): the plan its last run there asked for
    begins before the engine has asked anything, with the workers set then; another stack's first Check there
    stops it."""
    flake, nix, here = slow_flake, Nix(), json.dumps(["/srv/infra", "infra"])
    first = Evaluator(store, workers=1)
    first.begin(here)
    assert not first.busy()  # nothing ran from here before
    for name in ("c", "e"):
        await first.evaluate(nix, ref(flake, name), plan="infra/dev")
    await settle(first)
    await first.aclose(5)
    assert store.place(here) == ("infra/dev", ["nix"], 1)

    with open(tmp_path / "slow-flake" / "flake.nix", "a") as f:
        f.write("# changed\n")
    spans.unlink(missing_ok=True)
    second = Evaluator(store)
    second.begin(here)
    assert second._pool.workers == 1
    await settle(second)  # no Check yet
    assert [e[0] for e in evaluations(spans)] == ["c", "e"]
    await second.evaluate(nix, ref(flake, "c"), plan="infra/dev")
    assert len(evaluations(spans)) == 2 and second.counts.evaluated == 2
    await second.aclose(5)

    elsewhere = Evaluator(store)
    elsewhere.begin(json.dumps(["/srv/other", "infra"]))
    assert not elsewhere.busy()

    # dev's last run asked for the slow one; then prod's first Check comes.
    dev = Evaluator(store)
    dev.begin(here)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(dev.evaluate(nix, ref(flake, "slow"), plan="infra/dev"), 0.5)
    await dev.aclose(5)
    third = Evaluator(store)
    third.begin(here)
    await asyncio.sleep(0.5)
    assert third.busy()
    await third.evaluate(nix, ref(flake, "a"), plan="infra/prod")
    await settle(third)
    assert third.counts.evaluated == 2  # a, and the guess beside it; the slow one was stopped
    assert not any(" eval " in line and "nixosConfigurations.slow" in line and flake.removeprefix("path:") in line
                   for line in os.popen("ps -eo args").read().splitlines())
    assert store.place(here) == ("infra/prod", ["nix"], 1)
    await third.aclose(5)


async def test_without_a_set_number_memory_decides_how_many_run(
        flake: str, store: EvaluationStore, spans: Path) -> None:
    """Two cores' worth of workers, but one evaluation is known to need more than the machine has available: they
    run one at a time (one always runs)."""
    nix = Nix()
    store.keep_peak(nix_identity(nix), flake, 1 << 50)
    evaluator = Evaluator(store)  # no maxParallelEvaluations: cores and memory
    assert evaluator._pool.workers >= 2  # this machine: the test means nothing on one core
    await asyncio.gather(*(evaluator.evaluate(nix, ref(flake, n)) for n in ("a", "b", "c")))
    ran = evaluations(spans)
    assert len(ran) == 3
    for (_, _, end), (_, start, _) in itertools.pairwise(ran):
        assert start >= end - 0.01, f"evaluations overlapped although memory allows one: {ran}"
    await evaluator.aclose(5)

    # With the peak as measured (small), they overlap.
    spans.unlink()
    store.keep_peak(nix_identity(nix), flake, 1 << 20)
    with open(Path(flake.removeprefix("path:")) / "flake.nix", "a") as f:
        f.write("# changed\n")
    evaluator = Evaluator(store)
    await asyncio.gather(*(evaluator.evaluate(nix, ref(flake, n)) for n in ("a", "b", "c", "d")))
    ran = evaluations(spans)
    assert any(start < end for (_, _, end), (_, start, _) in itertools.pairwise(ran)), ran
    await evaluator.aclose(5)


async def test_the_memory_of_nix_run_by_a_wrapper_is_what_the_pool_learns(tmp_path: Path, store: EvaluationStore) -> None:
    """A `nixCommand` may be a wrapper that runs Nix as its child, not in its place: the peak the pool budgets
    with is Nix's hundreds of MiB, not the wrapper's few."""
    flake = write_flake(tmp_path / "flake", FLAKE.replace('f = machine "f" 2;', 'f = machine "f" 2; g = machine "g" 8;'))
    wrapper = tmp_path / "nix-wrapper"
    wrapper.write_text('#!/bin/bash\nnix "$@"\nexit $?\n')  # bash waits beside its child
    wrapper.chmod(0o755)
    evaluator = Evaluator(store, workers=1)
    await evaluator.evaluate(Nix([str(wrapper)]), ref(flake, "g"))
    await evaluator.aclose(5)
    assert evaluator.counts.peak > 64 << 20, f"learned {evaluator.counts.peak >> 20} MiB"


def test_the_store_forgets_what_nobody_wrote_for_a_month(tmp_path: Path) -> None:
    store = EvaluationStore(tmp_path / "store")
    store.keep_result("nix", "old", "a", Evaluation("/nix/store/" + "a" * 32 + "-a", None))
    old = next((tmp_path / "store" / "results").iterdir())
    os.utime(old, (0, 0))
    store.keep_result("nix", "new", "a", Evaluation("/nix/store/" + "b" * 32 + "-a", None))
    store.prune()
    assert store.result("nix", "old", "a") is None
    assert store.result("nix", "new", "a") == Evaluation("/nix/store/" + "b" * 32 + "-a", None)


async def test_a_flake_without_a_lock_file_is_locked_by_one_process_before_any_other_reads_it(
        tmp_path: Path, store: EvaluationStore) -> None:
    """Every Nix process on a flake whose lock is missing writes one, by truncating the file and writing it again:
    processes started together race, and one of them reads, or leaves, an empty flake.lock. The fingerprint's
    `nix flake metadata` writes it first, alone; the listing and the evaluations start after it."""
    write_flake(tmp_path / "lib", "{ outputs = { self }: { lab = import ./lib.nix; }; }")
    flake = write_flake(tmp_path / "flake", FLAKE.replace("{ outputs = { self }: let\n  lab = import ./lib.nix;",
                                                          '{ inputs.lib.url = "path:' + str(tmp_path / "lib") + '";\n'
                                                          "outputs = { self, lib }: let\n  lab = lib.lab;"))
    lock = tmp_path / "flake" / "flake.lock"
    calls = tmp_path / "calls"
    wrapper = tmp_path / "nix"
    # Logs each call's subcommand, with whether the lock file was there when it started, and when it ended.
    wrapper.write_text(f'#!/bin/bash\nsub=$(printf "%s\\n" "$@" | grep -m1 -x -e eval -e metadata)\n'
                       f'[ -s {lock} ] && had=locked || had=unlocked\necho "start $sub $had" >> {calls}\n'
                       f'nix "$@"; rc=$?\necho "end $sub" >> {calls}\nexit $rc\n')
    wrapper.chmod(0o755)
    nix = Nix([str(wrapper)])
    evaluator = Evaluator(store, workers=2)
    await evaluator.evaluate(nix, ref(flake, "a"), plan="p/dev")  # a first run: a listing and a guess too
    await settle(evaluator)
    await evaluator.aclose(5)
    log = calls.read_text().splitlines()
    assert log[:2] == ["start metadata unlocked", "end metadata"], log
    evals = [line for line in log if line.startswith("start eval")]
    assert len(evals) == 3 and all(line == "start eval locked" for line in evals), log  # a, the listing, b
    assert json.loads(lock.read_text())["nodes"]["lib"]["locked"]["type"] == "path"

    # The next run: the lock is there and unchanged, the results are kept; nothing is evaluated.
    calls.unlink()
    again = Evaluator(store, workers=2)
    await again.evaluate(nix, ref(flake, "a"), plan="p/dev")
    await again.evaluate(nix, ref(flake, "b"), plan="p/dev")
    assert again.counts.evaluated == 0 and again.counts.from_store == 2, calls.read_text()
    await again.aclose(5)
