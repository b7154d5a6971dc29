"""What changes between two systems, package by package (like nvd).

From one of two sources:

- **closures**: both systems are built on the deployer. `nix path-info --json
  -r` of both (Nix 2.8 lacks `nix store diff-closures --json`) gives the
  runtime closures with their sizes.
- **derivations**: nothing is built. The derivation closures (`nix-store -qR`
  of the old system's `.drv`, recorded at deploy, and of the new one's, which
  evaluation wrote) name every package and version the build would use. Fixed-
  output derivations (sources, patches) are left out: they are not packages.
  Build-time dependencies count too, and there are no sizes. The kernel,
  initrd and modules come from the toplevel's own builder, which links them
  (`ln -s <path> $out/kernel`), so a reboot is predicted before any build.

Store path names are split into name and version with Nix's own rule
(`builtins.parseDrvName`: the name ends at the first dash followed by a
digit) and versions compare the way `builtins.compareVersions` does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from functools import cmp_to_key

from ..models import BOOT_FILES
from .cli import Nix, PathInfo

CLOSURES = "closures"
DERIVATIONS = "derivations"
# Output names Nix appends to a multi-output derivation's store path.
OUTPUT_SUFFIXES = ("bin", "dev", "lib", "man", "doc", "devdoc", "info", "debug", "static", "out", "data", "python")
_HASH_PREFIX = re.compile(r"^/nix/store/[0-9a-z]{32}-")


def parse_drv_name(name: str) -> tuple[str, str]:
    """('nginx-1.24.0') -> ('nginx', '1.24.0'); ('lab-tools') -> ('lab-tools', '')."""
    for i, ch in enumerate(name):
        if ch == "-" and i + 1 < len(name) and name[i + 1].isdigit():
            return name[:i], name[i + 1:]
    return name, ""


def split_store_path(path: str) -> tuple[str, str, str]:
    """A store path -> (package name, version, output). The output is '' for the default one."""
    base = _HASH_PREFIX.sub("", path)
    name, version = parse_drv_name(base)
    output = ""
    for part in (version, name):
        for suffix in OUTPUT_SUFFIXES:
            if part.endswith("-" + suffix):
                output = suffix
                if part is version:
                    version = version[: -len(suffix) - 1]
                else:
                    name = name[: -len(suffix) - 1]
                break
        if output:
            break
    return name, version, output


def _components(version: str) -> list[str]:
    return re.findall(r"\d+|[^\d.\-]+", version)


def _cmp_component(a: str, b: str) -> int:
    if a == b:
        return 0
    a_num, b_num = a.isdigit(), b.isdigit()
    if a_num and b_num:
        return (int(a) > int(b)) - (int(a) < int(b))
    if a == "" and b_num:
        return -1
    if b == "" and a_num:
        return 1
    if a == "pre" and b != "pre":
        return -1
    if b == "pre":
        return 1
    if b_num:
        return -1
    if a_num:
        return 1
    return (a > b) - (a < b)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1, as builtins.compareVersions."""
    ca, cb = _components(a), _components(b)
    for i in range(max(len(ca), len(cb))):
        r = _cmp_component(ca[i] if i < len(ca) else "", cb[i] if i < len(cb) else "")
        if r:
            return r
    return 0


@dataclass(frozen=True)
class PackageChange:
    name: str
    before: tuple[str, ...]
    after: tuple[str, ...]
    size_delta: int


@dataclass(frozen=True)
class ClosureChanges:
    before: str
    after: str
    changed: tuple[PackageChange, ...] = ()
    added: tuple[str, ...] = ()    # "name-version"
    removed: tuple[str, ...] = ()
    size_before: int = 0
    size_after: int = 0
    paths_to_push: int = 0
    would_restart: tuple[str, ...] = field(default=())
    note: str = ""
    boot_changes: tuple[str, ...] = ()  # kernel, initrd, kernel-modules: what runs only after a reboot
    source: str = CLOSURES

    def summary(self) -> str:
        counts = (f"{len(self.changed)} version change{'s' if len(self.changed) != 1 else ''}, "
                  f"{len(self.added)} added, {len(self.removed)} removed")
        if self.source == DERIVATIONS:
            return f"{counts} (from the derivations, nothing built; build-time dependencies included)"
        delta = self.size_after - self.size_before
        return (f"{counts}; closure {_size(self.size_before)} -> "
                f"{_size(self.size_after)} ({'+' if delta >= 0 else '-'}{_size(abs(delta))}); "
                f"{self.paths_to_push} paths to push")

    def lines(self) -> list[str]:
        out = [self.summary()]
        for c in self.changed:
            size = f" ({'+' if c.size_delta >= 0 else '-'}{_size(abs(c.size_delta))})" if self.source == CLOSURES else ""
            out.append(f"  {c.name}: {', '.join(c.before) or '∅'} → {', '.join(c.after) or '∅'}{size}")
        out += [f"  + {a}" for a in self.added]
        out += [f"  - {r}" for r in self.removed]
        if self.would_restart:
            out.append(f"  would restart: {', '.join(self.would_restart)}")
        if self.boot_changes:
            out.append(f"  needs a reboot to run fully: new {', '.join(self.boot_changes)}")
        return out

    def to_output(self) -> dict[str, object]:
        return {
            "systemPathBefore": self.before, "systemPathAfter": self.after, "source": self.source,
            "changed": [{"name": c.name, "before": list(c.before), "after": list(c.after), "sizeDelta": c.size_delta}
                        for c in self.changed],
            "added": list(self.added), "removed": list(self.removed),
            "sizeBefore": self.size_before, "sizeAfter": self.size_after,
            "pathsToPush": self.paths_to_push, "wouldRestart": list(self.would_restart), "note": self.note,
            "bootChanges": list(self.boot_changes),
        }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _by_package(closure: list[PathInfo], root: str) -> dict[str, dict[str, int]]:
    """package name -> {version: total NAR size of its outputs}. The system itself is left out."""
    pkgs: dict[str, dict[str, int]] = {}
    for info in closure:
        if info.path == root:
            continue
        name, version, _output = split_store_path(info.path)
        versions = pkgs.setdefault(name, {})
        versions[version] = versions.get(version, 0) + info.nar_size
    return pkgs


