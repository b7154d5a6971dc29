"""What a preview shows of a NixosMachine: its record with what the update would change left unknown, the package
diff the engine predicts from closures or derivations (and the reboot it implies), the secret files by path and
hash, never their contents."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..declaration import conversion
from ..declaration.typed_inputs import SOURCE_KEYS, Closure
from ..declaration.values import contains_unknown
from ..lifecycle.models import MachineRecord, PreviewGoal, Report, predicted_reboot
from ..nix.closure_diff import ClosureChanges
from ..target import secret_files as files
from .changes import build_host_key
from .fleet import Fleet
from .records import MACHINE_RECORD, record_of

# The outputs that report package changes: set by preview (pending) and by a deployment (last), not copied over.
CHANGE_REPORTS = ["pendingChanges", "lastChanges"]
# The other outputs: what the record holds besides the system, its files and the change reports.
COMPUTED = sorted(MACHINE_RECORD - {"systemPath", "secretFiles", "secretFilesKey", *CHANGE_REPORTS})
# What a deployment changes, so a preview cannot know it.
DEPLOYED = frozenset({"generation", "previousGeneration", "nixosVersion", "deployedAt", "pushedPaths", "pushedBytes",
                      "substitutedPaths", "needsReboot", "systemDerivation"})
Planned = tuple[MachineRecord, frozenset[str]]  # the record a preview shows, and its properties not known yet


def planned(news: dict[str, Any], olds: dict[str, Any] | None, *, deploys: bool) -> Planned:
    """The old record (none for a new machine) with what the update would change unknown."""
    system = news.get("systemPath")
    unknown = set() if isinstance(system, str) else {"systemPath"}
    old = record_of(MachineRecord, olds or {})
    if olds is None:
        record = MachineRecord(system_path=system if isinstance(system, str) else None)
        unknown |= set(COMPUTED)
    else:
        key = build_host_key(olds, news.get("buildHost"))
        record = replace(old, system_path=system if isinstance(system, str) else None, build_host_key=key,
                         last_changes=None, pending_changes=None)
        if deploys:
            unknown |= DEPLOYED
            if news.get("buildHost") is not None and not key:
                unknown.add("buildHostKey")  # pinned by the deployment
    record, files_unknown = _files(record, old.secret_files_key, news)
    return record, frozenset(unknown | files_unknown)


async def update(fleet: Fleet, olds: dict[str, Any], news: dict[str, Any], report: Report, *,
                 deploys: bool) -> Planned:
    """The preview of an update: the secret files it writes or removes, the packages it changes, a reboot."""
    record, unknown = planned(news, olds, deploys=deploys)
    _note_secret_files(olds, news, report)
    if not deploys:
        return record, unknown
    changes = await _pending_changes(fleet, olds, news, report)
    record = replace(record, pending_changes=changes.to_output() if changes else None)
    rebooting, due = predicted_reboot(news.get("reboot"), news.get("action"), changes,
                                      due=bool(olds.get("needsReboot")))
    if rebooting:
        report.info(f"  reboots into it once, and keeps it only when it boots and passes its health checks "
                    f"(reboot: {news.get('reboot')})")
    if due is None:
        return record, unknown
    return replace(record, needs_reboot=due), unknown - {"needsReboot"}


async def _pending_changes(fleet: Fleet, olds: dict[str, Any], news: dict[str, Any],
                           report: Report) -> ClosureChanges | None:
    """What the new system changes, package by package (from the closures or the derivations)."""
    old, new = olds.get("systemPath"), news.get("systemPath")
    if not isinstance(old, str) or not isinstance(new, str) or contains_unknown(news.get("connection")):
        return None
    nix = fleet.nix(conversion.nix_options(news.get("nixOptions")))
    sources = [news.get(k) for k in SOURCE_KEYS if news.get(k) is not None]
    known = bool(sources) and not contains_unknown([*sources, news.get("nixOptions")])
    build_host = news.get("buildHost")
    goal = PreviewGoal(
        remote=fleet.remote(news["connection"], news["connection"].get("hostKey") or olds.get("hostKey")),
        current=old, current_derivation=record_of(MachineRecord, olds).system_derivation, new=new,
        source=fleet.source(Closure.parse(news, "systemPath"), nix, report, nixos=True) if known else None,
        build_on_preview=bool(news.get("buildOnPreview")), built_elsewhere=_built_elsewhere(news),
        build_host=(fleet.remote(build_host, build_host_key(olds, build_host))
                    if build_host is not None and not contains_unknown(build_host) else None),
        dry_activate=bool(news.get("dryActivate")))
    # For people, the lines the engine reports; for programs, the `pendingChanges` output of this previewed update,
    # which Pulumi's streaming JSON (`PULUMI_ENABLE_STREAMING_JSON_PREVIEW=1 pulumi preview --json`) carries in its
    # resOutputsEvent (the digest of a plain `--json` leaves a preview's outputs out).
    return await fleet.engine.pending_changes(goal, nix, report)


def _note_secret_files(olds: dict[str, Any], news: dict[str, Any], report: Report) -> None:
    """Which secret files an up writes or removes (paths only, never contents)."""
    if contains_unknown(news.get("secretFiles")):
        report.info("secret files: contents not known yet; they are compared during the update")
        return
    key = record_of(MachineRecord, olds).secret_files_key or b""
    plan = files.plan(conversion.recorded_files(olds.get("secretFiles")),
                      conversion.to_secret_files(news.get("secretFiles")), key)
    if plan.changed_paths():
        report.info(f"secret files to write: {', '.join(plan.changed_paths())}")
    if plan.remove:
        report.info(f"secret files to remove: {', '.join(plan.remove)}")


def _built_elsewhere(news: dict[str, Any]) -> bool:
    """Whether the deployment builds the system on the target (`buildOn: remote`) or a build host, not here."""
    return news.get("buildOn") == "remote" or news.get("buildHost") is not None


def _files(record: MachineRecord, key: bytes | None, news: dict[str, Any]) -> Planned:
    """The secret files a preview shows: their hashes where the key (the recorded one) and contents are known (else
    unknown), and the key state keeps."""
    wanted = news.get("secretFiles")
    if wanted is None:
        return replace(record, secret_files=(), secret_files_key=key), frozenset()
    if key is None or contains_unknown(wanted):
        return replace(record, secret_files=(), secret_files_key=key), frozenset(
            {"secretFiles"} | (set() if key else {"secretFilesKey"}))
    records = tuple(f.record(key) for f in conversion.to_secret_files(wanted))
    return replace(record, secret_files=records, secret_files_key=key), frozenset()
