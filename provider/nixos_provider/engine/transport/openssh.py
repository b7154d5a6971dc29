"""Commands on a target through the OpenSSH client (`ssh`): the runner for bulk streams.

A push's bytes are the one thing the deployer moves in bulk. Through
asyncssh every SSH packet is framed and encrypted from Python, on the same
core as everything else the provider does; through `ssh` (what `nix copy`
uses) that work is done in C, in its own process, and the NAR bytes never
pass through Python at all (see push.py). On loopback that is the difference
between half of `nix copy`'s speed and its equal (bench/README.md).

The OpenSSH connection trusts exactly what the provider's own connection
established: the host key it verified (pinned, or accepted on first use) is
the only entry of a known-hosts file, and strict checking is on. The private
key reaches `ssh` in a memfd (an anonymous file in memory, mode 0600, that
`ssh` opens as /proc/PID/fd/N of the provider), never a file on disk; a key with a passphrase is handed over
decrypted, since `ssh` must not prompt. No configuration file is read (`-F
/dev/null`): the connection is made from the stack's settings alone, as the
provider's own is.

What `ssh` cannot do here, the provider's connection does instead (see
`unusable`): password logins (it would prompt), jump hosts (their keys would
need the same care), or a deployer without `ssh`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import CommandNotFound, ConnectError
from .process import CommandResult, LocalProcess, OnHost, Pipes, Process, Runner, Stderr, close_fds
from .ssh import Connection, decrypted_private_key

# The only name in the known-hosts file: the host is checked against the key
# the provider's connection verified, whatever address it is reached by.
HOST_KEY_ALIAS = "pulumi-nixos-target"
# AES-GCM first: it runs on the CPU's AES instructions, faster than OpenSSH's
# own first choice (chacha20-poly1305); the rest of its defaults follow.
CIPHERS = ("aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")


def unusable(conn: Connection) -> str | None:
    """Why the bulk stream cannot go through `ssh` to conn's host (None: it can)."""
    remote = conn.remote
    creds = remote.credentials
    if shutil.which("ssh") is None:
        return "the deployer has no `ssh` (OpenSSH client)"
    if remote.proxy is not None:
        return "the host is reached through a jump host"
    if creds.password and not (creds.private_key or creds.agent_socket_path):
        return "the login is by password"
    if not hasattr(os, "memfd_create") or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return "this system cannot hand a key to `ssh` in memory"
    return None


def _memfd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)  # ssh refuses a key file others could read
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ssh_argv(conn: Connection, command: Sequence[str], *, known_hosts: str, identity: str | None,
             compress: bool = False) -> list[str]:
    """The `ssh` invocation that runs command (an argv, quoted here) on conn's host."""
    remote = conn.remote
    creds = remote.credentials
    options = {
        "BatchMode": "yes",  # never a prompt
        "HostKeyAlias": HOST_KEY_ALIAS,
        "UserKnownHostsFile": known_hosts,
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "UpdateHostKeys": "no",
        "CheckHostIP": "no",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "ConnectTimeout": str(max(1, round(remote.connect_timeout))),
        "ServerAliveInterval": "10",
        "ServerAliveCountMax": "3",
        "Ciphers": CIPHERS,
        "Compression": "yes" if compress else "no",
        "LogLevel": "ERROR",
    }
    if not creds.empty:
        # Explicit credentials: those, as for the provider's own connection.
        # IdentitiesOnly would also hide the agent's keys, so only a key alone sets it.
        options["IdentityAgent"] = creds.agent_socket_path or "none"
        if identity is not None:
            options["IdentityFile"] = identity
            if not creds.agent_socket_path:
                options["IdentitiesOnly"] = "yes"
    argv = ["ssh", "-F", "/dev/null", "-T", "-x", "-a"]
    for key, value in options.items():
        argv += ["-o", f"{key}={value}"]
    return [*argv, "-p", str(remote.port), "-l", remote.user, "--", remote.host, shlex.join(command)]


