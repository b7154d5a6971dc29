"""What a preview shows of a NixosMachine: the record with what the update would change unknown, the package
diff the engine predicts from closures or derivations (and the reboot it implies), the secret files by path and
hash; and how Diff tells which secret files change."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..engine.declaration import conversion
from ..engine.declaration.typed_inputs import SOURCE_KEYS, Closure
from ..engine.lifecycle.models import MachineRecord, PreviewGoal, predicted_reboot
from ..engine.nix.closure_diff import ClosureChanges
from ..engine.target import secret_files as files
from .engine_calls import fleet_source
from .properties import contains_unknown, reveal
from .resource import DeployedResource, build_host_key
from .state import MACHINE_RECORD, MachineState

# The outputs that report package changes: set by preview (pending) and by a deployment (last), not copied over.
CHANGE_REPORTS = ["pendingChanges", "lastChanges"]
# The other outputs: what the record holds besides the system, its files and the change reports.
COMPUTED = sorted(MACHINE_RECORD - {"systemPath", "secretFiles", "secretFilesKey", *CHANGE_REPORTS})
# What a deployment changes, so a preview cannot know it.
DEPLOYED = frozenset({"generation", "previousGeneration", "nixosVersion", "deployedAt", "pushedPaths", "pushedBytes",
                      "substitutedPaths", "needsReboot", "systemDerivation"})


class MachinePreview(DeployedResource):
    """The preview of a NixosMachine's update."""

    async def _preview_update(self, urn: str, olds: dict[str, Any], news: dict[str, Any],
                              deploys: bool) -> MachineState:
        state = preview_state(news, olds, deploys=deploys)
        self._note_secret_files(urn, olds, news)
        if not deploys:
            return state
        changes = await self._pending_changes(urn, olds, news)
        record = replace(state.record, pending_changes=changes.to_output() if changes else None)
        rebooting, due = predicted_reboot(news.get("reboot"), news.get("action"), changes,
                                          due=bool(reveal(olds.get("needsReboot"))))
        if rebooting:
            self.ctx.info(urn, f"  reboots into it once, and keeps it only when it boots and passes its health "
                               f"checks (reboot: {news.get('reboot')})")
        if due is None:
            return MachineState(news, record, state.unknown)
        return MachineState(news, replace(record, needs_reboot=due), state.unknown - {"needsReboot"})

    async def _pending_changes(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> ClosureChanges | None:
        """Preview: what the new system changes, package by package (from the closures or the derivations)."""
        old, new = olds.get("systemPath"), news.get("systemPath")
        if not isinstance(old, str) or not isinstance(new, str) or contains_unknown(news.get("connection")):
            return None
        nix = self._nix(news)
        sources = [news.get(k) for k in SOURCE_KEYS if news.get(k) is not None]
        known = bool(sources) and not contains_unknown([*sources, news.get("nixOptions")])
        build_host = news.get("buildHost")
        goal = PreviewGoal(
            remote=self._remote(news, host_key=reveal(news["connection"]).get("hostKey") or olds.get("hostKey")),
            current=old, current_derivation=MachineState.record_of(olds).system_derivation, new=new,
            source=fleet_source(self.ctx, urn, Closure.parse(reveal(news), "systemPath"), nix, nixos=True)
            if known else None,
            build_on_preview=bool(news.get("buildOnPreview")), built_elsewhere=built_elsewhere(news),
            build_host=(self._remote_of(build_host, build_host_key(olds, build_host))
                        if build_host is not None and not contains_unknown(build_host) else None),
            dry_activate=bool(news.get("dryActivate")))
        # For people, the lines the engine reports; for programs, the `pendingChanges` output of this previewed
        # update, which Pulumi's streaming JSON (`PULUMI_ENABLE_STREAMING_JSON_PREVIEW=1 pulumi preview --json`)
        # carries in its resOutputsEvent (the digest of a plain `--json` leaves a preview's outputs out).
        return await self.ctx.engine.pending_changes(goal, nix, self.ctx.report(urn))

    def _note_secret_files(self, urn: str, olds: dict[str, Any], news: dict[str, Any]) -> None:
        """Preview: which secret files an up writes or removes (paths only, never contents)."""
        if contains_unknown(news.get("secretFiles")):
            self.ctx.info(urn, "secret files: contents not known yet; they are compared during the update")
            return
        key = MachineState.record_of(olds).secret_files_key or b""
        plan = files.plan(conversion.recorded_files(reveal(olds.get("secretFiles"))),
                          conversion.to_secret_files(reveal(news.get("secretFiles"))), key)
        if plan.changed_paths():
            self.ctx.info(urn, f"secret files to write: {', '.join(plan.changed_paths())}")
        if plan.remove:
            self.ctx.info(urn, f"secret files to remove: {', '.join(plan.remove)}")

# -- preview's state, secret files in diffs ---------------------------------------------------


def preview_state(news: dict[str, Any], olds: dict[str, Any] | None, *, deploys: bool) -> MachineState:
    """What a preview shows: the old record (none for a new machine) with what the update would change unknown."""
    system = news.get("systemPath")
    unknown = set() if isinstance(system, str) else {"systemPath"}
    old = MachineState.record_of(olds or {})
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
    record, files_unknown = _files_preview(record, old.secret_files_key, news)
    return MachineState(news, record, frozenset(unknown | files_unknown))


def built_elsewhere(news: dict[str, Any]) -> bool:
    """Whether the deployment builds the system on the target (`buildOn: remote`) or a build host, not here."""
    return news.get("buildOn") == "remote" or news.get("buildHost") is not None


def _files_preview(record: MachineRecord, key: bytes | None,
                   news: dict[str, Any]) -> tuple[MachineRecord, set[str]]:
    """The secret files a preview shows: their hashes where the key (the recorded one) and contents are known (else
    unknown), and the key state keeps."""
    wanted = news.get("secretFiles")
    if wanted is None:
        return replace(record, secret_files=(), secret_files_key=key), set()
    if key is None or contains_unknown(wanted):
        return replace(record, secret_files=(), secret_files_key=key), {"secretFiles"} | (
            set() if key else {"secretFilesKey"})
    records = tuple(f.record(key) for f in conversion.to_secret_files(reveal(wanted)))
    return replace(record, secret_files=records, secret_files_key=key), set()


def secret_files_diff(olds: dict[str, Any], news: dict[str, Any]) -> dict[str, str]:
    """Which secret files change, by their index in the new list; contents are compared by HMAC."""
    wanted = news.get("secretFiles")
    if contains_unknown(wanted):
        return {"secretFiles": "UPDATE"}
    recorded = {r.path: r for r in conversion.recorded_files(reveal(olds.get("secretFiles")))}
    key = MachineState.record_of(olds).secret_files_key or b""
    out: dict[str, str] = {}
    new_files = conversion.to_secret_files(reveal(wanted))
    for i, f in enumerate(new_files):
        old = recorded.get(f.path)
        if old is None:
            out[f"secretFiles[{i}]"] = "ADD"
        elif old != f.record(key):
            out[f"secretFiles[{i}]"] = "UPDATE"
    if set(recorded) - {f.path for f in new_files}:
        out["secretFiles"] = "UPDATE"
    return out
