"""What is secret in a resource's state, declared once: the inputs that hold credentials, the record fields that
are keys. `state.State.to_properties` applies it to every property a resource hands back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .properties import Secret


def secret_install(inst: Any) -> Any:
    """Keep file contents and disk keys secret in outputs, however the program passed them."""
    if not isinstance(inst, dict):
        return inst
    out = dict(inst)
    for k in ("extraFiles", "diskEncryptionKeys"):
        if out.get(k) is not None and not isinstance(out[k], Secret):
            out[k] = Secret(out[k])
    return out


def secret_binary_cache(cache: Any) -> Any:
    """Keep the signing key wrapped as a secret in state."""
    if not isinstance(cache, dict) or cache.get("signingKey") is None or isinstance(cache["signingKey"], Secret):
        return cache
    return {**cache, "signingKey": Secret(cache["signingKey"])}


def secret_connection(conn: Any) -> Any:
    """Keep the secret fields of a connection wrapped as secrets in outputs."""
    if not isinstance(conn, dict):
        return conn
    out = dict(conn)
    for k in ("privateKey", "privateKeyPassword", "password", "sudoPassword"):
        if out.get(k) is not None and not isinstance(out[k], Secret):
            out[k] = Secret(out[k])
    if isinstance(out.get("proxy"), dict):
        out["proxy"] = secret_connection(out["proxy"])
    return out


def secret_fields(props: dict[str, Any]) -> dict[str, Any]:
    """props with every field that holds a credential wrapped as a secret: what state and outputs keep of inputs.

    The one list of a machine's secret-bearing inputs; every output a resource
    returns (Check's, preview's, a deployment's, a failure's, refresh's) passes here."""
    out = dict(props)
    for key, wrap in SECRET_BEARING:
        if key in out:
            out[key] = wrap(out[key])
    return out


SECRET_BEARING: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("connection", secret_connection),
    ("buildHost", secret_connection),
    ("binaryCache", secret_binary_cache),
    ("install", secret_install),
)

# The record fields kept as secrets (engine.lifecycle.models): the HMAC key of the secret files' hashes.
SECRET_RECORD_FIELDS = frozenset({"secret_files_key"})
