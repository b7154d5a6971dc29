"""What a new declaration of a resource changes against its recorded state (plain values, UNKNOWN where a preview
does not know yet): which properties, whether the resource must be replaced (and the old one deleted first), and
whether the host must be deployed again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..declaration import conversion, input_rules
from ..declaration.values import UNKNOWN, contains_unknown
from ..lifecycle.models import MachineRecord
from .records import record_of

# A change to one of these means the host must be deployed again.
MACHINE_DEPLOY_KEYS = ("systemPath", "action", "triggers")
PROFILE_DEPLOY_KEYS = ("storePath", "activate", "triggers")
# Another host is another resource.
ADDRESS = [("connection", "host"), ("connection", "port")]


@dataclass
class Changes:
    replaces: list[str] = field(default_factory=list)
    detailed: dict[str, str] = field(default_factory=dict)  # property path -> kind (UPDATE, ADD, ...), Pulumi's names
    delete_before_replace: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.detailed)


def machine_changes(olds: dict[str, Any], news: dict[str, Any]) -> Changes:
    keys = [k for k in input_rules.MACHINE_INPUTS if k != "secretFiles"]
    result = _compare(olds, news, keys, MACHINE_DEPLOY_KEYS)
    result.detailed.update(_secret_files_changes(olds, news))
    return result


def profile_changes(olds: dict[str, Any], news: dict[str, Any]) -> Changes:
    keys = [k for k in input_rules.PROFILE_INPUTS if k not in ("profile", "profilePath", "user")]
    result = _compare(olds, news, keys, PROFILE_DEPLOY_KEYS)
    # Which profile this is: compare resolved paths, since `profile` + `user` and `profilePath` can name the same one.
    if not contains_unknown([news.get("profile"), news.get("profilePath"), news.get("user"), news.get("connection")]):
        new_path = profile_path(news, str(news["connection"].get("user") or "root"))
        if olds.get("profilePath") and new_path != olds["profilePath"]:
            result.replaces.append("profilePath")
            result.detailed["profilePath"] = "UPDATE_REPLACE"
            result.delete_before_replace = same_address(olds, news)
        elif (news.get("user") or None) != (olds.get("user") or None):
            result.detailed["user"] = "UPDATE"
    return result


def machine_deploys(olds: dict[str, Any], news: dict[str, Any]) -> bool:
    return _deploys(olds, news, MACHINE_DEPLOY_KEYS, "systemPath")


def profile_deploys(olds: dict[str, Any], news: dict[str, Any]) -> bool:
    return _deploys(olds, news, PROFILE_DEPLOY_KEYS, "storePath")


def _deploys(olds: dict[str, Any], news: dict[str, Any], keys: tuple[str, ...], closure: str) -> bool:
    return any(olds.get(k) != news.get(k) for k in keys) or contains_unknown(news.get(closure))


def install_unfinished(olds: dict[str, Any]) -> bool:
    """A create with `install` that failed: the next update installs (or adopts) again."""
    return olds.get("install") is not None and olds.get("installStatus") not in ("installed", "adopted")


def profile_path(props: dict[str, Any], ssh_user: str) -> str:
    """The profile a NixProfile names: `profilePath`, or `profile` under its user's (or the SSH user's) profiles."""
    if props.get("profilePath"):
        return str(props["profilePath"])
    user = props.get("user") or ssh_user
    return f"/nix/var/nix/profiles/per-user/{user}/{props['profile']}"


def build_host_key(olds: dict[str, Any], build_host: Any) -> str | None:
    """The build host key the last deployment pinned, while buildHost still names that host."""
    old = olds.get("buildHost")
    if not isinstance(old, dict) or not isinstance(build_host, dict):
        return None
    same_host = (old.get("host"), old.get("port")) == (build_host.get("host"), build_host.get("port"))
    return olds.get("buildHostKey") if same_host else None


def same_address(olds: dict[str, Any], news: dict[str, Any]) -> bool:
    """Whether a replacement stays at the address and port of the old resource. Only then must the old one go first:
    Pulumi otherwise creates the replacement before deleting, so a move that cannot reach its new host, or meets
    another host key there, leaves the old host as it was. (One machine under two names is `Fleet.replaced_in_place`.)"""
    old, new = olds.get("connection"), news.get("connection")
    if not isinstance(old, dict) or not isinstance(new, dict) or contains_unknown(new):
        return False
    return (old.get("host"), old.get("port", 22)) == (new.get("host"), new.get("port", 22))


def _compare(olds: dict[str, Any], news: dict[str, Any], keys: list[str], deploy_keys: tuple[str, ...]) -> Changes:
    """Compare inputs key by key (an object's fields one by one); a change of address replaces the resource.

    A setting that appears where the old state had none (e.g. credentials or `flake` after `pulumi import`, which
    only knows host and system) is not a change unless it changes what is deployed: the new inputs are recorded
    anyway, and nothing on the machine would differ.
    """
    result = Changes()
    for key in keys:
        old, new = olds.get(key), news.get(key)
        if contains_unknown(new) and new is not None:
            result.detailed[key] = "UPDATE"
        elif old is None and new is not None:
            if key in deploy_keys:
                result.detailed[key] = "ADD"
        elif old is not None and new is None:
            result.detailed[key] = "DELETE"
        elif old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                for sub in sorted(set(old) | set(new)):
                    if old.get(sub) is None and new.get(sub) is not None:
                        continue
                    if old.get(sub) != new.get(sub):
                        result.detailed[f"{key}.{sub}"] = "UPDATE"
            else:
                result.detailed[key] = "UPDATE"
    for path in ADDRESS:
        old, new = _get(olds, path), _get(news, path)
        if new is UNKNOWN or old != new:
            name = ".".join(path)
            result.replaces.append(name)
            result.detailed[name] = "UPDATE_REPLACE"
    result.delete_before_replace = bool(result.replaces) and same_address(olds, news)
    return result


def _secret_files_changes(olds: dict[str, Any], news: dict[str, Any]) -> dict[str, str]:
    """Which secret files change, by their index in the new list; contents are compared by HMAC."""
    wanted = news.get("secretFiles")
    if contains_unknown(wanted):
        return {"secretFiles": "UPDATE"}
    recorded = {r.path: r for r in conversion.recorded_files(olds.get("secretFiles"))}
    key = record_of(MachineRecord, olds).secret_files_key or b""
    out: dict[str, str] = {}
    new_files = conversion.to_secret_files(wanted)
    for i, f in enumerate(new_files):
        old = recorded.get(f.path)
        if old is None:
            out[f"secretFiles[{i}]"] = "ADD"
        elif old != f.record(key):
            out[f"secretFiles[{i}]"] = "UPDATE"
    if set(recorded) - {f.path for f in new_files}:
        out["secretFiles"] = "UPDATE"
    return out


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d
