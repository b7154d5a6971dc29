"""NixProfile's operations on declarations (plain values, schema.json's names): any Nix profile on a host
(deploy-rs's multi-profile idea), converged by the engine (`lifecycle.profile`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..declaration import defaults, input_rules
from ..declaration.typed_inputs import ProfileInputs
from ..errors import EngineError
from ..lifecycle.models import ProfileGoal, ProfileRecord, Report
from ..models import Profile
from .changes import Changes, build_host_key, profile_changes, profile_deploys, profile_path
from .fleet import Fleet
from .records import PROFILE_RECORD, Refreshed, record_of

# The outputs besides the profile's path and store path.
COMPUTED = sorted(PROFILE_RECORD - {"profilePath", "storePath"})
# What a deployment changes, so a preview cannot know it.
DEPLOYED = frozenset({"generation", "previousGeneration", "deployedAt", "pushedPaths", "pushedBytes",
                      "substitutedPaths"})
Planned = tuple[ProfileRecord, frozenset[str]]  # the record a preview shows, and its properties not known yet


def _with_store_path(record: ProfileRecord, news: dict[str, Any]) -> tuple[ProfileRecord, set[str]]:
    """A preview's record: the store path Check evaluated, and the properties that leaves unknown."""
    path = news.get("storePath")
    return replace(record, store_path=path if isinstance(path, str) else None), (
        set() if isinstance(path, str) else {"storePath"})


def _pinned(olds: dict[str, Any], news: dict[str, Any]) -> str | None:
    """The host key to hold the host to: the declared one, else the one recorded."""
    conn = news.get("connection")
    return (conn.get("hostKey") if isinstance(conn, dict) else None) or olds.get("hostKey")


class Profiles:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    async def check(self, news: dict[str, Any], *, plan: str | None) -> dict[str, Any]:
        """The declaration as state records it: defaults filled, a flake's store path evaluated."""
        checked = defaults.profile(news, self.fleet.settings.default_user)
        if news.get("flake") is not None:
            checked["storePath"] = await self.fleet.output_path(news, nixos=False, plan=plan)
        return checked

    @staticmethod
    def changes(olds: dict[str, Any], news: dict[str, Any]) -> Changes:
        return profile_changes(olds, news)

    def _profile(self, props: dict[str, Any]) -> Profile:
        """The profile a declaration names, under the SSH user's profiles unless it names its user or path."""
        ssh_user = self.fleet.remote(props["connection"]).user
        return Profile(profile_path(props, ssh_user), props.get("user") or None)

    @staticmethod
    def preview_create(news: dict[str, Any]) -> Planned:
        path = news.get("profilePath")
        record, unknown = _with_store_path(ProfileRecord(profile_path=path if isinstance(path, str) else None), news)
        unknown |= set(COMPUTED) | (set() if isinstance(path, str) else {"profilePath"})
        return record, frozenset(unknown)

    def ident(self, news: dict[str, Any]) -> str:
        """The profile's ID: host:port:/profile/path."""
        remote = self.fleet.remote(news["connection"])
        return f"{remote.host}:{remote.port}:{self._profile(news).path}"

    async def create(self, name: str, news: dict[str, Any], report: Report) -> ProfileRecord:
        return await self._converge(name, news, {}, None, report, pinned=None)

    def preview_update(self, olds: dict[str, Any], news: dict[str, Any]) -> Planned:
        key = build_host_key(olds, news.get("buildHost"))
        record = replace(record_of(ProfileRecord, olds), host_key=_pinned(olds, news), build_host_key=key)
        if not profile_deploys(olds, news):
            return record, frozenset()
        record, unknown = _with_store_path(record, news)
        if news.get("buildHost") is not None and not key:
            unknown.add("buildHostKey")  # pinned by the deployment
        return record, frozenset(unknown | DEPLOYED)

    async def update(self, name: str, olds: dict[str, Any], news: dict[str, Any], report: Report) -> ProfileRecord:
        return await self._converge(name, news, olds, record_of(ProfileRecord, olds), report, pinned=_pinned(olds, news),
                                    deploys=profile_deploys(olds, news))

    async def _converge(self, name: str, news: dict[str, Any], olds: dict[str, Any], recorded: ProfileRecord | None,
                        report: Report, *, pinned: str | None, deploys: bool = True) -> ProfileRecord:
        fleet = self.fleet
        p = ProfileInputs.parse(news)
        nix = fleet.nix(p.settings.nix_options)
        builder_key = build_host_key(olds, p.build_host)
        request = p.settings.request(fleet.remote(p.connection, pinned), self._profile(news), activate_command=p.activate)
        goal = ProfileGoal(request, fleet.source(p.closure, nix, report, nixos=False),
                           build_host=None if p.build_host is None else fleet.remote(p.build_host, builder_key),
                           build_host_key=builder_key, build_on_target=p.build_on_target, deploys=deploys)
        converging = fleet.engine.converge_profile(goal, recorded, nix, report)
        return await fleet.converged(name, converging, recorded, request.profile.path)

    async def refresh(self, ident: str, state: dict[str, Any], inputs: dict[str, Any]) -> Refreshed[ProfileRecord]:
        """What the profile holds now. `pulumi import` has no state yet: the ID is host:port:/profile/path."""
        props = {**inputs, **state}
        if not props.get("connection"):
            parts = ident.split(":", 2)
            if len(parts) != 3 or not parts[2].startswith("/"):
                raise EngineError(f"cannot import NixProfile {ident!r}: the ID is host:port:/profile/path")
            props = {"connection": {"host": parts[0], "port": int(parts[1]),
                                    "user": self.fleet.settings.default_user or "root"}, "profilePath": parts[2]}
        remote = self.fleet.remote(props["connection"], state.get("hostKey"))
        profile = self._profile(props)
        record = await self.fleet.engine.refresh_profile(remote, profile, record_of(ProfileRecord, props),
                                                         importing=not state)
        kept = {k: props[k] for k in input_rules.PROFILE_INPUTS if k in props}
        if not state:
            kept.setdefault("onDestroy", "rollback")
        # An import records as declared what the profile holds: where it is and its store path.
        declared = inputs or {k: v for k, v in {**kept, "profilePath": record.profile_path,
                                                "storePath": record.store_path}.items()
                              if k in ("connection", "profilePath", "storePath", "onDestroy") and v is not None}
        return Refreshed(f"{remote.host}:{remote.port}:{profile.path}", kept, record, declared)

    async def delete(self, name: str, state: dict[str, Any], report: Report) -> None:
        record = record_of(ProfileRecord, state)
        profile = Profile(str(record.profile_path), state.get("user") or None)
        if state.get("onDestroy") == "retain":
            report.info("onDestroy is `retain`: leaving the profile as it is")
        elif self.fleet.replaced_in_place(name, record.host_key, profile.path):
            report.info("its replacement manages the same profile on the same machine (the same host key): leaving "
                        "what the replacement deployed")
        else:
            await self.fleet.engine.destroy_profile(
                self.fleet.remote(state["connection"], record.host_key), profile, record,
                remove=state.get("onDestroy") == "remove", activate_command=state.get("activate") or None,
                report=report)