@dataclass(frozen=True)
class OpenSshTarget(OnHost):
    """Commands on conn's host as its login user, each through its own `ssh` process.

    Started commands can read from a pipe the caller made (stdin_from) so a
    local pipeline feeds the remote command without Python in between.
    """

    conn: Connection
    compress: bool = False
    run_as: str | None = None

    async def _exec(self, argv: list[str], caller: list[str], input: bytes | None, timeout: float | None,
                    env: Mapping[str, str] | None, cwd: str | None, niceness: int,
                    started: Callable[[int], None] | None = None) -> CommandResult:
        if env is not None or cwd is not None or niceness or started is not None:
            raise ValueError("env, cwd, niceness and started apply to local commands only")
        proc, files = await self._ssh(argv, asyncio.subprocess.DEVNULL if input is None else asyncio.subprocess.PIPE,
                                      asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        finally:
            _close(files)
        return CommandResult(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))

    async def _spawn(self, argv: list[str], caller: list[str], stdin: bool, stderr: Stderr,
                     env: Mapping[str, str] | None, new_session: bool, pipes: Pipes) -> Process:
        if env is not None or stderr is Stderr.STDOUT or pipes.stdout_to is not None:
            raise ValueError("env, a merged stderr and a given stdout apply to local commands only")
        proc, files = await self._ssh(argv, pipes.stdin(stdin),
                                      asyncio.subprocess.DEVNULL if stderr is Stderr.DISCARD else asyncio.subprocess.PIPE)
        return _SshProcess(self, caller, proc, files)

    async def _ssh(self, argv: list[str], stdin: int, stderr: int) -> tuple[asyncio.subprocess.Process, list[int]]:
        """Start ssh running argv; the in-memory files it reads (close them once it has ended)."""
        remote = self.conn.remote
        files: list[int] = []
        try:
            files.append(_memfd("pulumi-nixos-known-hosts", f"{HOST_KEY_ALIAS} {self.conn.host_key}\n".encode()))
            identity = None
            if remote.credentials.private_key:
                files.append(_memfd("pulumi-nixos-identity", decrypted_private_key(remote)))
                identity = _path(files[-1])
            ssh = ssh_argv(self.conn, argv, known_hosts=_path(files[0]), identity=identity, compress=self.compress)
            try:
                proc = await asyncio.create_subprocess_exec(*ssh, stdin=stdin, stdout=asyncio.subprocess.PIPE,
                                                            stderr=stderr)
            except FileNotFoundError as e:
                raise CommandNotFound("ssh", "was not found") from e
        except BaseException:
            _close(files)
            raise
        return proc, files


def _path(fd: int) -> str:
    # This process's own fd, by a path ssh can open: ssh closes every
    # inherited descriptor above stderr when it starts, so /dev/fd/N would not do.
    return f"/proc/{os.getpid()}/fd/{fd}"


def _close(fds: list[int]) -> None:
    close_fds(*fds)
    fds.clear()


class _SshProcess(LocalProcess):
    """A started `ssh`: the in-memory key and known-hosts files live as long as it does."""

    def __init__(self, runner: Runner, argv: list[str], proc: asyncio.subprocess.Process, files: list[int]) -> None:
        super().__init__(runner, argv, proc, False)
        self._files = files

    async def wait(self) -> CommandResult:
        try:
            return await super().wait()
        finally:
            _close(self._files)

    async def close(self) -> CommandResult:
        try:
            return await super().close()
        finally:
            _close(self._files)


def failed_to_connect(result: CommandResult) -> ConnectError | None:
    """ssh's own failure (exit 255, or killed), as an error; None when the remote command itself ended."""
    if result.exit_status == 255 or result.exit_status < 0:
        lines = [line.strip() for line in result.stderr.strip().splitlines() if line.strip()]
        said = lines[-1] if lines else f"exit {result.exit_status}"
        return ConnectError(said if said.startswith("ssh:") else f"ssh: {said}")
    return None
