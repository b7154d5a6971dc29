"""Installing NixOS with nixos-anywhere, then taking the machine over (DESIGN §install).

probe the host -> (already NixOS: adopt it) -> write the key and files to a
private temporary directory -> run nixos-anywhere, streaming its output and
tracking its phase -> wait for the host to come back from the reboot running
the expected system, with the host key pinned -> read its generation.

nixos-anywhere checks no host keys itself (its ssh runs with
StrictHostKeyChecking=no before any option we could add), so the provider
checks the host before and after: the adoption probe and the post-reboot
connection both go through our own pinned SSH.

The steps live in their own modules: `probe` (what the host runs, the host
key to expect), `files` (the private inputs and redaction), `command` (the
argv and environment), `run` (nixos-anywhere itself) and `wait` (the host
after the reboot); `install` composes them.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from ..errors import EngineError, HostKeyMismatch, InstallError, Setting
from ..models import InstallRequest, InstallResult
from ..transport.host_keys import fingerprint
from .command import child_env, nixos_anywhere_argv
from .files import InstallFiles, redact, secrets_of, write_install_files
from .probe import HOST_KEY_FILE, HostProbe, expected_host_key, parse_os_release, probe, public_key_of
from .run import OUTPUT_TAIL_LINES, OutputFn, _noop, describe_phase, phase_after, run_nixos_anywhere, step_of
from .wait import describe_state, wait_for_system

__all__ = [
    "HOST_KEY_FILE", "OUTPUT_TAIL_LINES", "HostProbe", "InstallError", "InstallFiles", "child_env", "describe_phase",
    "describe_state", "expected_host_key", "install", "nixos_anywhere_argv", "parse_os_release", "phase_after",
    "probe", "public_key_of", "redact", "run_nixos_anywhere", "secrets_of", "step_of", "wait_for_system",
    "write_install_files",
]


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
