"""SSH connections to targets (asyncssh), with pinned or trust-on-first-use host keys.

Host keys are checked during key exchange, before any credential is sent: a
pinned key must match exactly; with no pinned key the first key seen is
accepted and returned so the caller can pin it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import ConnectError, HostKeyMismatch, Setting
from ..lazy import lazy_module
from ..models import Remote
from .host_keys import fingerprint, normalize_host_key

if TYPE_CHECKING:
    import asyncssh
else:
    # asyncssh (with `cryptography`) loads on the first key or connection: the
    # provider's first calls (schema, configuration, Check) need neither.
    asyncssh = lazy_module("asyncssh")

log = logging.getLogger(__name__)

# Preferred host key algorithms when nothing is pinned: the key type a modern
# NixOS host generates first, so TOFU pins the same key OpenSSH users see.
_TOFU_HOST_KEY_ALGS = [
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "rsa-sha2-512",
    "rsa-sha2-256",
    "ssh-rsa",
]


# Ciphers, fastest first for this process: asyncssh encrypts in Python around
# the cryptography library, where AES-GCM runs on the CPU's AES instructions
# and costs the deployer about 40% less CPU per byte pushed than asyncssh's
# first choice, chacha20-poly1305 (bench/README.md). The rest of asyncssh's
# defaults follow, so hosts without AES-GCM still connect.
_CIPHER_PREFERENCE = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]


def _encryption_algs() -> list[str]:
    from asyncssh.encryption import get_default_encryption_algs
    defaults = [alg.decode() for alg in get_default_encryption_algs()]
    return [alg for alg in _CIPHER_PREFERENCE if alg in defaults] + [
        alg for alg in defaults if alg not in _CIPHER_PREFERENCE]


class _HostKeyCheck:
    """What the host key check saw and decided; asyncssh asks it through `_client_class`."""

    def __init__(self, pinned: str | None, *, refuse: bool = False) -> None:
        self.pinned = pinned
        self.refuse = refuse  # only look at the key
        self.seen: str | None = None
        # How far the connection got: what a timeout names.
        self.phase = "the TCP connection"

    def connected(self) -> None:
        self.phase = "the SSH banner and key exchange"

    def accepts(self, key: asyncssh.SSHKey) -> bool:
        self.seen = key.export_public_key("openssh").decode().strip()
        self.phase = "authentication"
        return not self.refuse and (self.pinned is None or self.seen == self.pinned)

    def client(self) -> asyncssh.SSHClient:
        return _client_class()(self)


@functools.cache
def _client_class() -> Callable[[_HostKeyCheck], asyncssh.SSHClient]:
    # Made on first use: subclassing asyncssh.SSHClient at import would load asyncssh.
    class HostKeyCheckingClient(asyncssh.SSHClient):
        def __init__(self, check: _HostKeyCheck) -> None:
            self.check = check

        def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
            self.check.connected()

        def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
            return self.check.accepts(key)

    return HostKeyCheckingClient


class Connection:
    """One authenticated SSH connection to a target."""

    def __init__(self, remote: Remote, conn: asyncssh.SSHClientConnection, host_key: str,
                 tunnel: Connection | None = None) -> None:
        self.remote = remote
        self.conn = conn
        self.host_key = host_key
        self._tunnel = tunnel

    @property
    def target(self) -> str:
        return self.remote.target

    @property
    def tunnel(self) -> Connection | None:
        """The connection to the jump host this one goes through, if any."""
        return self._tunnel

    def describe_error(self, e: BaseException) -> str:
        """An asyncssh or socket error in words, for the runner's messages."""
        return _describe(e)

    async def close(self) -> None:
        self.conn.close()
        try:
            await asyncio.wait_for(self.conn.wait_closed(), timeout=5)
        except (TimeoutError, asyncssh.Error, OSError):
            pass
        if self._tunnel is not None:
            await self._tunnel.close()

    def abort(self) -> None:
        """Drop the connection at once (tests use it to simulate a lost link)."""
        self.conn.abort()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AttemptTimedOut(TimeoutError):
    """One connection attempt ran out of connectTimeout, in a phase: the TCP connection, the banner and key
    exchange, or authentication (asyncssh bounds all of them together)."""

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"timed out during {phase}")
        self.seconds = seconds


def _describe(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, AttemptTimedOut):
        return str(e)
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, asyncssh.PermissionDenied):
        return f"permission denied (check {Setting.CREDENTIALS.value})"
    if isinstance(e, asyncssh.Error):
        return e.reason or type(e).__name__
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


def _client_keys(remote: Remote) -> list[asyncssh.SSHKey] | None:
    creds = remote.credentials
    if not creds.private_key:
        return None
    try:
        return [asyncssh.import_private_key(creds.private_key, creds.private_key_password)]
    except asyncssh.KeyEncryptionError as e:
        if "bcrypt" in str(e).lower():
            raise ConnectError(f"cannot decrypt the private key for {remote.target}: {e}") from e
        raise ConnectError(f"cannot decrypt the private key for {remote.target}: "
                           f"{Setting.PRIVATE_KEY_PASSWORD.value} is wrong", blames=Setting.PRIVATE_KEY_PASSWORD) from e
    except (asyncssh.KeyImportError, ValueError) as e:
        raise ConnectError(f"{Setting.PRIVATE_KEY.value} for {remote.target} is not a private key asyncssh can "
                           f"read: {e}", blames=Setting.PRIVATE_KEY) from e


