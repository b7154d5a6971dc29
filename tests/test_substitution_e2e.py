"""substituteOnDestination through the real `pulumi` CLI: the host fetches from its own binary caches first.

The lab's "upstream" cache is real: a signed `file://` cache, written with
`nix copy`, served by an HTTP server on a lab address, holding the package
part of a system (what the public cache holds of a real NixOS closure). The
hosts trust it through their own nix.conf, as NixOS hosts trust the public
cache; the deployer passes no substituter. The system's own paths (its
toplevel, /etc, the configuration's own package) are in no cache.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import labctl
import pytest
import test_binary_cache_e2e
from conftest import HostFactory, PulumiProject, current_system, in_host, write_flake
from test_binary_cache_e2e import SERVER_ADDRESS, CacheServer, closure_of, missing_on
from test_provider_e2e import connection, program

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
cache_server = test_binary_cache_e2e.cache_server  # the fixture: a signed cache served over HTTP on a lab address

FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.subst = lab.nixosConfiguration { version = "subst";
    packages = [ { name = "upstream-lib"; version = "2.1"; size = 1572864; }
                 { name = "upstream-tool"; version = "0.9"; size = 524288; }
                 { name = "own-site"; version = "1"; size = 65536; } ]; };
  packages.x86_64-linux.tool = lab.mkPackage { name = "upstream-cli"; version = "3"; size = 262144; };
}; }"""


def _store_name(path: str) -> str:
    return Path(path).name.split("-", 1)[1]


def test_hosts_fetch_what_their_caches_hold_and_get_the_rest_pushed(
        project: PulumiProject, new_host: HostFactory, cache_server: CacheServer, tmp_path: Path) -> None:
    """Unset: the host's caches offer the upstream part, the deployer pushes the rest; false: all pushed;
    caches that do not answer: one quick probe, then all pushed, and a line says so."""
    flake = write_flake(tmp_path / "flake", FLAKE)
    system = labctl.build_system("subst", Path(flake.removeprefix("path:")))
    closure = closure_of(system)
    upstream = [p for p in closure if _store_name(p).startswith(("upstream-", "linux", "initrd-linux"))]
    assert len(upstream) == 5, closure
    tool = json.loads(subprocess.run([*labctl.NIX, "build", "--no-link", "--json", f"{flake}#tool"], check=True,
                                     capture_output=True, text=True).stdout)[0]["outputs"]["out"]
    upstream.append(tool)
    subprocess.run([*labctl.NIX, "copy", "--to", f"{cache_server.upload_url}?secret-key={cache_server.secret_key_file}",
                    *upstream], check=True, capture_output=True)
    fetching, pushing_all, unanswered = new_host(), new_host(), new_host()
    labctl.trust_cache(fetching, cache_server.url, cache_server.public_key)
    labctl.trust_cache(pushing_all, cache_server.url, cache_server.public_key)
    labctl.trust_cache(unanswered, f"http://{SERVER_ADDRESS}:1/nothing-listens-here", cache_server.public_key)
    lacking = {h.name: missing_on(h, closure) for h in (fetching, pushing_all, unanswered)}
    offered = [p for p in lacking[fetching.name] if p in upstream]
    assert offered, "the host already has the upstream part: the test would prove nothing"

    machines = {"fetching": (fetching, {}), "pushingAll": (pushing_all, {"substituteOnDestination": False}),
                "unanswered": (unanswered, {})}
    resources = {name: {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"{flake}#subst", **extra}} for name, (host, extra) in machines.items()}
    # A profile takes the same way: its package is in the cache.
    resources["profile"] = {"type": "nixos:NixProfile", "properties": {
        "connection": connection(fetching), "profile": "tool", "flake": f"{flake}#tool"}}
    program(project, resources, {"profilePath": "${profile.profilePath}",
                                 **{f"{name}{k}": f"${{{name}.{k[0].lower() + k[1:]}}}" for name in resources
                                    for k in ("PushedPaths", "SubstitutedPaths")}})
    project.run("stack", "init", "dev")

    res = project.up()
    out = " ".join((res.stdout + res.stderr).split())

    for host in (fetching, pushing_all, unanswered):
        assert current_system(host) == system
    outputs = project.outputs()
    # The host fetched exactly the upstream paths it lacked; the deployer pushed only the system's own.
    said = [line for line in (res.stdout + res.stderr).splitlines() if "binary caches" in line]
    assert outputs["fetchingSubstitutedPaths"] == len(offered), (outputs, said)
    assert outputs["fetchingPushedPaths"] == len(lacking[fetching.name]) - len(offered), outputs
    assert (f"root@{fetching.address}:{fetching.port} fetched {len(offered)} of the "
            f"{len(lacking[fetching.name])} paths it lacked from its binary caches") in out, out
    # false: the cache was never asked; everything went over SSH.
    assert outputs["pushingAllSubstitutedPaths"] == 0
    assert outputs["pushingAllPushedPaths"] == len(lacking[pushing_all.name])
    # Caches that do not answer: all pushed, and the line names the cache and why.
    assert outputs["unansweredSubstitutedPaths"] == 0
    assert outputs["unansweredPushedPaths"] == len(lacking[unanswered.name])
    assert re.search(rf"root@{re.escape(unanswered.address)}:{unanswered.port}'s binary caches did not answer "
                     rf"\(http://{re.escape(SERVER_ADDRESS)}:1/nothing-listens-here: ", out), out
    assert (outputs["profileSubstitutedPaths"], outputs["profilePushedPaths"]) == (1, 0), outputs
    assert in_host(fetching, "readlink", "-f", str(outputs["profilePath"])).stdout.strip() == tool
    # Each offered NAR crossed the cache's link once: the fetching host's, not the deployer's.
    gets = Counter(r for r in cache_server.requests() if "/nar/" in r)
    assert len(gets) == len(offered) + 1 and set(gets.values()) == {1}, gets
