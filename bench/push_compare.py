#!/usr/bin/env python3
"""The engine's push against `nix copy`, on loopback and on a shaped 100 Mbit/s link.

The closure is ELF payload (shared libraries and programs of this machine, as
a NixOS closure mostly is). Each run copies it into an empty target store: the
engine's push_closure (no activation), or `nix copy --to ssh://` /
`ssh-ng://` with and without `compress=true`. After each run the copied paths
are deleted on the target. Runs alternate engine, baseline, engine, ... and
the ratio is taken pair by pair, so a drifting machine speed hits both alike.

The shaped link is an htb class of 100 Mbit/s on `lo` for traffic to the
bench host's own address only (127.0.BENCH_NET.1); it is removed afterwards.

Run with `python bench/push_compare.py` as root (lab hosts need it). Settings
from the environment: BENCH_NET (the lab net, 43 unless set), PUSH_PAYLOAD_MIB
(200), PUSH_RUNS (counted runs of each setting, 3), PUSH_LINKS (which
comparisons: `loopback,100mbit`) and PUSH_COPIES (which `nix copy` settings:
all four unless set, e.g. `ssh://,ssh-ng://`).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lab"))
sys.path.insert(0, str(REPO / "tests"))
import labctl  # noqa: E402

LAB_DIR = REPO / ".lab" / "bench-push"
NET = int(os.environ.get("BENCH_NET", "43"))
ADDRESS = f"127.0.{NET}.1"
RUNS = int(os.environ.get("PUSH_RUNS", "3"))
LINKS = os.environ.get("PUSH_LINKS", "loopback,100mbit").split(",")
PAYLOAD_MIB = int(os.environ.get("PUSH_PAYLOAD_MIB", "200"))
FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.elf = lab.nixosConfiguration { version = "elf"; packages = [ (derivation {
    name = "elf-payload-1.0"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
    mib = "@MIB@";
    # Programs and libraries of this machine, concatenated into files of 4 MiB.
    args = [ "-c" ''
      mkdir -p $out/lib
      find /usr/lib /usr/bin -type f -size +64k \\( -name '*.so*' -o -perm -u+x \\) 2>/dev/null | sort \\
        | xargs cat 2>/dev/null | head -c $((mib * 1048576)) | split -b 4194304 - $out/lib/part.
    '' ];
  }) ]; };
}; }"""

PUSH_ONE = r"""
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])
from conftest import remote_for
import labctl
from nixos_provider.engine.deploy import open_target
from nixos_provider.engine.models import Profile
from nixos_provider.engine.nix.cli import Nix
from nixos_provider.engine.closures.push import choose_compression, push_closure
host = labctl.LabHost(**json.loads(sys.argv[2]))
# The provider imports asyncssh on its first connection (engine/lazy.py); load it
# before the clock starts, as in a provider process that has connected once.
import asyncssh
asyncssh.SSHClient
# argv: tests dir, host (JSON), store path, compression, and (bench/substitute.py) substituteOnDestination's policy.
async def main():
    target = await open_target(remote_for(host), Profile(), compress=sys.argv[4] == "ssh")
    try:
        how = await choose_compression(target, sys.argv[4])
        policy = sys.argv[5] if len(sys.argv) > 5 else "never"
        return await push_closure(Nix(), target, sys.argv[3], compression=how, substitute=policy)
    finally:
        await target.conn.close()
started = time.monotonic()
stats = asyncio.run(main())
print(json.dumps({"seconds": time.monotonic() - started, "bytes": stats.bytes, "wire": stats.wire_bytes,
                  "compression": stats.compression, "transport": stats.transport, "pushed": stats.paths,
                  "substituted": stats.substituted}))
"""


