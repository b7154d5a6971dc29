"""What `switch-to-configuration dry-activate` says it would do, parsed from its output.

Both switch-to-configuration implementations (the Perl script and the Rust
switch-to-configuration-ng) print one line per kind of change, each listing
units separated by ", ", for example:

    would stop the following units: a.service, b.service
    would NOT stop the following changed units: c.service
    would restart systemd
    would reload the following units: d.service
    would restart the following units: e.service
    would start the following units: a.service, b.service

Any other line (the activation script's own dry-run output) is not ours to read.
"""

from __future__ import annotations

from dataclasses import dataclass

# The line's prefix -> the field of DryActivation it fills.
_UNIT_LINES = {
    "would stop the following units:": "stop",
    "would NOT stop the following changed units:": "skip",
    "would reload the following units:": "reload",
    "would restart the following units:": "restart",
    "would start the following units:": "start",
}


@dataclass(frozen=True)
class DryActivation:
    """The units an activation would touch, in the order switch-to-configuration listed them."""

    stop: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()  # changed, but left running (restartIfChanged/stopIfChanged = false)
    reload: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    start: tuple[str, ...] = ()
    restart_systemd: bool = False


def parse_dry_activate(output: str) -> DryActivation:
    units: dict[str, list[str]] = {name: [] for name in _UNIT_LINES.values()}
    restart_systemd = False
    for line in output.splitlines():
        line = line.strip()
        if line == "would restart systemd":
            restart_systemd = True
            continue
        for prefix, name in _UNIT_LINES.items():
            if line.startswith(prefix):
                units[name] += [u.strip() for u in line[len(prefix):].split(",") if u.strip()]
                break
    return DryActivation(**{name: tuple(found) for name, found in units.items()}, restart_systemd=restart_systemd)
