"""Evaluating a fleet's configurations: one Nix process each, from a pool bounded by cores and memory.

Each real NixOS configuration (`nixpkgs.lib.nixosSystem`) runs its own module
system and instantiates its own `pkgs`: seconds and hundreds of MiB to GiB,
whether it is evaluated alone or beside others in one Nix process. One
process for many configurations saves almost nothing and holds all their
memory at once. So, as nix-eval-jobs does for Hydra and colmena:

- **One configuration per process.** A `nix eval` evaluates one attribute and
  exits, so its memory is one configuration's, and its error is its own.
- **A bounded pool.** At most `workers` evaluations run at once: the cores, or
  the `maxParallelEvaluations` setting. Without that setting, a new one also
  starts only when the memory the machine has available covers the peak of
  one evaluation (as measured on earlier ones, remembered across runs) on top
  of what the running ones will still grow to. A process that has to wait is
  the one a Check is not waiting for.
- **Evaluate ahead what the stack will ask for.** Pulumi's engine sends one
  Check at a time, so evaluating ahead is what lets a fleet's Checks overlap.
  The stack's plan (its URN's stack and project) remembers which attributes
  its last run asked for; its first Check starts all of them. Sooner still: a
  provider that starts where a stack's program ran (the project's directory)
  begins that stack's plan at once (begin()), while the rest of the provider
  is still loading, before the engine asks anything; a Check from another
  stack, or through another Nix, stops what began for nothing. Where the plan
  knows nothing (a first preview, a new machine), guesses fill workers that
  would idle: the flake's configurations likeliest to come next (named alike;
  between the ones asked for so far, then before them, then after, in natural
  order), one at first and two more for each further Check the plan did not know. A
  one-machine stack thus costs at most one evaluation it does not use.
- **An unchanged flake is not evaluated again.** `nix flake metadata`
  fingerprints the flake and its locked inputs without evaluating; an
  attribute evaluated before under the same fingerprint, Nix and options is
  answered from the store of earlier results (EvaluationStore), as long as
  its derivation is still in the Nix store.
- **One writer of the lock file.** Every Nix process that reads a flake
  writes its lock file when the lock is missing or stale, by truncating and
  rewriting it: processes started together on a fresh flake race, and one of
  them can read, or leave, an empty flake.lock. So the fingerprint comes
  first, always: its `nix flake metadata` is the one process that writes the
  lock, and the listing and every evaluation of the flake wait for it.
- **A system without a flake** (a `configuration.nix`, or an attribute of a Nix file)
  goes through the same pool and plan, but nothing tells what it reads
  before it is evaluated: no fingerprint, so it is evaluated on every run
  (as nixos-rebuild and colmena do), and there are no siblings to guess.
- Whatever still runs when the provider stops is cancelled (aclose()), which
  kills its Nix process.

The engine has no Pulumi here: a plan is any string the caller names.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli import Evaluation, FileRef, FlakeRef, Nix, SourceRef

log = logging.getLogger(__name__)

DEFAULT_PEAK = 1 << 30  # bytes one evaluation is assumed to need until one has been measured
RESERVE = 512 << 20  # bytes left to everything else on the machine
POLL_SECONDS = 0.2  # how often a running evaluation's memory is read
FIRST_GUESSES = 1  # configurations guessed ahead on the first Check the stack's plan did not know
MORE_GUESSES = 2  # more for each further such Check: the stack is a fleet
STORE_VERSION = 1
KEEP_SECONDS = 30 * 86400  # what the store keeps of anything not written since
STORE_ENV = "PULUMI_NIXOS_EVALUATION_STORE"  # where EvaluationStore keeps its files, in place of the default


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def process_memory(pid: int) -> tuple[int, int] | None:
    """(resident now, peak resident) in bytes of a process and everything it started, from /proc; None once
    the process is gone. The whole tree: a `nixCommand` may be a wrapper that runs Nix as its child."""
    rss = peak = 0
    todo = [pid]  # a tree: each process is listed once, by the thread that started it
    while todo:
        current = todo.pop()
        status = _status_memory(current)
        if status is None:
            if current == pid:
                return None
            continue  # a child that just exited
        rss, peak = rss + status[0], peak + status[1]
        todo.extend(_children(current))
    return rss, peak


def _status_memory(pid: int) -> tuple[int, int] | None:
    rss = peak = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return (rss, peak) if rss is not None and peak is not None else None


def _children(pid: int) -> list[int]:
    """The process's children, from each of its threads' `children` (Linux 3.5 and later)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(c) for c in f.read().split())
    except (OSError, ValueError):
        pass
    return found