def shape(rate: str | None, address: str = ADDRESS) -> None:
    """Limit traffic to address on lo to rate, in htb class 1:20 (None: remove the limit)."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    if rate is None:
        return
    for cmd in (["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "10"],
                ["class", "add", "dev", "lo", "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit"],
                ["class", "add", "dev", "lo", "parent", "1:", "classid", "1:20", "htb", "rate", rate, "ceil", rate],
                ["filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "u32",
                 "match", "ip", "dst", f"{address}/32", "flowid", "1:20"]):
        subprocess.run(["tc", *cmd], check=True, capture_output=True)


def main() -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="pulumi-nixos-bench-push."))
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    labctl.down(LAB_DIR)
    rows: list[tuple[str, str]] = []
    try:
        for f in ("lib.nix", "switch-to-configuration.sh", "lab-service.py"):
            shutil.copy(labctl.LAB_FLAKE / f, work / f)
        (work / "flake.nix").write_text(FLAKE.replace("@MIB@", str(PAYLOAD_MIB)))
        system = labctl.build_system("elf", work)
        closure = subprocess.run(["nix-store", "-qR", system], check=True, capture_output=True,
                                 text=True).stdout.split()
        host = labctl.add_host(LAB_DIR, "push", ADDRESS)
        env = {**os.environ, "NIX_SSHOPTS": f"-i {host.privateKeyPath} -p {host.port} -o StrictHostKeyChecking=no "
                                            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"}

        def clean() -> None:
            # The base system stays; everything this bench copied goes.
            base = set(labctl.run(labctl.nsenter(host.state, ["nix-store", "-qR", "/nix/var/nix/profiles/system"]))
                       .stdout.split())
            extra = [p for p in closure if p not in base]
            labctl.run(labctl.nsenter(host.state, ["nix-store", "--delete", *extra]))

        def engine(how: str) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                out = subprocess.run([sys.executable, "-c", PUSH_ONE, str(REPO / "tests"), json.dumps(host.__dict__),
                                      system, how], check=True, capture_output=True, text=True).stdout
                clean()
                return json.loads(out)  # type: ignore[no-any-return]
            return run

        def nix_copy(store: str) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                started = time.monotonic()
                res = subprocess.run(["nix", "--extra-experimental-features", "nix-command", "copy", "--no-check-sigs",
                                      "--to", store.format(addr=ADDRESS), system], capture_output=True, text=True,
                                     env=env)
                if res.returncode != 0:
                    raise SystemExit(f"nix copy --to {store} failed: {res.stderr.strip()[-500:]}")
                seconds = time.monotonic() - started
                clean()
                return {"seconds": seconds}
            return run

        copies = {"ssh://": "ssh://root@{addr}", "ssh:// compress=true": "ssh://root@{addr}?compress=true",
                  "ssh-ng://": "ssh-ng://root@{addr}", "ssh-ng:// compress=true": "ssh-ng://root@{addr}?compress=true"}
        if "PUSH_COPIES" in os.environ:
            copies = {k: v for k, v in copies.items() if k in os.environ["PUSH_COPIES"].split(",")}

        def compare(label: str, ours: dict[str, Callable[[], dict[str, Any]]]) -> None:
            # Every setting of both sides, alternating; the best of each side is compared pair by pair.
            times: dict[str, list[float]] = {k: [] for k in [*ours, *copies]}
            wire: dict[str, float] = {}
            transports: set[str] = set()
            for fn in [*ours.values(), *(nix_copy(v) for v in copies.values())]:
                fn()  # warm-up
            for _ in range(RUNS):
                for name, fn in ours.items():
                    r = fn()
                    times[name].append(r["seconds"])
                    wire[name] = r.get("wire", 0) / max(r.get("bytes", 1), 1)
                    transports.add(str(r.get("transport")))
                for name, store in copies.items():
                    times[name].append(nix_copy(store)()["seconds"])
            best_ours = min(ours, key=lambda k: statistics.median(times[k]))
            best_copy = min(copies, key=lambda k: statistics.median(times[k]))
            ratios = [a / b for a, b in zip(times[best_ours], times[best_copy], strict=True)]
            detail = ", ".join(f"{k} {statistics.median(v):.1f} s" for k, v in times.items())
            rows.append((f"push {PAYLOAD_MIB} MiB ELF closure, {label}: engine ({best_ours}) vs best `nix copy` "
                         f"({best_copy})",
                         f"ratio {statistics.median(ratios):.2f}x (pairwise, min {min(ratios):.2f} max "
                         f"{max(ratios):.2f}); zstd sent {wire.get('zstd', 0):.0%} of the bytes; engine through "
                         f"{', '.join(sorted(transports))}; {detail}"))

        if "loopback" in LINKS:
            compare("loopback", {"none": engine("none"), "zstd": engine("zstd")})
        if "100mbit" in LINKS:
            shape("100mbit")
            try:
                compare("100 Mbit/s link", {"zstd": engine("zstd"), "ssh": engine("ssh"), "none": engine("none")})
            finally:
                shape(None)
    finally:
        labctl.down(LAB_DIR)
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    rows = main()
    print("| benchmark | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
