"""Installing NixOS with nixos-anywhere, then taking the machine over (DESIGN §install).

probe the host -> (already NixOS: adopt it) -> write the key and files to a
private temporary directory -> run nixos-anywhere, streaming its output and
tracking its phase -> wait for the host to come back from the reboot running
the expected system, with the host key pinned -> read its generation.

nixos-anywhere checks no host keys itself (its ssh runs with
StrictHostKeyChecking=no before any option we could add), so the provider
checks the host before and after: the adoption probe and the post-reboot
connection both go through our own pinned SSH.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import asyncssh

from .deploy import read_target_state
from .errors import CommandNotFound, ConnectError, EngineError, HostKeyMismatch, Setting
from .models import SYSTEM_PROFILE, Generation, InstallRequest, InstallResult, Profile, Remote
from .process import LOCAL, Stderr, Target
from .ssh import connect, fingerprint, normalize_host_key

OutputFn = Callable[[str], None]
OUTPUT_TAIL_LINES = 25
HOST_KEY_FILE = "/etc/ssh/ssh_host_ed25519_key"
_SYSTEM = Profile(SYSTEM_PROFILE)


def _noop(_: str) -> None:
    pass


class InstallError(EngineError):
    """nixos-anywhere failed, or the host did not come back as installed.

    `phase` is the nixos-anywhere phase that failed (kexec, disko, install,
    reboot) or a step of ours (connect, wait); `state` says what the host runs
    afterwards, as far as we could tell.
    """

    def __init__(self, message: str, *, phase: str, output_tail: str = "", state: str = "",
                 blames: Setting | None = None) -> None:
        super().__init__(message, blames=blames)
        self.phase = phase
        self.output_tail = output_tail
        self.state = state


# -- what the host runs -----------------------------------------------------------


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
        state = await read_target_state(target, _SYSTEM)
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
        return normalize_host_key(req.remote.host_key), "connection.hostKey"
    for path, content in req.extra_files:
        if path == HOST_KEY_FILE:
            try:
                return public_key_of(content), f"the {HOST_KEY_FILE} placed by extraFiles"
            except (asyncssh.KeyImportError, ValueError) as e:
                raise EngineError(f"install.extraFiles[{HOST_KEY_FILE!r}] is not a private key: {e}") from e
    if req.copy_host_keys and before:
        return before, "the host keys copied from the installer (copyHostKeys)"
    return None, "first use after the reboot"


# -- the nixos-anywhere command line ------------------------------------------------


@dataclass(frozen=True)
class InstallFiles:
    """Where the secret inputs were written for one run."""

    root: Path
    identity: Path | None
    extra_files: Path | None
    disk_keys: tuple[tuple[str, Path], ...]


def _write_private(path: Path, content: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(path, mode)  # whatever the umask said


def _identity_file(remote: Remote) -> str | None:
    """The private key as an unencrypted OpenSSH key: nixos-anywhere cannot type a passphrase."""
    creds = remote.credentials
    if not creds.private_key:
        return None
    if not creds.private_key_password:
        return creds.private_key if creds.private_key.endswith("\n") else creds.private_key + "\n"
    try:
        key = asyncssh.import_private_key(creds.private_key, creds.private_key_password)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as e:
        raise EngineError(f"cannot decrypt {Setting.PRIVATE_KEY.value} for nixos-anywhere: {e}",
                          blames=Setting.PRIVATE_KEY) from e
    return key.export_private_key("openssh").decode()


def write_install_files(req: InstallRequest, root: Path) -> InstallFiles:
    """Write key, extra files and disk keys under root (a fresh 0700 directory)."""
    identity = None
    key = _identity_file(req.remote)
    if key is not None:
        identity = root / "ssh-key"
        _write_private(identity, key)
    extra = None
    if req.extra_files:
        # Directories are 0755 because tar carries their modes onto the target
        # (/etc must stay world-readable); root's 0700 keeps them private here.
        extra = root / "extra-files"
        extra.mkdir(mode=0o755)
        for dest, content in req.extra_files:
            rel = Path(dest.lstrip("/"))
            parent = extra
            for part in rel.parts[:-1]:
                parent = parent / part
                if not parent.exists():
                    parent.mkdir(mode=0o755)
            _write_private(extra / rel, content, 0o644 if dest.endswith(".pub") else 0o600)
    disk_keys = []
    if req.disk_encryption_keys:
        keys_dir = root / "disk-keys"
        keys_dir.mkdir(mode=0o700)
        for i, (dest, content) in enumerate(req.disk_encryption_keys):
            local = keys_dir / str(i)
            _write_private(local, content)
            disk_keys.append((dest, local))
    return InstallFiles(root, identity, extra, tuple(disk_keys))


def nixos_anywhere_argv(req: InstallRequest, files: InstallFiles) -> list[str]:
    """The full command line. It holds paths to the secret files, never their contents."""
    r = req.remote
    argv = [*req.command, "--target-host", f"{r.user}@{r.host}", "--ssh-port", str(r.port)]
    # The connection's own limits, so a host that stops answering fails the
    # install instead of hanging it (the same keepalive as our asyncssh).
    for option in (f"ConnectTimeout={max(1, round(r.connect_timeout))}", "ServerAliveInterval=10",
                   "ServerAliveCountMax=3"):
        argv += ["--ssh-option", option]
    if files.identity is not None:
        argv += ["-i", str(files.identity)]
    elif r.credentials.password:
        argv += ["--env-password"]  # the password travels in SSHPASS
    if req.disko_script is not None:
        argv += ["--store-paths", req.disko_script, req.system_path]
    elif req.flake is not None:
        argv += ["--flake", req.flake]
    else:
        raise EngineError("nixos-anywhere needs a prebuilt disko script with the system, or a flake")
    if req.phases:
        argv += ["--phases", ",".join(req.phases)]
    if req.kexec_url:
        argv += ["--kexec", req.kexec_url]
    if req.post_kexec_ssh_port is not None:
        argv += ["--post-kexec-ssh-port", str(req.post_kexec_ssh_port)]
    if req.build_on:
        argv += ["--build-on", req.build_on]
    if req.copy_host_keys:
        argv += ["--copy-host-keys"]
    if not req.substitute_on_destination:
        argv += ["--no-substitute-on-destination"]
    if files.extra_files is not None:
        argv += ["--extra-files", str(files.extra_files)]
    for dest, local in files.disk_keys:
        argv += ["--disk-encryption-keys", dest, str(local)]
    for name, value in req.nix_options:
        argv += ["--option", name, value]
    return [*argv, *req.extra_args]


def child_env(req: InstallRequest) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SSHPASS", "SSH_PRIVATE_KEY")}
    creds = req.remote.credentials
    if creds.password and not creds.private_key:
        env["SSHPASS"] = creds.password  # read by `sshpass -e`, never in argv
    if creds.agent_socket_path:
        env["SSH_AUTH_SOCK"] = creds.agent_socket_path
    return env


def secrets_of(req: InstallRequest) -> list[str]:
    """Strings that must never appear in what we log: whole values and their lines."""
    creds = req.remote.credentials
    values = [v for v in (creds.private_key, creds.private_key_password, creds.password) if v]
    values += [c for _, c in req.extra_files] + [c for _, c in req.disk_encryption_keys]
    out = set()
    for v in values:
        if len(v.strip()) >= 4:
            out.add(v.strip())
        out.update(line.strip() for line in v.splitlines() if len(line.strip()) >= 8)
    return sorted(out, key=len, reverse=True)


def redact(line: str, secrets: list[str]) -> str:
    for s in secrets:
        if s in line:
            line = line.replace(s, "[secret]")
    return line


# -- following nixos-anywhere's output ----------------------------------------------

# nixos-anywhere announces every step as `### <text> ###`.
_STEP_PHASES = {
    "Uploading install SSH keys": "connect",
    "Switching system into kexec": "kexec",
    "Building disko script": "disko",
    "Formatting hard drive with disko": "disko",
    "Uploading the system closure": "install",
    "Building the system closure": "install",
    "Copying extra files": "install",
    "Installing NixOS": "install",
    "Rebooting": "reboot",
    "Waiting for the machine to become unreachable due to reboot": "reboot",
    "Done!": "done",
}


def step_of(line: str) -> str | None:
    text = line.strip()
    if text.startswith("### ") and text.endswith(" ###"):
        return text[4:-4].strip()
    return None


def phase_after(step: str, current: str) -> str:
    """The phase nixos-anywhere is in once it prints this step."""
    if step in _STEP_PHASES:
        return _STEP_PHASES[step]
    if step.startswith("Uploading ") and " to " in step:
        return "disko"  # a --disk-encryption-keys upload
    if step.startswith("Generating "):
        return "hardware-config"
    return current  # "Gathering machine facts" belongs to the step around it


def describe_phase(phase: str) -> str:
    return {
        "start": "before it reached the host (arguments or local build)",
        "connect": "while connecting to the host, before kexec",
        "hardware-config": "while generating the hardware configuration",
        "done": "after it had finished",
    }.get(phase, f"in the {phase} phase")


async def run_nixos_anywhere(req: InstallRequest, argv: list[str], *, status: OutputFn = _noop,
                             output: OutputFn = _noop) -> None:
    """Run nixos-anywhere to completion, streaming redacted lines; raise InstallError with the phase."""
    secrets = secrets_of(req)
    tail: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    phase = "start"
    try:
        # Its own session, so a timeout or a cancelled update stops every
        # process it started (ssh, nix copy), not only the script.
        proc = await LOCAL.start(argv, stdin=False, stderr=Stderr.STDOUT, env=child_env(req), new_session=True)
    except CommandNotFound as e:
        raise InstallError(f"cannot run nixos-anywhere: `{argv[0]}` {e.why} (set "
                           f"{Setting.NIXOS_ANYWHERE_COMMAND.value}); the host was not touched",
                           phase="start", state="unchanged", blames=Setting.NIXOS_ANYWHERE_COMMAND) from e

    async def follow() -> int:
        nonlocal phase
        while line_bytes := await proc.stdout.readline():
            line = redact(line_bytes.decode(errors="replace").rstrip(), secrets)
            if not line.strip():
                continue
            tail.append(line)
            step = step_of(line)
            if step is not None:
                phase = phase_after(step, phase)
                output(f"nixos-anywhere: {step}")
            else:
                status(line)
        return (await proc.wait()).exit_status

    try:
        returncode = await asyncio.wait_for(follow(), timeout=req.timeout)
    except (TimeoutError, asyncio.CancelledError) as e:
        proc.kill()
        await proc.wait()
        if isinstance(e, asyncio.CancelledError):
            raise
        raise InstallError(f"nixos-anywhere did not finish within {req.timeout:.0f}s and was stopped "
                           f"{describe_phase(phase)}", phase=phase, output_tail="\n".join(tail)) from None
    if returncode != 0:
        last = "\n  ".join(tail)
        raise InstallError(f"nixos-anywhere failed {describe_phase(phase)} (exit {returncode}); "
                           f"its last output:\n  {last}", phase=phase, output_tail="\n".join(tail))


# -- after the reboot ---------------------------------------------------------------------


async def wait_for_system(remote: Remote, system_path: str, timeout: float, *, status: OutputFn = _noop,
                          interval: float = 2.0) -> HostProbe:
    """Poll until the host answers over SSH (with remote.host_key pinned, if set) running system_path."""
    deadline = time.monotonic() + timeout
    quick = replace(remote, retries=1, connect_timeout=min(remote.connect_timeout, 10.0))
    last = "it did not answer"
    while True:
        try:
            seen = await probe(quick)
            if seen.installed and seen.current_system == system_path:
                return seen
            last = f"it {seen.describe()}"
        except HostKeyMismatch as e:
            last = str(e)  # maybe still the installer; a lasting mismatch is reported below
        except (ConnectError, EngineError) as e:
            last = str(e)
        if time.monotonic() >= deadline:
            raise InstallError(f"{remote.target} did not come back running {system_path} within {timeout:.0f}s "
                               f"after the reboot: {last}", phase="wait", state=last)
        status(f"waiting for {remote.target} to come back from the reboot")
        await asyncio.sleep(interval)


async def describe_state(remote: Remote) -> str:
    """Best effort, after a failure: what the host runs now, in words."""
    try:
        return f"the host {(await probe(replace(remote, retries=2, connect_timeout=10.0))).describe()}"
    except EngineError as e:
        return f"the host could not be inspected ({e})"


# -- the whole install -------------------------------------------------------------------


async def install(req: InstallRequest, *, status: OutputFn = _noop, output: OutputFn = _noop) -> InstallResult:
    """Install req.system_path onto a host that does not run NixOS yet, or adopt one that does."""
    remote = req.remote
    if remote.proxy is not None:
        raise EngineError(f"installing through {Setting.PROXY.value} is not supported: nixos-anywhere needs to "
                          "reach the host directly", blames=Setting.PROXY)
    status(f"connecting to {remote.target}")
    # Before installation the host is whatever the cloud image is; its key is
    # trusted on first use (nixos-anywhere does not check it at all).
    before = await probe(replace(remote, host_key=None))
    want_key, key_source = expected_host_key(req, before.host_key)
    if before.installed:
        if want_key is not None and before.host_key != want_key:
            raise HostKeyMismatch(remote.target, fingerprint(want_key), fingerprint(before.host_key))
        output(f"{remote.target} already {before.describe()}: adopting it instead of installing")
        return InstallResult(False, before.host_key, before.current_system, before.generation, before.nixos_version,
                             "the running system")
    output(f"{remote.target} {before.describe()}: installing {req.system_path} with nixos-anywhere")
    root = Path(tempfile.mkdtemp(prefix="pulumi-nixos-install-"))
    try:
        files = write_install_files(req, root)
        argv = nixos_anywhere_argv(req, files)
        output("running " + " ".join(argv))
        await run_nixos_anywhere(req, argv, status=status, output=output)
    except InstallError as e:
        if e.state == "unchanged":
            raise
        state = await describe_state(replace(remote, host_key=None))
        raise InstallError(f"{e}\n{state}", phase=e.phase, output_tail=e.output_tail, state=state) from e
    finally:
        shutil.rmtree(root, ignore_errors=True)
    status(f"waiting for {remote.target} to boot the installed system")
    after = await wait_for_system(replace(remote, host_key=want_key), req.system_path, req.reboot_timeout,
                                  status=status)
    if want_key is None:
        output(f"pinned the host key {fingerprint(after.host_key)} on first use after the reboot "
               f"(upload {HOST_KEY_FILE} with the install's extra files to know it in advance)")
    return InstallResult(True, after.host_key, after.current_system, after.generation, after.nixos_version,
                         key_source)
