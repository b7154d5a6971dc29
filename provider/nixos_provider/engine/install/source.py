"""What nixos-anywhere installs from: a prebuilt disko script and system, or a flake it builds.

Both are built on the deployer when they can be, so a broken configuration
fails before the host is touched. The caller builds the system itself (its
build is shared with the deployment that follows); this module decides what
else to build and what nixos-anywhere is given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from ..errors import DiskoScriptFailed, EngineError, NoNixosConfiguration
from ..models import INSTALL_PHASES
from ..nix.cli import DISKO_SCRIPT, FlakeRef, Nix

StatusFn = Callable[[str], None]


@dataclass(frozen=True)
class InstallSource:
    """Exactly one is set: a built disko script (nixos-anywhere takes it with the system
    as `--store-paths`), or the flake attribute of the system for nixos-anywhere to build."""

    disko_script: str | None = None
    flake: str | None = None


async def install_source(nix: Nix, *, build_system: Callable[[], Awaitable[str]], status: StatusFn,
                         disko_script: str | None, flake: FlakeRef | None, build_on_target: bool,
                         phases: Sequence[str] = ()) -> InstallSource:
    """Build what nixos-anywhere needs from the deployer, and say what it is given.

    disko_script: a prebuilt disko script (realised here if it is not in the
    store); else flake is the system's reference, whose configuration's disko
    script is built unless `disko` is not among the phases.
    """
    if disko_script:
        await build_system()
        if not await nix.is_valid(disko_script):
            status(f"realising {disko_script}")
            await nix.build(disko_script)
        return InstallSource(disko_script=disko_script)
    assert flake is not None, "a flake or a disko script"
    system, disko = flake.system, flake.build_product(DISKO_SCRIPT)
    if system is None or disko is None:
        raise NoNixosConfiguration(flake)
    if build_on_target:
        return InstallSource(flake=str(system))  # nixos-anywhere builds it on the target
    await build_system()
    if "disko" not in (phases or INSTALL_PHASES):
        return InstallSource(flake=str(system))
    status(f"building {disko}")
    try:
        return InstallSource(disko_script=await nix.build(disko))
    except EngineError as e:
        raise DiskoScriptFailed(e) from e
