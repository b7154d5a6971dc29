#!/usr/bin/env python3
"""A closure mostly upstream: the engine's push (substituteOnDestination unset) against `nix copy --substitute-on-destination`.

What colmena and deploy-rs run to let a target fetch from its own caches is
`nix copy --substitute-on-destination --to ssh://HOST`. Here the lab host
trusts an "upstream" cache through its own nix.conf: a signed `file://` cache
that a real HTTP server on a lab address serves, holding the system's package
part (UPSTREAM_MIB of payload, 90% of the closure by default). The system's
own paths (toplevel, /etc, one package of OWN_MIB) are in no cache.

The deployer's uplink is an htb class on `lo` for traffic to the host's
address (SUBST_LINK, 100mbit unless set): the deployer's SSH stream crosses
it, the host's downloads from the cache do not (they come back to
127.0.0.1). The class's byte counter is what the deployer sent. Each run
starts from the host's base system (what the run copied is deleted after
it); runs alternate engine, `nix copy`, the engine pushing everything, ...
and the ratios are taken pair by pair.

Run with `python bench/substitute.py` as root (it starts a lab host on
127.0.BENCH_NET.1, 45 unless set). SUBST_RUNS (3) counted pairs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
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
sys.path.insert(0, str(REPO / "provider"))
import labctl  # noqa: E402
from nixos_provider.engine.nix.versions import parse_path_info  # noqa: E402
from push_compare import PUSH_ONE, shape  # noqa: E402

LAB_DIR = REPO / ".lab" / "bench-substitute"
NET = int(os.environ.get("BENCH_NET", "45"))
ADDRESS = f"127.0.{NET}.1"
CACHE_ADDRESS = f"127.0.{NET}.251"
RUNS = int(os.environ.get("SUBST_RUNS", "3"))
LINK = os.environ.get("SUBST_LINK", "100mbit")
UPSTREAM_MIB = int(os.environ.get("SUBST_UPSTREAM_MIB", "36"))
OWN_MIB = int(os.environ.get("SUBST_OWN_MIB", "4"))
PACKAGES = 6  # the upstream part, in this many packages
FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.mostly-upstream = lab.nixosConfiguration { version = "mostly-upstream";
    packages = (map (i: { name = "upstream-pkg${toString i}"; version = "1.0"; size = @EACH@; }) [ @RANGE@ ])
      ++ [ { name = "own-app"; version = "1"; size = @OWN@; } ]; };
}; }"""

def uplink_bytes() -> int:
    """Bytes sent so far through the uplink's class (push_compare.shape's 1:20)."""
    out = subprocess.run(["tc", "-s", "class", "show", "dev", "lo", "classid", "1:20"], check=True,
                         capture_output=True, text=True).stdout
    found = re.search(r"Sent (\d+) bytes", out)
    if found is None:
        raise SystemExit(f"no byte counter for the uplink class: {out}")
    return int(found.group(1))


