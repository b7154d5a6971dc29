"""Let the target fetch what its own binary caches hold, before anything is pushed.

A real NixOS closure is mostly on the public cache: fetching that part from
there spares the deployer's uplink. Nix decides, on the target, what its
configured substituters offer. `nix-store --realise` of the missing paths
first prints which "will be fetched" apart from those it "don't know how to
build" (after asking each cache for their narinfo: what `nix copy
--substitute-on-destination` has the target do), then fetches. A path that no
cache holds fails the command, and without `--keep-going` that failure can
cancel the fetches still under way (seen on every Nix of the matrix), hence
`--keep-going`. The same command then lists what is still missing: that is
what gets pushed. One command, one round trip.

In "auto" mode each download gets two attempts and a short connect timeout, so
a host whose caches cannot be reached (an air-gapped fleet keeping the default
cache.nixos.org) costs about 0.3 s, not Nix's five attempts per cache with
back-off (about 4.5 s each). Two, not one: Nix turns a cache off for the rest
of the command after a failed download, without a word, and its paths then
read as "don't know how to build"; a second attempt rides out a dropped
connection.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..models import SubstitutePolicy
from ..transport.process import PATHS_PER_COMMAND, Target

# "auto": two attempts per download, each connected within this many seconds.
AUTO_CONNECT_TIMEOUT = 5
AUTO_OPTIONS = ["--option", "download-attempts", "2", "--option", "connect-timeout", str(AUTO_CONNECT_TIMEOUT)]
FETCH_TIMEOUT = 1800.0

_FETCHED = re.compile(r"^(?:this path|these \d+ paths) will be fetched(?: \((?P<size>[\d.]+) (?P<unit>[KMGT]i?B) download)?")
# The last word on a cache that did not answer (the attempts before it end in "; retrying in N ms").
_UNREACHABLE = re.compile(r"^warning: unable to download '(?P<url>[^']*)/nix-cache-info': (?P<why>[^\n]*)$", re.M)
_UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


@dataclass(frozen=True)
class Offer:
    """What the target's caches offer of the paths it lacks."""

    paths: tuple[str, ...]  # in the order they were asked for
    download_bytes: int  # as Nix estimated it (compressed NARs)
    unreachable: tuple[str, ...] = ()  # "url: why" of each cache that did not answer


def parse_realise_summary(output: str) -> Offer:
    """The paths `nix-store --realise` says it will fetch, and the caches it could not reach.

    Before it starts, Nix prints (on stderr, the same words from 2.8 to 2.34,
    and as `--dry-run` prints them) a header per kind of work, each followed
    by its paths indented by two spaces.
    """
    paths: list[str] = []
    size = 0.0
    in_fetched = False
    for line in output.splitlines():
        if line.startswith("  /"):
            if in_fetched:
                paths.append(line.strip())
            continue
        header = _FETCHED.match(line)
        in_fetched = header is not None
        if header is not None and header["size"]:
            size += float(header["size"]) * _UNITS.get(header["unit"], 1 << 20)
    unreachable = tuple(dict.fromkeys(f"{m['url']}: {m['why'].strip()}" for m in _UNREACHABLE.finditer(output)))
    return Offer(tuple(paths), int(size), unreachable)


# One batch of the closure (PATHS_PER_COMMAND paths), one round trip. stdout: the paths the target
# lacked, a line "--", then those it still lacks; stderr: Nix's account of
# what it fetched. Derivations (a closure pushed for a build on the target)
# are left out of the realise, which would build them. Store paths hold no
# blanks, and `set -f` keeps a `?` in one from being expanded.
_FETCH_SCRIPT = """set -f
lacked=$(nix-store --check-validity --print-invalid "$@") || exit 1
printf '%s\\n--\\n' "$lacked"
outputs=$(printf '%s\\n' "$lacked" | grep -v '[.]drv$')
[ -n "$outputs" ] || {{ printf '%s\\n' "$lacked"; exit 0; }}
nix-store --realise --keep-going {options} $outputs >/dev/null
exec nix-store --check-validity --print-invalid $lacked
"""
_FETCH_SCRIPTS: dict[SubstitutePolicy, str] = {
    "auto": _FETCH_SCRIPT.format(options=" ".join(AUTO_OPTIONS)),
    "always": _FETCH_SCRIPT.format(options=""),
}


# One fetch per host at a time (deployments of one provider process: a machine and its profiles). In the lab, a
# machine and a profile of one host fetching at once from a cache neither had used made one of them answer "don't
# know how to build" for paths whose narinfos the cache had just served (Nix 2.8, about one run in five; the
# likeliest cause is the narinfo disk cache both were filling). Not seen since the fetches take turns. Their
# downloads share the host's link anyway.
# Keyed by the event loop too: a lock belongs to the loop it first waited in.
_HOST_LOCKS: dict[tuple[asyncio.AbstractEventLoop, str], asyncio.Lock] = {}


@dataclass(frozen=True)
class Fetched:
    """What one fetch did: the paths the target lacked, what its caches offered, and what it still lacks.

    unasked: the paths of the batches after one whose caches did not answer, not looked at (they will not answer
    the next batch either); what the target lacks of them is still to be found out.
    """

    lacked: tuple[str, ...]
    offer: Offer
    still_missing: tuple[str, ...]
    unasked: tuple[str, ...] = ()


async def fetch_missing(target: Target, paths: Sequence[str], policy: SubstitutePolicy) -> Fetched:
    """Find what the target lacks of paths and let it realise that from its binary caches, in one go.

    What it could not fetch is left missing, for the push.
    """
    host = (asyncio.get_running_loop(), target.target.rpartition("@")[2])
    async with _HOST_LOCKS.setdefault(host, asyncio.Lock()):
        return await _fetch_missing(target, paths, _FETCH_SCRIPTS["auto" if policy == "auto" else "always"])


async def _fetch_missing(target: Target, paths: Sequence[str], script: str) -> Fetched:
    lacked: set[str] = set()
    found: list[str] = []
    size = 0
    unreachable: list[str] = []
    still: set[str] = set()
    unasked: Sequence[str] = ()
    for i in range(0, len(paths), PATHS_PER_COMMAND):
        if unreachable and not found:
            unasked = paths[i:]
            break
        batch = list(paths[i:i + PATHS_PER_COMMAND])
        res = await target.run(["sh", "-c", script, "sh", *batch], timeout=FETCH_TIMEOUT)
        before, _, after = res.stdout.partition("\n--\n")
        asked = set(batch)
        lacked.update(p for p in before.split() if p in asked)
        still.update(p for p in after.split() if p in asked)
        offer = parse_realise_summary(res.stderr)
        found += offer.paths
        size += offer.download_bytes
        unreachable += [u for u in offer.unreachable if u not in unreachable]
    wanted = set(found)
    return Fetched(tuple(p for p in paths if p in lacked), Offer(tuple(p for p in paths if p in wanted), size,
                                                                 tuple(unreachable)),
                   tuple(p for p in paths if p in still), tuple(unasked))
