"""Frozen models the engine passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SYSTEM_PROFILE = "/nix/var/nix/profiles/system"

Action = Literal["switch", "boot", "test", "dry-activate"]


@dataclass(frozen=True)
class Credentials:
    private_key: str | None = field(default=None, repr=False)
    private_key_password: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    agent_socket_path: str | None = None
    # Not an SSH credential: what sudo on the host asks the SSH user for
    # (sent on sudo's stdin, see process.PasswordSudo).
    sudo_password: str | None = field(default=None, repr=False)

    @property
    def empty(self) -> bool:
        """No SSH credential at all (sudo_password is none)."""
        return not (self.private_key or self.password or self.agent_socket_path)


@dataclass(frozen=True)
class Remote:
    """How to reach one host over SSH (pulumi-command's Connection, as a model)."""

    host: str
    port: int = 22
    user: str = "root"
    credentials: Credentials = field(default_factory=Credentials)
    host_key: str | None = None
    proxy: Remote | None = None
    connect_timeout: float = 15.0
    retries: int = 3

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Profile:
    """A Nix profile on the target and the user that owns it (None: the SSH user)."""

    path: str = SYSTEM_PROFILE
    user: str | None = None

    @property
    def is_system(self) -> bool:
        return self.path == SYSTEM_PROFILE


@dataclass(frozen=True)
class Generation:
    number: int
    store_path: str
    current: bool = False
    date: str = ""


Compression = Literal["auto", "zstd", "ssh", "none"]
COMPRESSIONS: tuple[Compression, ...] = ("auto", "zstd", "ssh", "none")
# Whether the target fetches from its own binary caches first (substitution.py):
# "auto" asks them with a short timeout, "always" with the target's own settings.
SubstitutePolicy = Literal["auto", "always", "never"]


@dataclass(frozen=True)
class PushStats:
    paths: int = 0
    bytes: int = 0  # of the export stream (NARs), before compression
    seconds: float = 0.0
    missing_before: int = 0
    wire_bytes: int = 0  # what went into the SSH channel: less than `bytes` with zstd
    compression: str = "none"  # what the push used: "zstd", "ssh" or "none"
    transport: str = ""  # what carried it: "openssh" (the `ssh` client) or "connection" (the provider's own)
    substituted: int = 0  # paths the target fetched from its own binary caches instead


@dataclass(frozen=True)
class BinaryCache:
    """A Nix binary cache the deployer uploads closures to once, and targets substitute from.

    url is where targets fetch from (their substituter); upload_url, when set,
    is where the deployer writes (`file:///srv/cache` behind the HTTP server
    at url, `s3://...`), else url itself. The signing key comes as its content
    (a secret) or as a file on the deployer; with neither, paths are uploaded
    unsigned and only a cache that signs them itself can serve them.
    """

    url: str
    public_key: str
    upload_url: str | None = None
    signing_key: str | None = field(default=None, repr=False)
    signing_key_file: str | None = None

    @property
    def write_url(self) -> str:
        return self.upload_url or self.url


@dataclass(frozen=True)
class HealthCheck:
    command: str | None = None
    http: str | None = None
    tcp: int | None = None
    host: str = "127.0.0.1"
    timeout: float = 10.0
    retries: int = 3
    interval: float = 2.0
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.command is not None:
            return f"command `{self.command}`"
        if self.http is not None:
            return f"HTTP {self.http}"
        return f"TCP {self.host}:{self.tcp}"


# The defaults of every deployment; schema.json documents the same values (a test holds them equal).
CONFIRM_TIMEOUT = 30.0  # magic rollback: how long the host waits for the deployer's token
ACTIVATION_TIMEOUT = 240.0  # how long activation (or a rollback's re-activation) may take
GC_TIMEOUT = 600.0  # collectGarbage: how long the target's garbage collector may run
REBOOT_TIMEOUT = 600.0  # reboot: how long the host may take to go down, boot and settle

# reboot: "ifNeeded" when the new system's kernel, initrd or modules differ from the booted ones (needsReboot's rule)
RebootMode = Literal["never", "ifNeeded", "always"]


@dataclass(frozen=True)
class Retention:
    """What a confirmed deployment leaves of the profile's older generations, and of the target's store."""

    keep: int | None = None  # the newest generations kept (the new one among them); None keeps every one
    protect: tuple[int, ...] = ()  # kept whatever their age: the baseline that a destroy returns to
    collect_garbage: bool = False  # then run the target's garbage collector, for at most gc_timeout
    gc_timeout: float = GC_TIMEOUT


@dataclass(frozen=True)
class DeployRequest:
    remote: Remote
    store_path: str
    profile: Profile = field(default_factory=Profile)
    action: Action = "switch"
    magic_rollback: bool = True
    confirm_timeout: float = CONFIRM_TIMEOUT
    activation_timeout: float = ACTIVATION_TIMEOUT
    auto_rollback: bool = True
    health_checks: tuple[HealthCheck, ...] = ()
    activate_command: str | None = None  # NixProfile: run after switching the profile
    substitute_on_destination: SubstitutePolicy = "auto"
    # "auto": zstd when the target has it, else none; "zstd": zstd, or none
    # (with a status line) when the target lacks it; "ssh": SSH's zlib.
    compress: Compression = "auto"
    # Build remotely: copy this derivation's closure, not store_path (its output), and realise it on
    # build_host, which then copies the output to the target (build_host.py), or on the target itself.
    build_drv: str | None = None
    build_host: Remote | None = None
    # Upload the closure once to this cache and let the target substitute
    # from it; the direct push is the fallback.
    binary_cache: BinaryCache | None = None
    retention: Retention = field(default_factory=Retention)
    # Boot the new system once, and keep it only when it booted and is healthy (engine/target/reboot.py).
    reboot: RebootMode = "never"
    reboot_timeout: float = REBOOT_TIMEOUT


@dataclass(frozen=True)
class DeployResult:
    store_path: str
    generation: int
    previous_generation: int | None
    previous_store_path: str | None
    host_key: str
    push: PushStats
    nixos_version: str | None
    output: str
    reboot_for: tuple[str, ...] = ()  # boot files of the new system the host runs only after a reboot
    build_host_key: str | None = None  # the build host's key, as pinned by this deployment


INSTALL_PHASES = ("kexec", "disko", "install", "reboot")
# The links of a NixOS system that it boots from, not switches to.
BOOT_FILES = ("kernel", "initrd", "kernel-modules")


@dataclass(frozen=True)
class InstallRequest:
    """One nixos-anywhere run that installs `system_path` onto `remote`.

    The system comes either prebuilt (`disko_script` + `system_path`, passed as
    `--store-paths`) or as `flake` (`<flake>#<name>`) for nixos-anywhere to build.
    Secret material (the SSH key, file contents) only ever reaches
    nixos-anywhere through private temporary files.
    """

    remote: Remote
    system_path: str
    command: tuple[str, ...] = ("nixos-anywhere",)
    disko_script: str | None = None
    flake: str | None = None
    phases: tuple[str, ...] = ()  # empty: nixos-anywhere's default, all of INSTALL_PHASES
    kexec_url: str | None = None
    post_kexec_ssh_port: int | None = None
    build_on: str | None = None
    copy_host_keys: bool = False
    substitute_on_destination: bool = True
    extra_files: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    disk_encryption_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    extra_args: tuple[str, ...] = ()
    nix_options: tuple[tuple[str, str], ...] = ()
    timeout: float = 3600.0
    reboot_timeout: float = 600.0


@dataclass(frozen=True)
class InstallResult:
    """What runs on the host once installation (or adoption) is over."""

    installed: bool  # False: the host already ran NixOS and was adopted as it is
    host_key: str
    current_system: str | None
    generation: Generation | None
    nixos_version: str | None
    host_key_source: str  # how the host key was pinned, for the log
