"""What a host runs before and after an install, and which host key the installed system will present."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import EngineError, Setting
from ..lazy import lazy_module
from ..models import SYSTEM_PROFILE, Generation, InstallRequest, Profile, Remote
from ..transport.host_keys import normalize_host_key
from ..transport.process import Target
from ..transport.ssh import connect

if TYPE_CHECKING:
    import asyncssh

    from .. import deploy
else:
    asyncssh = lazy_module("asyncssh")
    # The deployment code loads when a host is probed, not when the provider
    # starts: Check imports this package for `install.source`.
    deploy = lazy_module("nixos_provider.engine.deploy")

HOST_KEY_FILE = "/etc/ssh/ssh_host_ed25519_key"
_SYSTEM = Profile(SYSTEM_PROFILE)


@dataclass(frozen=True)
class HostProbe:
    host_key: str
    is_nixos: bool
    is_installer: bool
    current_system: str | None
    generation: Generation | None
    nixos_version: str | None

    @property
    def installed(self) -> bool:
        """Runs an installed NixOS (not the installer, not another distribution)."""
        return self.is_nixos and not self.is_installer and self.current_system is not None

    def describe(self) -> str:
        if self.installed:
            gen = f" (generation {self.generation.number})" if self.generation else ""
            return f"runs NixOS {self.current_system}{gen}"
        if self.is_installer:
            return "runs the NixOS installer"
        return "does not run NixOS"


def parse_os_release(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip('"')
    return fields


async def probe(remote: Remote) -> HostProbe:
    """Connect (pinning remote.host_key, or trusting the first key) and read what the host runs."""
    conn = await connect(remote)
    try:
        target = Target(conn, None)  # all of it is world-readable: no sudo before we know there is one
        release = parse_os_release((await target.run(["cat", "/etc/os-release"], check=False)).stdout)
        is_nixos = release.get("ID") == "nixos" or "nixos" in release.get("ID_LIKE", "").split()
        state = await deploy.read_target_state(target, _SYSTEM)
        return HostProbe(conn.host_key, is_nixos, release.get("VARIANT_ID") == "installer", state.current_system,
                         state.generation, state.nixos_version)
    finally:
        await conn.close()


def public_key_of(private_key: str) -> str:
    key = asyncssh.import_private_key(private_key)
    return key.export_public_key("openssh").decode().strip()


def expected_host_key(req: InstallRequest, before: str | None) -> tuple[str | None, str]:
    """The host key the installed system will present, and where we know it from."""
    if req.remote.host_key:
        return normalize_host_key(req.remote.host_key), Setting.HOST_KEY.value
    for path, content in req.extra_files:
        if path == HOST_KEY_FILE:
            try:
                return public_key_of(content), f"the {HOST_KEY_FILE} placed among the install's extra files"
            except (asyncssh.KeyImportError, ValueError) as e:
                raise EngineError(f"the install's extra file {HOST_KEY_FILE} is not a private key: {e}") from e
    if req.copy_host_keys and before:
        return before, "the host keys copied from the installer"
    return None, "first use after the reboot"
