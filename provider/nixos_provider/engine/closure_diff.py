"""What changes between two system closures, package by package (like nvd).

Computed from `nix path-info --json -r` of both closures, which Nix 2.8 has
(it lacks `nix store diff-closures --json`). Store path names are split into
name and version with Nix's own rule (`builtins.parseDrvName`: the name ends
at the first dash followed by a digit) and versions compare the way
`builtins.compareVersions` does.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from functools import cmp_to_key

from .models import BOOT_FILES
from .nix import Nix, PathInfo

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

    def summary(self) -> str:
        delta = self.size_after - self.size_before
        return (f"{len(self.changed)} version change{'s' if len(self.changed) != 1 else ''}, "
                f"{len(self.added)} added, {len(self.removed)} removed; closure {_size(self.size_before)} -> "
                f"{_size(self.size_after)} ({'+' if delta >= 0 else '-'}{_size(abs(delta))}); "
                f"{self.paths_to_push} paths to push")

    def lines(self) -> list[str]:
        out = [self.summary()]
        for c in self.changed:
            out.append(f"  {c.name}: {', '.join(c.before) or '∅'} → {', '.join(c.after) or '∅'}"
                       f" ({'+' if c.size_delta >= 0 else '-'}{_size(abs(c.size_delta))})")
        out += [f"  + {a}" for a in self.added]
        out += [f"  - {r}" for r in self.removed]
        if self.would_restart:
            out.append(f"  would restart: {', '.join(self.would_restart)}")
        if self.boot_changes:
            out.append(f"  needs a reboot to run fully: new {', '.join(self.boot_changes)}")
        return out

    def to_output(self) -> dict[str, object]:
        return {
            "systemPathBefore": self.before, "systemPathAfter": self.after,
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
    before_paths = {p.path for p in before}
    return ClosureChanges(
        before=before_root, after=after_root, changed=tuple(changed), added=tuple(added), removed=tuple(removed),
        size_before=sum(p.nar_size for p in before), size_after=sum(p.nar_size for p in after),
        paths_to_push=sum(1 for p in after if p.path not in before_paths),
    )


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
