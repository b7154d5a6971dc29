"""An SSH agent inside the provider's process, holding the keys a build host needs to reach the target.

With a build host, the build host copies the built system to the target
itself (`nix-copy-closure`), logging in as the deployment does. The
deployment's key (and its jump host's) is offered to it through agent
forwarding on the deployer's connection to the build host: the keys stay in
this process (never on the build host's disk or on a command line), are used
only while that connection is open, and are gone when the deployment ends, or
the process does.

Only what a client needs to log in is answered (the SSH agent protocol,
draft-miller-ssh-agent): list the identities, sign with one. Every other request
is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..lazy import lazy_module

if TYPE_CHECKING:
    import asyncssh
else:
    asyncssh = lazy_module("asyncssh")

FAILURE = 5
REQUEST_IDENTITIES = 11
IDENTITIES_ANSWER = 12
SIGN_REQUEST = 13
SIGN_RESPONSE = 14
# SIGN_REQUEST flags: an RSA key signs with SHA-2 when asked (RFC 8332).
RSA_SHA2_256 = 2
RSA_SHA2_512 = 4
MAX_MESSAGE = 256 * 1024


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _take_string(buf: bytes, at: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", buf, at)
    end = at + 4 + n
    if end > len(buf):
        raise ValueError("truncated string")
    return buf[at + 4:end], end


class KeyAgent:
    """A Unix socket that answers the SSH agent protocol for a few private keys, until closed."""

    def __init__(self, keys: Sequence[asyncssh.SSHKey]) -> None:
        self._keys = {key.public_data: key for key in keys}  # one entry per key, in the order given
        self._dir = tempfile.mkdtemp(prefix="pulumi-nixos-agent-")  # 0700: only this user reaches the socket
        self.path = os.path.join(self._dir, "agent.sock")
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> KeyAgent:
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack(">I", await reader.readexactly(4))
                if not 0 < n <= MAX_MESSAGE:
                    return
                message = await reader.readexactly(n)
                writer.write(_string(self.answer(message)))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def answer(self, message: bytes) -> bytes:
        """The reply to one request (without its length)."""
        kind, body = message[0], message[1:]
        if kind == REQUEST_IDENTITIES:
            return (bytes([IDENTITIES_ANSWER]) + struct.pack(">I", len(self._keys))
                    + b"".join(_string(blob) + _string(b"") for blob in self._keys))
        if kind == SIGN_REQUEST:
            try:
                blob, at = _take_string(body, 0)
                data, at = _take_string(body, at)
                (flags,) = struct.unpack_from(">I", body, at)
                key = self._keys.get(blob)
                if key is None:
                    return bytes([FAILURE])
                return bytes([SIGN_RESPONSE]) + _string(key.sign(data, _algorithm(key, flags)))
            except (ValueError, struct.error):
                return bytes([FAILURE])
        return bytes([FAILURE])


def _algorithm(key: asyncssh.SSHKey, flags: int) -> bytes:
    algorithm: bytes = key.algorithm
    if algorithm == b"ssh-rsa":
        if flags & RSA_SHA2_512:
            return b"rsa-sha2-512"
        if flags & RSA_SHA2_256:
            return b"rsa-sha2-256"
    return algorithm
