"""The form Check records a declaration in (defaults filled, host keys canonical), so diffs compare like with like."""

from __future__ import annotations

from typing import Any

from ..transport import host_keys
from .values import UNKNOWN

SECRET_FILE_DEFAULTS: dict[str, Any] = {"owner": "root", "group": "root", "mode": "0400",
                                        "stage": "before-activation", "keepOnDestroy": False}


def connection(conn: Any, default_user: str | None) -> Any:
    """Fill defaults (port 22, user) and canonicalize a pinned host key."""
    if not isinstance(conn, dict):
        return conn
    out = dict(conn)
    out.setdefault("port", 22)
    out.setdefault("user", default_user or "root")
    if isinstance(out.get("port"), float):
        out["port"] = int(out["port"])
    if out.get("hostKey") not in (None, UNKNOWN):
        out["hostKey"] = host_keys.normalize_host_key(str(out["hostKey"]))
    return out


def machine(news: dict[str, Any], default_user: str | None) -> dict[str, Any]:
    """A NixosMachine's declaration as Check records it."""
    out = {**news, "connection": connection(news.get("connection"), default_user)}
    if out.get("buildHost") is not None:
        out["buildHost"] = connection(out["buildHost"], default_user)
    out.setdefault("action", "switch")
    out.setdefault("onDestroy", "rollback")
    if isinstance(out.get("secretFiles"), list):
        out["secretFiles"] = [{**SECRET_FILE_DEFAULTS, **{k: v for k, v in entry.items() if v is not None}}
                              if isinstance(entry, dict) else entry for entry in out["secretFiles"]]
    return out


def profile(news: dict[str, Any], default_user: str | None) -> dict[str, Any]:
    """A NixProfile's declaration as Check records it."""
    return {"onDestroy": "rollback", **news, "connection": connection(news.get("connection"), default_user)}