def nix_identity(nix: Nix) -> str:
    """What makes one Nix evaluate differently from another: the program (its file, size and time), its
    arguments, the resource's options and NIX_CONFIG. Cheap: nothing is run."""
    program = shutil.which(nix.command[0]) or nix.command[0]
    try:
        real = os.path.realpath(program)
        st = os.stat(real)
        stamp = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        stamp = program
    return json.dumps([stamp, nix.command[1:], list(nix.settings), os.environ.get("NIX_CONFIG", "")])


# -- what is kept between runs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRef:
    """An attribute a stack asked for, with the Nix that evaluates it: enough to evaluate it again ahead."""

    command: tuple[str, ...]
    settings: tuple[tuple[str, str], ...]
    ref: SourceRef

    @classmethod
    def of(cls, nix: Nix, ref: SourceRef) -> PlannedRef:
        return cls(tuple(nix.command), tuple(nix.settings), ref)

    def nix(self) -> Nix:
        return Nix(self.command, self.settings)

    def to_json(self) -> dict[str, Any]:
        named: dict[str, Any] = ({"flake": self.ref.flake, "attr": self.ref.attr} if isinstance(self.ref, FlakeRef)
                                 else {"file": self.ref.file, "attr": self.ref.attr, "nixpkgs": self.ref.nixpkgs})
        return {"command": list(self.command), "settings": [list(s) for s in self.settings], **named}

    @classmethod
    def from_json(cls, value: Any) -> PlannedRef | None:
        try:
            command, settings = value["command"], value["settings"]
            if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
                return None
            pairs = tuple((str(a), str(b)) for a, b in settings)
            attr = value["attr"]
            if not isinstance(attr, str):
                return None
            if "file" in value:
                file, nixpkgs = value["file"], value.get("nixpkgs")
                if not isinstance(file, str) or not (nixpkgs is None or isinstance(nixpkgs, str)):
                    return None
                return cls(tuple(command), pairs, FileRef(file, attr, nixpkgs))
            flake = value["flake"]
            if not isinstance(flake, str):
                return None
            return cls(tuple(command), pairs, FlakeRef(flake, attr))
        except (KeyError, TypeError, ValueError):
            return None


