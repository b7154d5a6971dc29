"""OpenSSH public key lines: the canonical form a pinned key is recorded in, and the fingerprint errors show.

Apart from the connections (ssh.py), so that checking a `hostKey` input does not load them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_module

if TYPE_CHECKING:
    import asyncssh
else:
    asyncssh = lazy_module("asyncssh")  # its key parser, loaded with the first key


def normalize_host_key(line: str) -> str:
    """`type base64 [comment]` -> `type base64`: the comment is not part of the key."""
    parts = line.strip().split()
    if len(parts) < 2:
        raise ValueError("a host key is an OpenSSH public key line such as `ssh-ed25519 AAAA...`")
    key = asyncssh.import_public_key(f"{parts[0]} {parts[1]}")
    return key.export_public_key("openssh").decode().strip()


def fingerprint(line: str) -> str:
    parts = line.strip().split()
    key = asyncssh.import_public_key(f"{parts[0]} {parts[1]}")
    return f"{key.get_fingerprint('sha256')} ({parts[0]})"
