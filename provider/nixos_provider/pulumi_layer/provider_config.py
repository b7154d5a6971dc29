"""The provider's configuration, parsed once: CheckConfig reports what is wrong, Configure applies the rest.

Each value arrives from the program (typed) or from `pulumi config set` (text: JSON lists and objects, numbers).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..engine.declaration import checks, conversion, machine_checks
from ..engine.resources.fleet import FleetSettings
from .properties import reveal
from .schema import unknown_keys

WHOLE_NUMBERS = ("maxParallelSsh", "maxParallelTransfers", "maxParallelEvaluations")
COMMANDS = ("nixCommand", "nixosAnywhereCommand")


def check(values: dict[str, Any]) -> checks.Failures:
    """What is wrong with the configuration, by the setting's name."""
    f = checks.Failures()
    for key in WHOLE_NUMBERS:
        if values.get(key) is not None and _whole_number(reveal(values.get(key))) is None:
            f.add(key, "must be a whole number of at least 1")
    for key in COMMANDS:
        if values.get(key) is not None and _command(values.get(key)) is None:
            f.add(key, "must be a non-empty list of strings")
    cache = conversion.parse_binary_cache(reveal(values.get("binaryCache")))
    machine_checks.check_binary_cache(f, cache)
    f.add_all(unknown_keys("nixos:index:BinaryCache", cache, owner="binaryCache"))
    return f


def changed(olds: dict[str, Any], news: dict[str, Any]) -> list[str]:
    """The settings whose values differ (DiffConfig), by name."""
    return sorted(k for k in set(olds) | set(news) if reveal(olds.get(k)) != reveal(news.get(k)))


def parse(values: dict[str, Any]) -> FleetSettings:
    """The configuration Configure applies (CheckConfig has refused what is wrong; a setting left out is default)."""
    return FleetSettings(
        nix_command=_command(values.get("nixCommand")) or ("nix",),
        nixos_anywhere_command=_command(values.get("nixosAnywhereCommand")) or ("nixos-anywhere",),
        default_private_key=reveal(values.get("defaultPrivateKey")) or None,
        default_user=reveal(values.get("defaultUser")) or None,
        binary_cache=conversion.to_binary_cache(conversion.parse_binary_cache(reveal(values.get("binaryCache")))),
        max_parallel_ssh=_whole_number(reveal(values.get("maxParallelSsh"))),
        max_parallel_transfers=_whole_number(reveal(values.get("maxParallelTransfers"))),
        max_parallel_evaluations=_whole_number(reveal(values.get("maxParallelEvaluations"))),
    )


def _command(value: Any) -> tuple[str, ...] | None:
    """A command as a list of strings: from the program, or JSON text from `pulumi config set`."""
    value = reveal(value)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        return tuple(value)
    return None


def _whole_number(value: Any) -> int | None:
    """A setting that must be a whole number of at least 1: from the program (a number) or `pulumi config set` (text)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None  # "inf" and "nan" parse as floats
    if value < 1 or int(value) != value:
        return None
    return int(value)