class EvaluationStore:
    """Results, plans and measured peaks, kept in a directory between runs (best effort: a store that
    cannot be read or written only costs evaluations). Files are private (0600 in a 0700 directory)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._pruned = False

    @classmethod
    def default(cls) -> EvaluationStore:
        base = os.environ.get(STORE_ENV) or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pulumi-nixos")
        return cls(Path(base) / f"evaluation-v{STORE_VERSION}")

    @staticmethod
    def _name(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]

    def _read(self, kind: str, name: str) -> Any:
        try:
            return json.loads((self.directory / kind / name).read_text())
        except (OSError, ValueError):
            return None

    def _write(self, kind: str, name: str, value: Any) -> None:
        folder = self.directory / kind
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(value, f)
            os.replace(tmp, folder / name)
        except OSError as e:
            log.debug("evaluation store: cannot write %s/%s: %s", kind, name, e)

    def result(self, identity: str, fingerprint: str, attr: str) -> Evaluation | None:
        value = self._read("results", self._name(identity, fingerprint, attr))
        if not isinstance(value, dict) or not isinstance(value.get("out"), str):
            return None
        drv = value.get("drv")
        if drv is not None and (not isinstance(drv, str) or not os.path.exists(drv)):
            return None  # collected since: evaluate again (the package diff reads it)
        return Evaluation(value["out"], drv)

    def keep_result(self, identity: str, fingerprint: str, attr: str, evaluation: Evaluation) -> None:
        self._write("results", self._name(identity, fingerprint, attr),
                    {"out": evaluation.out_path, "drv": evaluation.drv_path, "at": int(time.time())})
        if not self._pruned:
            self._pruned = True
            self.prune()

    def prune(self, max_age: float = KEEP_SECONDS) -> None:
        """Forget results, plans and peaks nobody wrote for max_age seconds (every change of a flake leaves
        its configurations' results behind; they never match again)."""
        cutoff = time.time() - max_age
        for kind in ("results", "plans", "peaks", "places"):
            try:
                entries = list(os.scandir(self.directory / kind))
            except OSError:
                continue
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    def plan(self, plan: str) -> list[PlannedRef]:
        value = self._read("plans", self._name(plan))
        refs = value.get("refs") if isinstance(value, dict) else None
        if not isinstance(refs, list):
            return []
        return [r for r in map(PlannedRef.from_json, refs) if r is not None]

    def keep_plan(self, plan: str, refs: list[PlannedRef]) -> None:
        self._write("plans", self._name(plan), {"refs": [r.to_json() for r in refs]})

    def place(self, place: str) -> tuple[str, list[str], int | None] | None:
        """The plan last asked for from this place: (its stack, its Nix command, the workers set then)."""
        value = self._read("places", self._name(place))
        try:
            name, command, workers = value["plan"], value["command"], value.get("workers")
        except (KeyError, TypeError):
            return None
        if not (isinstance(name, str) and isinstance(command, list) and command
                and all(isinstance(c, str) for c in command)
                and (workers is None or (isinstance(workers, int) and workers > 0))):
            return None
        return name, command, workers

    def keep_place(self, place: str, name: str, command: list[str], workers: int | None) -> None:
        self._write("places", self._name(place), {"plan": name, "command": command, "workers": workers})

    def peak(self, identity: str, source: str) -> int | None:
        value = self._read("peaks", self._name(identity, source))
        return value if isinstance(value, int) and value > 0 else None

    def keep_peak(self, identity: str, source: str, peak: int) -> None:
        self._write("peaks", self._name(identity, source), peak)


# -- the pool ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Ticket:
    """One evaluation's place in the pool."""

    foreground: bool
    expected_peak: int
    granted: asyncio.Future[None] | None = None
    pid: int | None = None
    rss: int = 0
    peak: int = 0


class _Pool:
    """At most `workers` evaluations at once; Checks' own first; by memory too unless the workers were set."""

    def __init__(self, workers: int | None = None) -> None:
        self._set = workers
        self._running: list[_Ticket] = []
        self._waiting: dict[bool, deque[_Ticket]] = {True: deque(), False: deque()}
        self._claimed: set[_Ticket] = set()  # evaluations started and not finished (running, waiting, or before)

    def claim(self, ticket: _Ticket) -> None:
        self._claimed.add(ticket)

    def unclaim(self, ticket: _Ticket) -> None:
        self._claimed.discard(ticket)

    def idle(self) -> bool:
        """Whether a worker has nothing to do, nor anything coming: room for a guess."""
        return len(self._claimed) < self.workers

    @property
    def workers(self) -> int:
        return self._set or cores()

    @property
    def configured(self) -> int | None:
        return self._set

    def set_workers(self, workers: int | None) -> None:
        self._set = workers
        self._wake()

    def promote(self, ticket: _Ticket) -> None:
        """A Check now waits for this one: it goes before the evaluations ahead of time."""
        if ticket.foreground:
            return
        ticket.foreground = True
        if ticket in self._waiting[False]:
            self._waiting[False].remove(ticket)
            self._waiting[True].append(ticket)
            self._wake()

    @contextlib.asynccontextmanager
    async def slot(self, ticket: _Ticket) -> Any:
        if not (self._waiting[True] or (not ticket.foreground and self._waiting[False])) and self._admits(ticket):
            self._running.append(ticket)
        else:
            ticket.granted = asyncio.get_running_loop().create_future()
            self._waiting[ticket.foreground].append(ticket)
            try:
                await ticket.granted
            except asyncio.CancelledError:
                for queue in self._waiting.values():
                    if ticket in queue:
                        queue.remove(ticket)
                if ticket.granted.done() and not ticket.granted.cancelled():
                    self._release(ticket)
                raise
        try:
            yield
        finally:
            self._release(ticket)

    def _release(self, ticket: _Ticket) -> None:
        if ticket in self._running:
            self._running.remove(ticket)
        self._wake()

    def _admits(self, ticket: _Ticket) -> bool:
        if len(self._running) >= self.workers:
            return False
        if self._set is not None or not self._running:
            return True  # set by the user; or nothing runs, and one must
        available = available_memory()
        if available is None:
            return True
        # What the running ones will still grow to is not free, whatever MemAvailable says now.
        growing = sum(max(0, t.expected_peak - t.rss) for t in self._running)
        return available - growing >= ticket.expected_peak + RESERVE

    def _wake(self) -> None:
        for foreground in (True, False):
            queue = self._waiting[foreground]
            while queue and self._admits(queue[0]):
                ticket = queue.popleft()
                self._running.append(ticket)
                if ticket.granted is not None and not ticket.granted.done():
                    ticket.granted.set_result(None)
            if queue:
                return  # the first in line waits: nobody overtakes it

    async def watch(self, ticket: _Ticket) -> None:
        """Follow the ticket's process's memory until it is gone (cancelled by the caller then)."""
        while True:
            if ticket.pid is not None:
                seen = process_memory(ticket.pid)
                if seen is not None:
                    ticket.rss, ticket.peak = seen[0], max(ticket.peak, seen[1])
            await asyncio.sleep(POLL_SECONDS)


# -- the evaluator ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    ticket: _Ticket
    task: asyncio.Task[Evaluation]


@dataclass
class _Plan:
    """One stack's requests in this process."""

    remembered: list[PlannedRef]
    asked: list[PlannedRef] = field(default_factory=list)
    early: bool = False  # begun at the provider's start, before any Check named it
    unplanned: int = 0  # Checks of this run that the remembered plan did not name
    guessed: int = 0
    # What to guess around: the last Check the plan did not name, with its Nix and the flake's names.
    around: tuple[Nix, FlakeRef, asyncio.Task[list[str]]] | None = None
    siblings: dict[tuple[str, str, str], asyncio.Task[list[str]]] = field(default_factory=dict)


Key = tuple[str, str, str]  # (nix identity, source (the flake), attribute)
LockStamp = tuple[int, int] | None


@dataclass(frozen=True)
class Locked:
    """A flake's fingerprint (None: Nix could not say) and its lock file's stamp when it was taken."""

    fingerprint: str | None
    stamp: LockStamp


def lock_stamp(flake: str) -> LockStamp:
    """(size, mtime) of a local flake's lock file: an evaluation that writes it changes the flake's fingerprint.
    None for a flake that is not a local directory, or has no lock file yet."""
    location = flake.split("?", 1)[0]
    for scheme in ("path:", "git+file://", "git+file:", "file://"):
        location = location.removeprefix(scheme)
    if not location.startswith("/"):
        return None
    try:
        st = os.stat(os.path.join(location, "flake.lock"))
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


@dataclass
class EvaluationCounts:
    """What this process evaluated (each evaluation is also a step in the timeline)."""

    evaluated: int = 0
    from_store: int = 0
    peak: int = 0


class Evaluator:
    """Out paths and derivations of flake attributes (and of systems without a flake), for a fleet; see the
    module's docstring."""

    def __init__(self, store: EvaluationStore | None = None, workers: int | None = None) -> None:
        self.store = store
        self._pool = _Pool(workers)
        self._jobs: dict[Key, _Job] = {}
        self._fingerprints: dict[tuple[str, str], asyncio.Task[Locked]] = {}  # by (identity, flake)
        self._closed = False
        self._plans: dict[str, _Plan] = {}  # by plan key (_plan_key)
        self._place: str | None = None
        self._identities: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], str] = {}
        self._peaks: dict[tuple[str, str], int] = {}
        self.counts = EvaluationCounts()

    def set_workers(self, workers: int | None) -> None:
        """maxParallelEvaluations; None: the cores, bounded by memory."""
        self._pool.set_workers(workers)

    async def evaluate(self, nix: Nix, ref: SourceRef, *, plan: str | None = None) -> Evaluation:
        """Evaluate ref (or take it from an evaluation ahead, or from the store of earlier results).

        plan: the stack the request comes from; it is remembered, and the plan's other attributes are
        evaluated ahead. None: neither (a one-off question).
        """
        key = self._key(nix, ref)
        job = self._jobs.get(key)
        if job is None:
            job = self._start(nix, ref, foreground=True)
        else:
            self._pool.promote(job.ticket)
        if plan is not None:
            self._plan_ahead(plan, nix, ref)
            self._fill()
        return await asyncio.shield(job.task)

    def begin(self, place: str) -> None:
        """The provider starts where a stack's program runs (`place`: its project's directory): begin the plan
        last asked for from there now, with the workers set then, as that stack's first Check would, before
        the rest of the provider has even loaded. Needs a running event loop."""
        self._place = place
        found = self.store.place(place) if self.store else None
        if found is None or self._closed:
            return
        name, command, workers = found
        self._pool.set_workers(workers)
        self._open_plan(self._plan_key(name, command), early=True)

    async def aclose(self, timeout: float) -> None:
        """The provider is stopping: stop every evaluation still running (what finished is already kept) and wait
        up to `timeout` until their Nix processes are killed."""
        self._closed = True  # nothing more starts ahead
        listings = [t for plan in self._plans.values() for t in plan.siblings.values()]
        tasks = [t for t in (*(j.task for j in self._jobs.values()), *self._fingerprints.values(), *listings)
                 if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    # -- ahead of the Checks --------------------------------------------------------------------------

    def _plan_ahead(self, name: str, nix: Nix, ref: SourceRef) -> None:
        if self._closed:
            return
        key = self._plan_key(name, nix.command)
        plan = self._plans.get(key)
        if plan is None or plan.early:
            # The first Check of this plan in this process: it is the plan this place runs from now on.
            if plan is None:
                plan = self._open_plan(key, early=False)
            plan.early = False
            self._drop_early(key)
            if self.store and self._place is not None:
                self.store.keep_place(self._place, name, list(nix.command), self._pool.configured)
        planned = PlannedRef.of(nix, ref)
        if planned not in plan.asked:
            plan.asked.append(planned)
            if self.store:
                self.store.keep_plan(key, plan.asked)
        if planned not in plan.remembered:
            # The stack asks for more than its last run did: guess which configurations follow (a flake's
            # siblings; a system without a flake has none to list).
            plan.unplanned += 1
            if isinstance(ref, FlakeRef):
                self._guess(plan, nix, ref)

    @staticmethod
    def _plan_key(name: str, command: Sequence[str]) -> str:
        return json.dumps([name, list(command)])

    def _open_plan(self, key: str, *, early: bool) -> _Plan:
        """The plan `key` in this process, its remembered attributes started (they wait in the pool)."""
        remembered = self.store.plan(key) if self.store else []
        plan = self._plans[key] = _Plan(remembered, early=early)
        for planned in remembered:
            if self._key(planned.nix(), planned.ref) not in self._jobs:
                self._start(planned.nix(), planned.ref, foreground=False)
        return plan

    def _drop_early(self, keep: str) -> None:
        """A Check named plan `keep`: a plan begun at start that is another (another stack, or its Nix changed)
        was begun for nothing. What it started and `keep` does not remember is stopped."""
        wanted = {self._key(r.nix(), r.ref) for r in self._plans[keep].remembered}
        for key, plan in list(self._plans.items()):
            if key == keep or not plan.early:
                continue
            del self._plans[key]
            for planned in plan.remembered:
                job_key = self._key(planned.nix(), planned.ref)
                job = self._jobs.get(job_key)
                if job is not None and not job.ticket.foreground and job_key not in wanted:
                    del self._jobs[job_key]
                    job.task.cancel()

    def _guess(self, plan: _Plan, nix: Nix, ref: FlakeRef) -> None:
        configuration = ref.configuration
        if configuration is None:
            return
        listing_key = (self._identity(nix), ref.flake, configuration[1])
        listing = plan.siblings.get(listing_key)
        if listing is None:
            listing = plan.siblings[listing_key] = asyncio.ensure_future(
                self._listing(nix, ref.flake))
            listing.add_done_callback(_retrieve)
            listing.add_done_callback(lambda _: self._fill())
        plan.around = (nix, ref, listing)

    def _fill(self) -> None:
        """Give idle workers a guess each, chosen now: a guess waits for nobody and takes no worker a Check or
        the plan needs, and what the Checks have shown so far picks it."""
        for plan in self._plans.values():
            while not self._closed and plan.around is not None and self._pool.idle() and self._guesses_left(plan) > 0:
                nix, ref, listing = plan.around
                if not listing.done() or listing.cancelled() or listing.exception() is not None:
                    break  # no list yet (this runs again when it comes), or none: no guesses
                own = ref.configuration
                assert own is not None
                asked = [r.ref for r in plan.asked if isinstance(r.ref, FlakeRef) and r.ref.flake == ref.flake
                         and (c := r.ref.configuration) is not None and c[1] == own[1]]
                candidate = next((c for c in neighbours(ref, listing.result(), asked)
                                  if self._key(nix, c) not in self._jobs), None)
                if candidate is None:
                    plan.around = None
                    break
                plan.guessed += 1
                self._start(nix, candidate, foreground=False)

    @staticmethod
    def _guesses_left(plan: _Plan) -> int:
        return FIRST_GUESSES + MORE_GUESSES * (plan.unplanned - 1) - plan.guessed

    # -- one evaluation ---------------------------------------------------------------------------------

    def _identity(self, nix: Nix) -> str:
        k = (tuple(nix.command), tuple(nix.settings))
        if k not in self._identities:
            self._identities[k] = nix_identity(nix)
        return self._identities[k]

    def _key(self, nix: Nix, ref: SourceRef) -> Key:
        return (self._identity(nix), ref.source, ref.attr)

    def _start(self, nix: Nix, ref: SourceRef, *, foreground: bool) -> _Job:
        identity = self._identity(nix)
        expected = self._expected_peak(identity, ref.source)
        ticket = _Ticket(foreground=foreground, expected_peak=expected)
        task = asyncio.ensure_future(self._run(nix, ref, ticket))
        self._pool.claim(ticket)

        def finished(t: asyncio.Task[Evaluation]) -> None:
            self._pool.unclaim(ticket)
            if not t.cancelled():
                t.exception()  # retrieved: nobody may be waiting
            self._fill()

        task.add_done_callback(finished)
        job = self._jobs[self._key(nix, ref)] = _Job(ticket, task)
        return job

    def _expected_peak(self, identity: str, source: str) -> int:
        known = self._peaks.get((identity, source))
        if known is None and self.store is not None:
            known = self.store.peak(identity, source)
            if known is not None:
                self._peaks[(identity, source)] = known
        return known or DEFAULT_PEAK

    def _fingerprint(self, nix: Nix, flake: str) -> asyncio.Task[Locked]:
        """The flake's fingerprint, asked once per process, and again once its lock file changed."""
        k = (self._identity(nix), flake)
        known = self._fingerprints.get(k)
        # Asked again when the lock file changed since, or when the last asking came to nothing (cancelled).
        stale = known is not None and known.done() and (
            known.cancelled() or known.exception() is not None or known.result().stamp != lock_stamp(flake))
        if known is None or stale:
            known = self._fingerprints[k] = asyncio.ensure_future(self._fingerprint_once(nix, flake))
            known.add_done_callback(_retrieve)
        return known

    @staticmethod
    async def _fingerprint_once(nix: Nix, flake: str) -> Locked:
        before = lock_stamp(flake)
        fingerprint = await nix.flake_fingerprint(flake)
        after = lock_stamp(flake)
        if after != before:
            # The metadata call wrote the lock file (the flake had none, or a stale one), and what it printed
            # describes the tree before that: the tree from now on has the new lock in it.
            fingerprint = await nix.flake_fingerprint(flake)
            after = lock_stamp(flake)
        return Locked(fingerprint, after)

    async def _locked(self, nix: Nix, flake: str) -> Locked:
        """The flake's fingerprint, once its lock file is written: what every Nix process on the flake awaits."""
        return await asyncio.shield(self._fingerprint(nix, flake))

    async def _listing(self, nix: Nix, flake: str) -> list[str]:
        await self._locked(nix, flake)
        return await nix.attr_names(flake, "nixosConfigurations")

    async def _run(self, nix: Nix, ref: SourceRef, ticket: _Ticket) -> Evaluation:
        identity = self._identity(nix)
        # A system without a flake has no lock file and no fingerprint (what it reads is known only to the
        # evaluation): it is evaluated on every run, as nixos-rebuild and colmena do.
        locked = await self._locked(nix, ref.flake) if isinstance(ref, FlakeRef) else Locked(None, None)
        if locked.fingerprint is not None and self.store is not None:
            kept = self.store.result(identity, locked.fingerprint, ref.attr)
            if kept is not None:
                self.counts.from_store += 1
                return kept
        async with self._pool.slot(ticket):
            watching = asyncio.ensure_future(self._pool.watch(ticket))

            def started(pid: int) -> None:
                ticket.pid = pid

            try:
                evaluation = await nix.evaluate(ref, started=started)
            finally:
                watching.cancel()
                self._measured(identity, ref.source, ticket.peak)
        self.counts.evaluated += 1
        # Kept under the fingerprint it was evaluated with, unless the lock file changed meanwhile (someone
        # updated an input): which of the two it saw is then unknown, and the next run evaluates again.
        if (isinstance(ref, FlakeRef) and locked.fingerprint is not None and self.store is not None
                and lock_stamp(ref.flake) == locked.stamp):
            self.store.keep_result(identity, locked.fingerprint, ref.attr, evaluation)
        return evaluation

    def _measured(self, identity: str, source: str, peak: int) -> None:
        if peak <= 0:
            return
        self.counts.peak = max(self.counts.peak, peak)
        k = (identity, source)
        # The largest seen in this process; the store keeps the last process's, so it can also shrink.
        if peak > self._peaks.get(k, 0):
            self._peaks[k] = peak
            if self.store is not None:
                self.store.keep_peak(identity, source, peak)

    def busy(self) -> bool:
        """Whether an evaluation (ahead or not) or a listing still runs or waits."""
        listings = [t for plan in self._plans.values() for t in plan.siblings.values()]
        return any(not job.task.done() for job in self._jobs.values()) or any(not t.done() for t in listings)


def _natural(name: str) -> list[Any]:
    """web2 before web10: the order a program's loop declares machines in."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def _shape(name: str) -> str:
    """web12 -> web#: machines of one fleet tend to share a shape."""
    return re.sub(r"\d+", "#", name)


def neighbours(ref: FlakeRef, names: list[str], asked: Sequence[FlakeRef] = ()) -> list[FlakeRef]:
    """The same attribute of the flake's other configurations, the likeliest next Checks first.

    A fleet's machines tend to be named alike (`web3` like `web2`) and to form a run in natural order, while
    Pulumi's engine checks them in about declaration order, or scrambled (YAML with an explicit provider). So:
    configurations named like ref's first; of those, the ones between the first and the last asked for so far
    (asked: this run's Checks of the flake), then the ones before them (nearest first), then the ones after.
    Before, then after: a numbered fleet grows at its end, so the configurations a stack does not use yet are
    the last ones (a first preview of web1..web10 in a flake of web1..web20, checked in a scrambled order, guessed
    web11 and web12 when it went on both ways in turn). The others last, and only when ref's name has no number: a
    numbered fleet (`web#`) goes on with numbers.
    """
    ordered = sorted(names, key=_natural)
    own = ref.configuration
    assert own is not None

    def position(r: FlakeRef) -> int | None:
        return next((i for i, n in enumerate(ordered) if r.attr in (ref.of_configuration(n).attr,
                                                                 f"nixosConfigurations.{n}.{own[1]}")), None)

    mine = position(ref)
    if mine is None:
        return [ref.of_configuration(n) for n in ordered]
    seen = [i for i in (position(r) for r in (*asked, ref)) if i is not None]
    low, high = min(seen), max(seen)
    between, after, before = ordered[low + 1:high], ordered[high + 1:], ordered[:low][::-1]
    shape = _shape(ordered[mine])
    candidates = [n for n in between + before + after if n != ordered[mine]]
    alike = [n for n in candidates if _shape(n) == shape]
    # A numbered fleet (`web#`) goes on with numbers; names without one say nothing of each other.
    others = [n for n in candidates if _shape(n) != shape] if shape == ordered[mine] else []
    return [ref.of_configuration(n) for n in alike + others]


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Nobody may wait for a background task: take its outcome so asyncio does not warn."""
    if not task.cancelled():
        task.exception()
