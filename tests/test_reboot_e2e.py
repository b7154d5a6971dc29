"""`reboot`: the new generation is booted once, and kept only when the host booted it and is healthy (issue #26,
part 1), through the real `pulumi` CLI on systemd lab hosts.

A container restart is the reboot (`systemctl reboot` inside; the lab boots the container again). The lab's boot
loader honours a default entry (the profile's generation, `switch-to-configuration boot`) and a one-shot entry
(`bootctl set-oneshot`, used up by the next boot), as systemd-boot does, or, for the `web-grub*` systems, GRUB's
`next_entry` (`grub-reboot`, named by the titles in a grub.cfg written as NixOS writes it): tests/lab/systemd/lab-boot.sh.
"""

from __future__ import annotations

from typing import Any

import labctl
import pytest
from conftest import HostFactory, PulumiProject, Systems, current_system, http_version, in_host
from test_provider_e2e import machine, program, strip_ansi

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.timeout(600),
    pytest.mark.skipif(labctl.systemd_unavailable() is not None,
                       reason=f"systemd lab hosts cannot run here: {labctl.systemd_unavailable()}"),
]
OUTPUTS = {"systemPath": "${web.systemPath}", "generation": "${web.generation}", "needsReboot": "${web.needsReboot}"}


def booted(host: labctl.LabHost) -> str:
    return in_host(host, "readlink", "/run/booted-system").stdout.strip()


def boot_id(host: labctl.LabHost) -> str:
    return in_host(host, "cat", "/proc/sys/kernel/random/boot_id").stdout.strip()


def boot_default(host: labctl.LabHost) -> str:
    return in_host(host, "readlink", "/etc/lab/boot-default").stdout.strip()


def profile_link(host: labctl.LabHost) -> str:
    return in_host(host, "readlink", "/nix/var/nix/profiles/system").stdout.strip()


def generations(host: labctl.LabHost) -> list[str]:
    return sorted(in_host(host, "sh", "-c", "ls /nix/var/nix/profiles | grep -E '^system-[0-9]+-link$'")
                  .stdout.split())


def deployed(project: PulumiProject, host: labctl.LabHost, config: str, **props: Any) -> None:
    program(project, {"web": machine(host, config, confirmTimeout=10, **props)}, OUTPUTS)


def failed_up(project: PulumiProject) -> str:
    """A `pulumi up` that fails, as a person reads it."""
    failed = project.up(check=False)
    out = strip_ansi(failed.stdout + failed.stderr)
    assert failed.returncode != 0 and "Traceback" not in out, out
    return out


@pytest.fixture
def web_host(project: PulumiProject, new_host: HostFactory, systems: Systems) -> labctl.LabHost:
    """A systemd host that runs `web` as generation 2 (no reboot needed: its kernel is base's)."""
    host = new_host("systemd")
    deployed(project, host, "web", reboot="ifNeeded")
    project.run("stack", "init", "dev")
    first = boot_id(host)
    project.up()
    assert current_system(host) == systems["web"] and boot_id(host) == first  # switched, not rebooted
    return host


def test_a_new_kernel_is_booted_once_then_kept_as_the_default(
        project: PulumiProject, web_host: labctl.LabHost, systems: Systems) -> None:
    host, before = web_host, boot_id(web_host)
    deployed(project, host, "web-kernel", reboot="ifNeeded",
             healthChecks=[{"http": f"http://{host.address}:8080/"}])
    preview = strip_ansi(project.run("preview").stdout)
    assert "needs a reboot to run fully: new kernel" in preview, preview
    assert "reboots into it once, and keeps it only when it boots and passes its health checks" in preview, preview
    assert boot_id(host) == before  # a preview reboots nothing
    up = strip_ansi(project.up().stdout)
    assert "rebooting" in up and "into generation 3 (once)" in up, up
    assert boot_id(host) != before
    assert booted(host) == current_system(host) == systems["web-kernel"] and http_version(host) == "kernel"
    # Kept: the profile's generation and the default boot entry; nothing is pending any more.
    assert profile_link(host) == "system-3-link" and boot_default(host) == systems["web-kernel"]
    assert project.outputs() == {"systemPath": systems["web-kernel"], "generation": 3, "needsReboot": False}
    # The next boot (a power cycle) boots it again: it is the default now.
    labctl.boot(host)
    assert booted(host) == systems["web-kernel"]


def test_a_reboot_that_fails_its_health_check_reboots_into_the_default(
        project: PulumiProject, web_host: labctl.LabHost, systems: Systems) -> None:
    host = web_host
    deployed(project, host, "web-http-500", reboot="always",
             healthChecks=[{"http": f"http://{host.address}:8080/", "retries": 1, "interval": 1}])
    out = failed_up(project)
    assert "after rebooting into" in out and "generation 3 was removed" in out, out
    assert "Rebooted: the host runs generation 2" in out, out
    assert booted(host) == current_system(host) == boot_default(host) == systems["web"]
    assert profile_link(host) == "system-2-link" and "system-3-link" not in generations(host)
    outputs = project.resource("NixosMachine")["outputs"]
    assert outputs["systemPath"] == systems["web"] and outputs["generation"] == 2


