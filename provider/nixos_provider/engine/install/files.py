"""The install's secret inputs: the SSH key, extra files and disk keys, written privately for nixos-anywhere;
and what must never appear in its logged output."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EngineError, Setting
from ..lazy import lazy_module
from ..models import InstallRequest, Remote

if TYPE_CHECKING:
    import asyncssh
else:
    asyncssh = lazy_module("asyncssh")


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