def private_key(remote: Remote) -> asyncssh.SSHKey:
    """remote's private key, decrypted."""
    keys = _client_keys(remote)
    if not keys:
        raise ConnectError(f"no private key is set for {remote.target}")
    return keys[0]


def decrypted_private_key(remote: Remote) -> bytes:
    """remote's private key in OpenSSH's format, without a passphrase (for `ssh`, which must not prompt)."""
    return bytes(private_key(remote).export_private_key("openssh"))


async def _connect_once(remote: Remote, tunnel: Connection | None, compress: bool,
                        forward_agent: str | None = None) -> Connection:
    pinned = normalize_host_key(remote.host_key) if remote.host_key else None
    checker = _HostKeyCheck(pinned)
    creds = remote.credentials
    client_keys = _client_keys(remote)
    options: dict[str, object] = {
        "username": remote.user,
        "known_hosts": ([], [], []),
        "server_host_key_algs": [pinned.split()[0]] if pinned else _TOFU_HOST_KEY_ALGS,
        "encryption_algs": _encryption_algs(),
        "connect_timeout": remote.connect_timeout,
        "login_timeout": remote.connect_timeout,
        "keepalive_interval": 10,
        "keepalive_count_max": 3,
    }
    if compress:
        options["compression_algs"] = ["zlib@openssh.com", "zlib", "none"]
    if not creds.empty:
        # Explicit credentials: use exactly those, as pulumi-command does.
        options["client_keys"] = client_keys or []
        options["agent_path"] = creds.agent_socket_path
        options["password"] = creds.password
        options["ignore_encrypted"] = True
    if forward_agent is not None:
        options["agent_forwarding"] = forward_agent
    if tunnel is not None:
        options["tunnel"] = tunnel.conn
    try:
        conn = await asyncssh.connect(remote.host, remote.port, client_factory=checker.client, **options)  # type: ignore[arg-type]
    except asyncssh.HostKeyNotVerifiable as e:
        if pinned and checker.seen:
            raise HostKeyMismatch(remote.target, fingerprint(pinned), fingerprint(checker.seen)) from e
        raise ConnectError(f"cannot verify the host key of {remote.target}: {_describe(e)}") from e
    except TimeoutError as e:
        # A host that never answers would not answer the probe below either: it would only double the wait.
        raise AttemptTimedOut(checker.phase, remote.connect_timeout) from e
    except (asyncssh.Error, OSError) as e:
        if pinned and checker.seen is None:
            # Key exchange offers only the pinned key's type: a host that no
            # longer has a key of that type ends the connection before showing
            # any key. Ask it which key it has now.
            offered = await _offered_host_key(remote, tunnel)
            if offered is not None and offered != pinned:
                raise HostKeyMismatch(remote.target, fingerprint(pinned), fingerprint(offered)) from e
        raise
    assert checker.seen is not None
    return Connection(remote, conn, checker.seen, tunnel)


async def _offered_host_key(remote: Remote, tunnel: Connection | None) -> str | None:
    """The host key the host presents now, of any type. It is refused during key exchange: no credential is sent."""
    checker = _HostKeyCheck(None, refuse=True)
    options: dict[str, object] = {"known_hosts": ([], [], []), "server_host_key_algs": _TOFU_HOST_KEY_ALGS,
                                  "connect_timeout": remote.connect_timeout, "username": remote.user,
                                  "client_keys": [], "agent_path": None, "password": None}
    if tunnel is not None:
        options["tunnel"] = tunnel.conn
    try:
        conn = await asyncssh.connect(remote.host, remote.port, client_factory=checker.client, **options)  # type: ignore[arg-type]
        conn.abort()  # not reached: the key is refused
    except (asyncssh.Error, OSError, TimeoutError):
        pass
    return checker.seen


async def connect(remote: Remote, *, compress: bool = False, forward_agent: str | None = None) -> Connection:
    """Connect with bounded retries and backoff: `retries` more attempts after a failed one, each bounded by
    connectTimeout as a whole. Host key and auth failures are not retried.

    forward_agent: the socket of an SSH agent that commands on the host may use (agent forwarding).
    """
    tunnel = await connect(remote.proxy) if remote.proxy is not None else None
    attempts = 1 + max(0, remote.retries)
    delay = 0.5
    last: BaseException | None = None
    for attempt in range(1, attempts + 1):
        try:
            return await _connect_once(remote, tunnel, compress, forward_agent)
        except (HostKeyMismatch, asyncssh.PermissionDenied) as e:
            if tunnel is not None:
                await tunnel.close()
            if isinstance(e, asyncssh.PermissionDenied):
                raise ConnectError(f"authentication as {remote.target} failed: {_describe(e)}",
                                   blames=Setting.CREDENTIALS) from e
            raise
        except ConnectError:
            if tunnel is not None:
                await tunnel.close()
            raise
        except (asyncssh.Error, OSError, TimeoutError) as e:
            last = e
            log.debug("connect %s attempt %d failed: %s", remote.target, attempt, e)
            if attempt < attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
    if tunnel is not None:
        await tunnel.close()
    assert last is not None
    via = f" via {remote.proxy.target}" if remote.proxy else ""
    tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
    how_long = f"connectTimeout {last.seconds:g} s, {tries}" if isinstance(last, AttemptTimedOut) else f"after {tries}"
    raise ConnectError(f"cannot connect to {remote.target}{via}: {_describe(last)} ({how_long})") from last