def test_a_host_that_does_not_come_back_boots_the_default_next_time(
        project: PulumiProject, web_host: labctl.LabHost, systems: Systems) -> None:
    host = web_host
    # The new system moves sshd to another port: after its boot the deployer never reaches the host.
    deployed(project, host, "web-moves-ssh", reboot="always", rebootTimeout=15)
    out = failed_up(project)
    assert "did not come back within 15 s of rebooting into" in out, out
    assert "the next boot, or a power cycle, brings the host back on generation 2" in out, out
    # The state says what the host will run; the default entry never moved.
    outputs = project.resource("NixosMachine")["outputs"]
    assert outputs["systemPath"] == systems["web"] and outputs["generation"] == 2
    assert boot_default(host) == systems["web"]
    labctl.boot(host)  # the power cycle
    assert booted(host) == current_system(host) == systems["web"]
    project.run("refresh", "--yes", "--skip-preview")
    assert project.resource("NixosMachine")["outputs"]["systemPath"] == systems["web"]


def test_a_boot_that_never_finishes_is_rebooted_into_the_default(
        project: PulumiProject, web_host: labctl.LabHost, systems: Systems) -> None:
    host = web_host
    # Its boot-time activation takes 20 s: longer than the reboot may take here.
    deployed(project, host, "web-slow", reboot="always", rebootTimeout=10)
    out = failed_up(project)
    assert "came back, but its boot did not finish within 10 s" in out and "Rebooted: the host runs generation 2" in out, out
    assert booted(host) == current_system(host) == systems["web"] and http_version(host) == "1"
    assert profile_link(host) == "system-2-link"


def test_check_refuses_a_reboot_without_a_boot_entry(project: PulumiProject, new_host: HostFactory) -> None:
    host = new_host()
    deployed(project, host, "web", reboot="sometimes", rebootTimeout=1)
    project.run("stack", "init", "dev")
    out = strip_ansi(project.run("preview", check=False).stdout)
    assert "property reboot value" in out and "must be one of 'never', 'ifNeeded', 'always'" in out, out
    assert "property rebootTimeout value" in out and "must be between 10 and 86400 seconds" in out, out
    deployed(project, host, "web", reboot="always", action="test")
    out = strip_ansi(project.run("preview", check=False).stdout)
    assert "`test` activates without a boot entry" in out, out


def grub(host: labctl.LabHost, *argv: str) -> str:
    return in_host(host, *argv).stdout


def test_grub_boots_the_new_generation_once_with_grub_reboot(
        project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    """GRUB as NixOS installs it: the one-shot entry is next_entry in grubenv (grub-reboot), named by grub.cfg's
    titles; kept, it becomes the default entry; failing its check, the host reboots into the default."""
    host = new_host("systemd")
    deployed(project, host, "web-grub", reboot="ifNeeded")
    project.run("stack", "init", "dev")
    project.up()  # base's kernel: switched, and from now on GRUB writes the menu
    assert current_system(host) == systems["web-grub"]
    checks = [{"http": f"http://{host.address}:8080/", "retries": 1, "interval": 1}]

    before = boot_id(host)
    deployed(project, host, "web-grub-kernel", reboot="ifNeeded", healthChecks=checks)
    up = strip_ansi(project.up().stdout)
    assert "into generation 3 (once)" in up, up
    assert boot_id(host) != before
    assert booted(host) == current_system(host) == systems["web-grub-kernel"] and http_version(host) == "grub-kernel"
    # Kept: the menu's default entry boots it, and no one-shot entry is left.
    cfg = grub(host, "cat", "/boot/grub/grub.cfg")
    assert f'menuentry "NixOS" --class nixos --unrestricted {{\n  linux {systems["web-grub-kernel"]}/kernel' in cfg, cfg
    assert "next_entry=" not in grub(host, "cat", "/boot/grub/grubenv")
    assert profile_link(host) == "system-3-link"

    deployed(project, host, "web-grub-500", reboot="ifNeeded", healthChecks=checks)
    out = failed_up(project)
    assert "after rebooting into" in out and "generation 4 was removed" in out, out
    assert "Rebooted: the host runs generation 3" in out, out
    assert booted(host) == current_system(host) == systems["web-grub-kernel"]
    assert profile_link(host) == "system-3-link" and "system-4-link" not in generations(host)
    assert "Configuration 4 " not in grub(host, "cat", "/boot/grub/grub.cfg")


def test_a_host_without_a_one_shot_entry_is_refused_before_anything_changes(
        project: PulumiProject, new_host: HostFactory, systems: Systems) -> None:
    host = new_host()  # a namespace host: no systemd, so no boot loader's one-shot entry to trust
    before = current_system(host)
    deployed(project, host, "web", reboot="always")
    project.run("stack", "init", "dev")
    out = " ".join(failed_up(project).split())
    assert f"cannot reboot root@{host.address}:{host.port} into {systems['web']} with a way back: systemd does not " \
           "run on it; a one-shot boot entry needs systemd-boot or GRUB. Nothing was changed" in out, out
    assert current_system(host) == before and generations(host) == ["system-1-link"]