def serve(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as s:
        s.bind((CACHE_ADDRESS, 0))
        port = int(s.getsockname()[1])
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", CACHE_ADDRESS, "--directory",
                               str(root), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not labctl.wait_for_port(CACHE_ADDRESS, port):
        raise SystemExit("the cache's HTTP server did not start")
    return server, port


def main() -> list[tuple[str, str]]:
    work = Path(tempfile.mkdtemp(prefix="pulumi-nixos-bench-substitute."))
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    labctl.down(LAB_DIR)
    rows: list[tuple[str, str]] = []
    server: subprocess.Popen[bytes] | None = None
    try:
        for f in ("lib.nix", "switch-to-configuration.sh", "lab-service.py"):
            shutil.copy(labctl.LAB_FLAKE / f, work / f)
        (work / "flake.nix").write_text(FLAKE.replace("@EACH@", str(UPSTREAM_MIB * 1048576 // PACKAGES))
                                        .replace("@RANGE@", " ".join(str(i) for i in range(PACKAGES)))
                                        .replace("@OWN@", str(OWN_MIB * 1048576)))
        system = labctl.build_system("mostly-upstream", work)
        info = parse_path_info(subprocess.run([*labctl.NIX, "path-info", "--json", "--recursive", system],
                                              check=True, capture_output=True, text=True).stdout)
        sizes = {path: p.nar_size for path, p in info.items()}
        upstream = [p for p in sizes if Path(p).name.split("-", 1)[1].startswith(("upstream-", "linux",
                                                                                   "initrd-linux"))]
        share = sum(sizes[p] for p in upstream) / sum(sizes.values())
        keys = work / "keys"
        keys.mkdir()
        subprocess.run(["nix-store", "--generate-binary-cache-key", "upstream-1", str(keys / "secret"),
                        str(keys / "public")], check=True)
        cache = work / "served" / "cache"
        subprocess.run([*labctl.NIX, "copy", "--to", f"file://{cache}?secret-key={keys / 'secret'}", *upstream],
                       check=True, capture_output=True)
        server, port = serve(cache.parent)
        host = labctl.add_host(LAB_DIR, "subst", ADDRESS)
        labctl.trust_cache(host, f"http://{CACHE_ADDRESS}:{port}/cache", (keys / "public").read_text().strip())
        env = {**os.environ, "NIX_SSHOPTS": f"-i {host.privateKeyPath} -p {host.port} -o StrictHostKeyChecking=no "
                                            "-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"}
        base = set(labctl.run(labctl.nsenter(host.state, ["nix-store", "-qR", "/nix/var/nix/profiles/system"]))
                   .stdout.split())

        def clean() -> None:
            extra = [p for p in sizes if p not in base]
            labctl.run(labctl.nsenter(host.state, ["nix-store", "--delete", *extra]))

        def measured(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
            before = uplink_bytes()
            result = run()
            result["uplink"] = uplink_bytes() - before
            missing = labctl.run(labctl.nsenter(host.state, ["nix-store", "--check-validity", "--print-invalid",
                                                             system]), check=False).stdout.split()
            if missing:
                raise SystemExit(f"the host lacks {system} after the run")
            clean()
            return result

        def engine(policy: str = "auto") -> dict[str, Any]:
            out = subprocess.run([sys.executable, "-c", PUSH_ONE, str(REPO / "tests"), json.dumps(host.__dict__),
                                  system, "auto", policy], check=True, capture_output=True, text=True).stdout
            return json.loads(out)  # type: ignore[no-any-return]

        def nix_copy() -> dict[str, Any]:
            started = time.monotonic()
            res = subprocess.run([*labctl.NIX, "copy", "--substitute-on-destination", "--no-check-sigs",
                                  "--to", f"ssh://root@{ADDRESS}", system], capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"nix copy failed: {res.stderr.strip()[-500:]}")
            return {"seconds": time.monotonic() - started}

        shape(LINK, ADDRESS)
        measured(engine), measured(nix_copy)  # warm-up: connections, the host's narinfo cache
        ours: list[dict[str, Any]] = []
        theirs: list[dict[str, Any]] = []
        never: list[dict[str, Any]] = []
        for _ in range(RUNS):
            ours.append(measured(engine))
            theirs.append(measured(nix_copy))
            never.append(measured(lambda: engine("never")))
        times = [a["seconds"] / b["seconds"] for a, b in zip(ours, theirs, strict=True)]
        sent = [a["uplink"] / b["uplink"] for a, b in zip(ours, theirs, strict=True)]
        mib = 1048576
        rows.append((
            f"deploy a closure {share:.0%} upstream ({sum(sizes.values()) / mib:.0f} MiB) over a {LINK} uplink: "
            f"engine (substituteOnDestination unset) vs `nix copy --substitute-on-destination --to ssh://`",
            f"time {statistics.median(a['seconds'] for a in ours):.2f} s vs "
            f"{statistics.median(b['seconds'] for b in theirs):.2f} s: **{statistics.median(times):.2f}x** "
            f"(pairwise min {min(times):.2f}, max {max(times):.2f}); uplink bytes "
            f"{statistics.median(a['uplink'] for a in ours) / mib:.2f} MiB vs "
            f"{statistics.median(b['uplink'] for b in theirs) / mib:.2f} MiB: **{statistics.median(sent):.2f}x**; "
            f"the engine pushed {ours[-1]['pushed']} paths, the host fetched {ours[-1]['substituted']}"))
        slower = [c["seconds"] / b["seconds"] for c, b in zip(never, theirs, strict=True)]
        rows.append((
            "the same with `substituteOnDestination: false` (everything pushed; the default until this version) "
            "vs the same `nix copy`",
            f"time {statistics.median(c['seconds'] for c in never):.2f} s: **{statistics.median(slower):.2f}x**; "
            f"uplink bytes {statistics.median(c['uplink'] for c in never) / mib:.2f} MiB"))
    finally:
        shape(None)
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        labctl.down(LAB_DIR)
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    rows = main()
    print("| benchmark | result |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
