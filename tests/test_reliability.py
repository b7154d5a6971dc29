"""Issue 13: the defects found under faults and hostile input, each through the real parts."""

from __future__ import annotations

import labctl
import pytest
from conftest import PulumiProject, in_host, remote_for
from nixos_provider.engine import deploy as engine
from nixos_provider.engine.errors import EngineError
from nixos_provider.engine.models import HealthCheck
from test_provider_e2e import machine, program, strip_ansi

pytestmark = [pytest.mark.timeout(600)]

# Each payload, were it ever pasted into a shell, creates its marker file on the target.
HOSTILE_HOSTS = {
    "/tmp/pwned-semicolon": "127.0.0.1/80; touch /tmp/pwned-semicolon; echo",
    "/tmp/pwned-dollar": "$(touch /tmp/pwned-dollar)",
    "/tmp/pwned-backtick": "`touch /tmp/pwned-backtick`",
}


def exists_on(host: labctl.LabHost, path: str) -> bool:
    return in_host(host, "test", "-e", path, check=False).returncode == 0


# -- 1. shell injection through a health check -------------------------------------


async def test_a_hostile_health_check_host_is_never_executed_by_the_engine(lab_host: labctl.LabHost) -> None:
    for marker, host in HOSTILE_HOSTS.items():
        check = HealthCheck(tcp=lab_host.httpPort, host=host, retries=0, timeout=3)
        with pytest.raises(EngineError, match="connection refused or timed out"):
            await engine.check_health(remote_for(lab_host), (check,))
        assert not exists_on(lab_host, marker), f"{host!r} was executed on the target"
    # The probe itself still works on a real host and port.
    await engine.check_health(remote_for(lab_host), (HealthCheck(tcp=lab_host.httpPort, host=lab_host.address),))


def test_check_refuses_a_hostile_health_check_host(project: PulumiProject, lab_host: labctl.LabHost) -> None:
    checks = [{"tcp": lab_host.httpPort, "host": host} for host in HOSTILE_HOSTS.values()]
    program(project, {"web": machine(lab_host, "web", healthChecks=checks)})
    project.run("stack", "init", "dev")
    res = project.up(check=False)
    out = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0
    for i in range(len(checks)):
        assert f"property healthChecks[{i}].host value" in out, out
    assert "is not a host name or IP address" in out
    assert "Traceback" not in out
    for marker in HOSTILE_HOSTS:
        assert not exists_on(lab_host, marker)
    # Refused before anything reached the host: it still runs its first generation.
    assert in_host(lab_host, "readlink", "/nix/var/nix/profiles/system").stdout.strip() == "system-1-link"



