"""Profiles and generations on the target, through nix-env and readlink."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import EngineError
from ..models import BOOT_FILES, Generation, Retention
from ..nix.versions import NixOutputError, parse_gc_summary, parse_generations
from ..transport.process import Target


async def list_generations(target: Target, profile: str) -> list[Generation]:
    """Generations of a profile, oldest first. Empty when the profile does not exist."""
    res = await target.run(["nix-env", "-p", profile, "--list-generations"], check=False)
    if res.exit_status != 0:
        if "No such file" in res.stderr or "does not exist" in res.stderr or not res.stderr.strip():
            return []
        raise EngineError(f"cannot list generations of {profile} on {target.target}: {res.stderr.strip()}")
    try:
        entries = [(g.number, g.date, g.current) for g in parse_generations(res.stdout)]
    except NixOutputError as e:
        raise EngineError(f"cannot list generations of {profile} on {target.target}: {e}") from e
    if not entries:
        return []
    links = [f"{profile}-{n}-link" for n, _, _ in entries]
    paths = (await target.run(["readlink", "-e", "--", *links], check=False)).stdout.split()
    if len(paths) != len(entries):
        # One link vanished between the two commands; read them one by one.
        paths = [(await target.run(["readlink", "-f", "--", ln], check=False)).stdout.strip() for ln in links]
    return [Generation(n, p, cur, date) for (n, date, cur), p in zip(entries, paths, strict=True)]


async def current_generation(target: Target, profile: str) -> Generation | None:
    """The generation the profile points at, or None if there is no profile."""
    return (await read_host(target, profile)).generation


@dataclass(frozen=True)
class HostReading:
    """What a host runs, read in one round trip (a deployment's last step reads it on every host of a fleet)."""

    generation: Generation | None
    current_system: str | None = None
    nixos_version: str | None = None
    pending_boot_files: tuple[str, ...] = ()


# Labelled lines, one per fact; values reach the script as arguments. When the
# running system's boot files differ from the booted one's, the new kernel,
# initrd or modules run only after a reboot (the comparison NixOS's own
# auto-upgrade makes before `allowReboot`).
_READ_HOST = r"""
profile=$1 system=$2 version_of=$3; shift 3
printf 'link %s\n' "$(readlink -- "$profile" 2>/dev/null)"
printf 'path %s\n' "$(readlink -f -- "$profile" 2>/dev/null)"
[ "$system" = 1 ] || exit 0
current=$(readlink -e /run/current-system 2>/dev/null)
printf 'system %s\n' "$current"
of=${version_of:-$current}
[ -n "$of" ] && printf 'version %s\n' "$(cat -- "$of/nixos-version" 2>/dev/null)"
[ -e /run/booted-system ] || exit 0
for f in "$@"; do
  [ "$(readlink -f "/run/booted-system/$f")" = "$(readlink -f "/run/current-system/$f")" ] || printf 'pending %s\n' "$f"
done
"""


async def read_host(target: Target, profile: str, *, system: bool = False,
                    version_of: str | None = None) -> HostReading:
    """The profile's generation; with `system`, also /run/current-system, the NixOS version (of `version_of`,
    or of the running system) and the boot files waiting for a reboot."""
    res = await target.run(["sh", "-c", _READ_HOST, "sh", profile, "1" if system else "0", version_of or "",
                            *BOOT_FILES], check=False)
    facts: dict[str, list[str]] = {}
    for line in res.stdout.splitlines():
        label, _, value = line.partition(" ")
        facts.setdefault(label, []).append(value.strip())

    def fact(label: str) -> str | None:
        return (facts.get(label) or [""])[0] or None

    link, path = fact("link"), fact("path")
    generation = None
    if link:
        m = re.match(rf"^{re.escape(os.path.basename(profile))}-(\d+)-link$", os.path.basename(link))
        if not m or not path:
            raise EngineError(f"{profile} on {target.target} points at {link}, which is not a generation link")
        generation = Generation(int(m.group(1)), path, True)
    pending = tuple(f for f in facts.get("pending", []) if f in BOOT_FILES)
    return HostReading(generation, fact("system"), fact("version"), pending)


async def ensure_profile_dir(target: Target, profile: str) -> None:
    """The profile's directory exists and its owner can write it (for the generation links and the lock)."""
    parent = os.path.dirname(profile)
    made = await target.run(["mkdir", "-p", "--", parent], check=False)
    if made.exit_status != 0 and target.user != "root":
        # e.g. /nix/var/nix/profiles/per-user/<user> that no login created yet:
        # make it as root, owned by the profile's user.
        await target.as_user("root").run(["install", "-d", "-o", target.user, "--", parent])
    elif made.exit_status != 0:
        raise EngineError(f"cannot create {parent} on {target.target}: {made.stderr.strip()}")


async def set_profile(target: Target, profile: str, store_path: str) -> Generation:
    """Make store_path a new generation of profile (nix-env --set) and return it."""
    await ensure_profile_dir(target, profile)
    await target.run(["nix-env", "-p", profile, "--set", store_path])
    gen = await current_generation(target, profile)
    if gen is None or gen.store_path != store_path:
        raise EngineError(f"setting {profile} to {store_path} on {target.target} did not take effect")
    return gen


async def switch_generation(target: Target, profile: str, number: int) -> None:
    await target.run(["nix-env", "-p", profile, "--switch-generation", str(number)])


def doomed_generations(generations: list[Generation], retention: Retention) -> list[int]:
    """The generations `retention` lets go: all but the newest `keep`, the current one and the protected ones."""
    if retention.keep is None:
        return []
    numbers = sorted(g.number for g in generations)
    kept = set(numbers[-retention.keep:]) | set(retention.protect) | {g.number for g in generations if g.current}
    return [n for n in numbers if n not in kept]


def deployment_lock(profile: str) -> str:
    """The file whose flock says a deployment of the profile is under way (supervisor.sh takes it, by this name)."""
    return os.path.join(os.path.dirname(profile), f".{os.path.basename(profile)}.pulumi-nixos.lock")


# Under the deployments' lock, so that no deployment registers or activates a generation between the deletion and
# the boot entries; 75 when one holds it. Then the system profile's boot entries are written again from what is
# left, as `nixos-rebuild boot` does: the current generation's `switch-to-configuration boot`.
_DELETE_GENERATIONS = r"""
lock=$1 profile=$2 boot=$3; shift 3
exec 9>>"$lock" || exit 1
flock -n 9 || exit 75
nix-env -p "$profile" --delete-generations "$@" || exit 1
[ "$boot" = 1 ] || exit 0
"$profile/bin/switch-to-configuration" boot
"""
LOCKED = 75


async def delete_generations(target: Target, profile: str, numbers: list[int], *, boot_entries: bool) -> bool:
    """Delete these generations of the profile, by number (one that a later deployment adds is never among them),
    and with `boot_entries` write the boot entries again; False, with nothing done, while a deployment runs."""
    res = await target.run(["sh", "-c", _DELETE_GENERATIONS, "sh", deployment_lock(profile), profile,
                            "1" if boot_entries else "0", *(str(n) for n in numbers)], check=False)
    if res.exit_status == LOCKED:
        return False
    if res.exit_status != 0:
        raise EngineError(f"deleting generations {', '.join(map(str, numbers))} of {profile} on {target.target} "
                          f"failed: {res.stderr.strip()[-400:]}")
    return True


@dataclass(frozen=True)
class GarbageCollected:
    paths: int
    freed: str  # as Nix says it: "12.34 MiB"


async def collect_garbage(target: Target, timeout: float) -> GarbageCollected:
    """The target's garbage collector (`nix-store --gc`), for at most `timeout` seconds: what it deleted."""
    res = await target.for_store().run(["nix-store", "--gc"], timeout=timeout)
    try:
        return GarbageCollected(*parse_gc_summary(res.stdout))
    except NixOutputError as e:
        raise EngineError(f"garbage collection on {target.target}: {e}") from e


async def remove_profile(target: Target, profile: str) -> None:
    """Delete every generation and the profile link itself."""
    gens = await list_generations(target, profile)
    links = [f"{profile}-{g.number}-link" for g in gens]
    await target.run(["rm", "-f", "--", profile, *links])
