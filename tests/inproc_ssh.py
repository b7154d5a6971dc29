"""A real SSH server inside the test process, for the fast tier (no root, no lab, no Nix).

It runs each command it is given with this machine's /bin/sh, as the user
running the tests, and records what it was asked: the exact command line,
the user it logged in, and the authentication attempts. So the engine's
runner, connection handling and supervisor are exercised over real SSH,
and a test can assert exactly what reached the host.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from dataclasses import dataclass, field

import asyncssh


@dataclass
class Record:
    """What the server saw."""

    commands: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    auth_attempts: int = 0
    connections: int = 0


class _Session(asyncssh.SSHServer):
    def __init__(self, server: InProcessSSHServer) -> None:
        self.server = server

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.server.record.connections += 1

    def begin_auth(self, username: str) -> bool:
        self.server.record.users.append(username)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self.server.record.auth_attempts += 1
        return not self.server.refuse_logins and key.public_data == self.server.client_key.public_data


class InProcessSSHServer:
    """Listens on 127.0.0.1; `client_key` logs in as any user; `host_key` is what it presents."""

    def __init__(self, encryption_algs: list[str] | None = None) -> None:
        self.encryption_algs = encryption_algs  # the ciphers it offers (None: asyncssh's defaults)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.record = Record()
        self.refuse_logins = False  # True: every new login fails (the host "broke" SSH)
        self.port = 0
        self._server: asyncssh.SSHAcceptor | None = None
        self._running: set[asyncio.subprocess.Process] = set()

    @property
    def host_key_line(self) -> str:
        return self.host_key.export_public_key("openssh").decode().strip()

    @property
    def client_key_text(self) -> str:
        return self.client_key.export_private_key("openssh").decode()

    async def start(self, port: int = 0) -> None:
        self._server = await asyncssh.create_server(
            lambda: _Session(self), "127.0.0.1", port, server_host_keys=[self.host_key],
            process_factory=self._run, encoding=None, allow_scp=False,
            **({} if self.encryption_algs is None else {"encryption_algs": self.encryption_algs}))
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        # Commands first: the server waits for its sessions, and a session for its command.
        for proc in list(self._running):
            _kill_group(proc)
            await proc.wait()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _run(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command or ""
        self.record.commands.append(command)
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._running.add(proc)
        feeding = asyncio.ensure_future(_feed(process.stdin, proc.stdin))
        try:
            # Every byte of output is sent before the exit status, as sshd does.
            await asyncio.gather(_forward(proc.stdout, process.stdout), _forward(proc.stderr, process.stderr))
            status = await proc.wait()
        except (asyncssh.Error, OSError):
            status = 255
        finally:
            feeding.cancel()
            # The session ended first (the client gave up or went away): the
            # command ends with it, and leaves nothing running after the test.
            _kill_group(proc)
            self._running.discard(proc)
        process.exit(status)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """The command and whatever it started (sh may fork its last command rather than exec it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def _feed(source: asyncssh.SSHReader[bytes], sink: asyncio.StreamWriter | None) -> None:
    assert sink is not None
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        sink.close()
    except (asyncssh.Error, OSError):
        pass  # the command stopped reading, or the client went away


async def _forward(source: asyncio.StreamReader | None, sink: asyncssh.SSHWriter[bytes]) -> None:
    assert source is not None
    while data := await source.read(65536):
        sink.write(data)
        await sink.drain()


class Doorman:
    """A TCP port that accepts connections and closes them at once, counting when each came."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.arrivals.append(asyncio.get_running_loop().time())
            writer.close()

        self._server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def free_port() -> int:
    """A port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
