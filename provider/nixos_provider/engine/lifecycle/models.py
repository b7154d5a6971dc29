"""The lifecycle's terms: what a machine or profile is recorded as, what an operation is asked (a goal), and how
it fails.

A record is what the deployer knows of a host beyond the declared inputs: what runs there, how it got there,
which secret files it placed. An operation returns the new record, or raises `ConvergeFailed` carrying the record
of what runs now, so whoever keeps state never falls behind the host.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..closures.binary_cache import CacheUploads
from ..models import DeployRequest, InstallRequest, Remote
from ..nix.cli import Evaluation, FlakeRef
from ..nix.closure_diff import ClosureChanges
from ..target.secret_files import RecordedFile, SecretFile

LineFn = Callable[[str], None]


def _noop(_: str) -> None:
    pass


@dataclass(frozen=True)
class Report:
    """Where an operation's lines go, and how an engine error reads to the user (the Pulumi layer names the
    properties an error blames; the CLI prints it as it is)."""

    status: LineFn = _noop  # a step, shown while it runs
    info: LineFn = _noop  # kept in the log
    warn: LineFn = _noop  # the user should know, nothing failed
    describe: Callable[[BaseException], str] = str


@dataclass(frozen=True)
class MachineRecord:
    """A NixOS machine as recorded: the system it runs, the baseline a destroy returns to, the last deployment."""

    system_path: str | None = None
    system_derivation: str | None = None  # the derivation of system_path, when this deployer evaluated it
    generation: int | None = None
    previous_generation: int | None = None
    baseline_generation: int | None = None
    baseline_system_path: str | None = None
    host_key: str | None = None
    build_host_key: str | None = None
    nixos_version: str | None = None
    deployed_at: str | None = None
    pushed_paths: int | None = None
    pushed_bytes: int | None = None
    substituted_paths: int | None = None
    install_status: str | None = None  # "installed" | "adopted" | "failed"; None: not installed by us
    installed_at: str | None = None
    install_error: str | None = None
    needs_reboot: bool | None = None
    secret_files: tuple[RecordedFile, ...] = ()  # hashes, never contents
    secret_files_key: bytes | None = field(default=None, repr=False)  # the HMAC key of those hashes
    last_changes: Mapping[str, Any] | None = None  # the package diff of the last deployment, as shown
    pending_changes: Mapping[str, Any] | None = None  # a preview's package diff

    @property
    def installed(self) -> bool:
        return self.install_status in ("installed", "adopted")


@dataclass(frozen=True)
class ProfileRecord:
    """A Nix profile as recorded."""

    profile_path: str | None = None
    store_path: str | None = None
    generation: int | None = None
    previous_generation: int | None = None
    baseline_generation: int | None = None
    baseline_store_path: str | None = None
    host_key: str | None = None
    build_host_key: str | None = None
    deployed_at: str | None = None
    pushed_paths: int | None = None
    pushed_bytes: int | None = None
    substituted_paths: int | None = None


class ConvergeFailed(Exception):
    """The operation failed; `record` is what the host runs now.

    with_new_inputs: whether the record goes with the inputs this operation was asked to apply (a creation, an
    installation, a failure after the new system was confirmed, a change of secret files only), or with the
    previous inputs, since the new system never took over.
    """

    def __init__(self, message: str, record: MachineRecord | ProfileRecord, *, with_new_inputs: bool) -> None:
        super().__init__(message)
        self.record = record
        self.with_new_inputs = with_new_inputs


class SystemSource(Protocol):
    """What to deploy, as the caller knows to evaluate and build it (one `nix build` may serve a fleet)."""

    @property
    def store_path(self) -> str | None:
        """The output path: given, or from the evaluation that checked the inputs."""

    @property
    def evaluated(self) -> bool:
        """Whether the store path comes from evaluating a source."""

    @property
    def flake(self) -> FlakeRef | None:
        """The flake reference, when the source is one (nixos-anywhere can build it)."""

    async def evaluation(self) -> Evaluation:
        """The source's evaluation (its output and derivation), without building."""

    async def build(self) -> str:
        """Build (or realise) the system here; its output path."""


@dataclass
class Limits:
    """What the operations of one process share: SSH sessions and closure copies at once, and the binary cache
    uploads made (each closure goes to a cache once)."""

    ssh_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(8))
    transfer_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(4))
    uploads: CacheUploads = field(default_factory=CacheUploads)


@dataclass(frozen=True)
class MachineGoal:
    """What a machine is to run, and how to get it there."""

    remote: Remote  # its host key pinned when one is known
    source: SystemSource
    request: DeployRequest  # the deployment's settings; its store path, derivation and build host are decided here
    build_host: Remote | None = None  # build there, and copy to the target from there
    build_host_key: str | None = None  # the build host's key as the last deployment pinned it, for this host
    build_on_target: bool = False
    secret_files: tuple[SecretFile, ...] = field(default=(), repr=False)
    install: InstallRequest | None = None  # install (or adopt) first; its system path is the source's
    deploys: bool = True  # False: the system is as declared already; only secret files may change


@dataclass(frozen=True)
class ProfileGoal:
    """What a profile is to hold: the deployment (its remote pinned when a key is known, its profile and activate
    command) of the source's closure, built here, on the host or on a build host."""

    request: DeployRequest  # its store path, derivation and build host are decided by the converge
    source: SystemSource
    build_host: Remote | None = None
    build_host_key: str | None = None  # the build host's key as the last deployment pinned it, for this host
    build_on_target: bool = False
    deploys: bool = True  # False: the profile is as declared already


@dataclass(frozen=True)
class PreviewGoal:
    """A machine's pending deployment, as a preview knows it."""

    remote: Remote
    current: str  # what the record says runs
    current_derivation: str | None
    new: str  # what Check evaluated
    source: SystemSource | None  # None: a store path, or a source not known yet
    build_on_preview: bool = False
    built_elsewhere: bool = False  # on the target or a build host (this machine may not be able to)
    build_host: Remote | None = None
    dry_activate: bool = False


def predicted_reboot(mode: str | None, action: str | None, changes: ClosureChanges | None, *,
                     due: bool) -> tuple[bool, bool | None]:
    """Whether the previewed deployment reboots the host (`reboot`: always, or ifNeeded on the predicted boot
    changes), and whether a reboot is due after it (None: no package diff predicts it). A new kernel, initrd or
    modules run only after a reboot, and one already due stays due, unless this deployment reboots."""
    diff = changes is not None and not changes.note
    rebooting = (mode == "always" and action in (None, "switch", "boot")) or (
        mode == "ifNeeded" and diff and bool(changes and changes.boot_changes))
    if not diff or changes is None:
        return rebooting, None
    return rebooting, not rebooting and (bool(changes.boot_changes) or due)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