def diff_closures(before_root: str, before: list[PathInfo], after_root: str, after: list[PathInfo]) -> ClosureChanges:
    old, new = _by_package(before, before_root), _by_package(after, after_root)
    changed, added, removed = _diff_packages(old, new)
    before_paths = {p.path for p in before}
    return ClosureChanges(
        before=before_root, after=after_root, changed=changed, added=added, removed=removed,
        size_before=sum(p.nar_size for p in before), size_after=sum(p.nar_size for p in after),
        paths_to_push=sum(1 for p in after if p.path not in before_paths),
    )


def _diff_packages(old: dict[str, dict[str, int]], new: dict[str, dict[str, int]],
                   ) -> tuple[tuple[PackageChange, ...], tuple[str, ...], tuple[str, ...]]:
    key = cmp_to_key(compare_versions)
    changed, added, removed = [], [], []
    for name in sorted(set(old) | set(new)):
        o, n = old.get(name, {}), new.get(name, {})
        if not o:
            added += [f"{name}-{v}" if v else name for v in sorted(n, key=key)]
        elif not n:
            removed += [f"{name}-{v}" if v else name for v in sorted(o, key=key)]
        elif set(o) != set(n) or sum(o.values()) != sum(n.values()):
            # A version change, or a rebuild of the same version that changed size.
            changed.append(PackageChange(name, tuple(sorted(o, key=key)), tuple(sorted(n, key=key)),
                                         sum(n.values()) - sum(o.values())))
    return tuple(changed), tuple(added), tuple(removed)


def boot_changes(before: str, after: str) -> tuple[str, ...]:
    """The boot files (kernel, initrd, kernel-modules) two local systems do not share: a switch from one to the
    other runs them only after a reboot. Files neither system has (not NixOS) are no change."""
    changed = []
    for name in BOOT_FILES:
        links: list[str | None] = []
        for root in (before, after):
            try:
                links.append(os.path.realpath(os.path.join(root, name), strict=True))
            except OSError:
                links.append(None)
        if links[0] != links[1]:
            changed.append(name)
    return tuple(changed)


async def closure_changes(nix: Nix, before: str, after: str) -> ClosureChanges:
    """Both closures must be valid in the local store."""
    changes = diff_closures(before, await nix.closure(before), after, await nix.closure(after))
    return replace(changes, boot_changes=boot_changes(before, after))


# -- from derivations, nothing built ---------------------------------------------------------------------

# The first output of a derivation in its ATerm file: ("out","<path>","<hash algorithm>","<hash>"). A
# fixed-output derivation (a source, a patch) has a hash; a content-addressed one only an algorithm.
_FIRST_OUTPUT = re.compile(rb'^Derive\(\[\("[^"]*","[^"]*","[^"]*","([^"]*)"\)')
# How a NixOS toplevel's builder links what only a reboot runs.
_BOOT_LINK = re.compile(rb"ln -s (/nix/store/[^ \"\\]+) \$out/(kernel-modules|kernel|initrd)(?![\w-])")


def is_fixed_output(drv_text: bytes) -> bool:
    m = _FIRST_OUTPUT.match(drv_text)
    return bool(m and m.group(1))


def boot_links(drv_text: bytes) -> dict[str, str]:
    """What a NixOS toplevel derivation links as kernel, initrd and kernel-modules ({} for a container)."""
    return {name.decode(): path.decode() for path, name in _BOOT_LINK.findall(drv_text)}


def _read_drv(path: str, limit: int | None = None) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError:
        return None


def _packages_of_derivations(drvs: list[str], root: str) -> dict[str, dict[str, int]]:
    """package name -> {version: 0} from the derivations that build packages (not sources, not the root)."""
    pkgs: dict[str, dict[str, int]] = {}
    for drv in drvs:
        if drv == root or not drv.endswith(".drv"):
            continue
        head = _read_drv(drv, 4096)
        if head is not None and is_fixed_output(head):
            continue
        name, version = parse_drv_name(_HASH_PREFIX.sub("", drv)[: -len(".drv")])
        pkgs.setdefault(name, {})[version] = 0
    return pkgs


def diff_derivations(before_root: str, before: list[str], after_root: str, after: list[str],
                     before_out: str, after_out: str) -> ClosureChanges:
    changed, added, removed = _diff_packages(_packages_of_derivations(before, before_root),
                                             _packages_of_derivations(after, after_root))
    old_boot, new_boot = (boot_links(_read_drv(root) or b"") for root in (before_root, after_root))
    boot = tuple(name for name in BOOT_FILES if old_boot.get(name) != new_boot.get(name))
    return ClosureChanges(before=before_out, after=after_out, changed=changed, added=added, removed=removed,
                          source=DERIVATIONS, boot_changes=boot)


async def derivation_changes(nix: Nix, before_drv: str, after_drv: str, before: str, after: str) -> ClosureChanges:
    """Both derivations must be valid in the local store (before: recorded at deploy; after: just evaluated)."""
    return diff_derivations(before_drv, await nix.requisites(before_drv), after_drv, await nix.requisites(after_drv),
                            before, after)
