"""The form Check records inputs in (defaults filled, host keys canonical), so diffs compare like with like."""

from __future__ import annotations

from typing import Any

from ..engine.transport import host_keys
from .properties import UNKNOWN, reveal


def normalize_connection(conn: Any, default_user: str | None) -> Any:
    """Fill defaults (port 22, user) and canonicalize a pinned host key, so diffs compare like with like."""
    if not isinstance(conn, dict):
        return conn
    out = dict(conn)
    out.setdefault("port", 22)
    out.setdefault("user", default_user or "root")
    if isinstance(out.get("port"), float):
        out["port"] = int(out["port"])
    if out.get("hostKey") not in (None, UNKNOWN):
        out["hostKey"] = host_keys.normalize_host_key(str(reveal(out["hostKey"])))
    return out


SECRET_FILE_DEFAULTS: dict[str, Any] = {"owner": "root", "group": "root", "mode": "0400",
                                        "stage": "before-activation", "keepOnDestroy": False}


def normalize_secret_files(files: Any) -> Any:
    """Fill each file's defaults."""
    if not isinstance(files, list):
        return files
    out = []
    for entry in files:
        out.append({**SECRET_FILE_DEFAULTS, **{k: v for k, v in entry.items() if v is not None}})
    return out
