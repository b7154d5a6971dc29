"""Build on a build host, then let the build host copy the result to the target.

What crosses the deployer's link is the derivations (push.py, as for any
closure), not the system: the build host builds them (fetching what it can
from its own binary caches), the target fetches what its own caches hold of
the result, and the build host sends the rest straight to the target with
`nix-copy-closure`, logging in as the deployment does: the target's pinned
host key in a known_hosts file of its own, the deployment's key through agent
forwarding (agent.py), never on the build host's disk.

A target behind a jump host is reached the same way, through that jump host
(`ProxyJump`, its pinned key beside the target's, its key in the same agent).
When the build host cannot do that (more than one jump host, a password, keys
for one and an agent for the other, or the copy fails: the build host cannot
reach it, or the SSH user is not trusted by the target's Nix and imports
through sudo), the deployer relays: `nix-store --export` on the build host,
`nix-store --import` on the target, through this process, and a warning
says so.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BuildHostError, CommandError, ConnectError, EngineError
from ..models import Remote, SubstitutePolicy
from ..nix.cli import Nix
from ..nix.versions import build_failure
from ..transport.agent import KeyAgent
from ..transport.process import LOCAL, Runner, Target
from ..transport.ssh import Connection, connect, private_key
from .push import CHUNK, fetch_from_caches, missing_paths

StatusFn = Callable[[str], None]

# The target's key for the build host's `ssh`, and the directory it lives in, made private before anything is written.
_KNOWN_HOSTS = 'set -eu; umask 077; d=$(mktemp -d "${TMPDIR:-/tmp}/pulumi-nixos-copy.XXXXXX"); cat > "$d/known_hosts"; echo "$d"'
# One export of paths given on stdin (a closure is too long for one SSH command line); no globbing of their names.
_EXPORT = "set -f; exec nix-store --export $(cat)"


@dataclass(frozen=True)
class Copied:
    """How the built system reached the target."""

    closure: int  # paths of the system's closure
    had: int  # already on the target
    substituted: int  # fetched by the target from its own binary caches
    direct: int  # sent by the build host straight to the target
    relayed: int  # sent through the deployer
    relayed_bytes: int
    seconds: float


def _known_hosts_line(remote: Remote, host_key: str) -> str:
    name = remote.host if remote.port == 22 else f"[{remote.host}]:{remote.port}"
    return f"{name} {host_key}\n"


class BuildHost:
    """The deployer's connection to a build host, forwarding the target's credentials while it is open."""

    def __init__(self, remote: Remote, conn: Connection, agent: KeyAgent | None, forwarded: str | None) -> None:
        self.remote = remote
        self.conn = conn
        self.store = Target(conn)  # the SSH user imports and builds: it must be root or a trusted user
        self._agent = agent
        self.forwarded = forwarded  # the agent socket the build host's commands may use, if any

    @property
    def host_key(self) -> str:
        return self.conn.host_key

    @classmethod
    async def open(cls, remote: Remote, target: Remote) -> BuildHost:
        """Connect to the build host, forwarding an agent that can log in to target when there is one."""
        agent: KeyAgent | None = None
        logins = _logins(target)
        if all(login.credentials.private_key for login in logins):
            agent = await KeyAgent([private_key(login) for login in logins]).start()
        forwarded = agent.path if agent is not None else _agent_of(logins)
        try:
            conn = await connect(remote, forward_agent=forwarded)
        except ConnectError as e:
            if agent is not None:
                await agent.close()
            raise BuildHostError(f"cannot use the build host: {e}", blames=e.blames) from e
        except BaseException:
            if agent is not None:
                await agent.close()
            raise
        return cls(remote, conn, agent, forwarded)

    async def close(self) -> None:
        await self.conn.close()
        if self._agent is not None:
            await self._agent.close()

    async def build(self, drv: str, out: str, timeout: float) -> None:
        """Realise drv on the build host; its output must be out."""
        res = await self.store.run(["nix-store", "--realise", drv], check=False, timeout=timeout)
        if res.exit_status != 0 or out not in res.stdout.split():
            why = build_failure(res.stderr).replace("\n", "\n  ")
            raise BuildHostError(f"building {drv} on the build host {self.store.target} failed "
                                 f"(exit {res.exit_status}):\n  {why}")

    async def copy_to(self, target: Target, out: str, host_key: str, *, substitute: SubstitutePolicy,
                      timeout: float, status: StatusFn, warn: StatusFn) -> Copied:
        """Get out's closure from the build host to target: its own caches first, then straight from the build
        host, else through the deployer."""
        started = time.monotonic()
        res = await self.store.run(["nix-store", "--query", "--requisites", out])
        closure = res.stdout.split()
        lacked, missing = await fetch_from_caches(target, closure, substitute, status)
        substituted = lacked - len(missing)
        direct = relayed = relayed_bytes = 0
        if missing:
            why_not = self._cannot_copy_directly(target)
            if why_not is None:
                status(f"the build host {self.store.target} is copying {len(missing)} paths to {target.target}")
                why_not = await self._copy_directly(target, out, host_key, timeout)
                still = await missing_paths(target, missing)
                direct, missing = len(missing) - len(still), still
                why_not = why_not or f"the build host's copy left {len(still)} paths missing on {target.target}"
            if missing:
                warn(f"buildHost: {why_not}; relaying {len(missing)} paths from {self.store.target} to "
                     f"{target.target} through the deployer")
                relayed_bytes = await self._relay(target, missing, timeout)
                relayed = len(missing)
        return Copied(len(closure), len(closure) - lacked, substituted, direct, relayed, relayed_bytes,
                      time.monotonic() - started)

    async def copy_here(self, nix: Nix, outs: Sequence[str], timeout: float) -> int:
        """outs' closures from the build host into the deployer's store (nixos-anywhere copies from there); the
        bytes moved. The deployer's Nix checks no signatures only for a user it trusts (root, trusted-users)."""
        res = await self.store.run(["nix-store", "--query", "--requisites", *outs])
        closure = res.stdout.split()
        invalid = set((await LOCAL.run(nix.store_argv("--check-validity", "--print-invalid", *closure))).stdout.split())
        missing = [p for p in closure if p in invalid]
        if not missing:
            return 0
        try:
            return await self._relay(LOCAL, missing, timeout, sink=nix.store_argv("--import"))
        except CommandError as e:
            trust = (" (the deployer's Nix imports unsigned paths only for root or a user in its trusted-users)"
                     if "signature" in str(e) else "")
            raise BuildHostError(f"copying {len(missing)} paths from the build host {self.store.target} to the "
                                 f"deployer failed: {e}{trust}") from e

    def _cannot_copy_directly(self, target: Target) -> str | None:
        """Why the build host cannot log in to target as the deployment does, if it cannot."""
        remote = target.conn.remote
        if remote.proxy is not None and (remote.proxy.proxy is not None or target.conn.tunnel is None):
            return f"{target.target} is reached through more than one jump host"
        for login in _logins(remote):
            if login.credentials.password:
                return f"the deployment logs in to {login.target} with a password"
        if self.forwarded is None:
            through = f" and its jump host {remote.proxy.target}" if remote.proxy is not None else ""
            return (f"the deployment logs in to {target.target}{through} with no key or agent the provider can "
                    "forward (one agent, or keys)")
        if any(not _CONFIG_WORD.match(word) for login in _logins(remote) for word in (login.host, login.user)):
            return f"{target.target} cannot be named in an ssh_config file"
        return None

    async def _copy_directly(self, target: Target, out: str, host_key: str, timeout: float) -> str | None:
        """`nix-copy-closure` on the build host; None when it succeeded, else why it did not.

        It imports as the SSH user, never through sudo: a user the target's Nix trusts (root, or one of its
        trusted-users) can; another one is refused for want of signatures, and the deployer relays. The SSH
        client's settings are an ssh_config of their own (`-F`), which `ssh` also hands to the jump host's
        connection (`ProxyJump`); the build host's own settings follow them."""
        remote, tunnel = target.conn.remote, target.conn.tunnel
        known = _known_hosts_line(remote, host_key)
        if remote.proxy is not None and tunnel is not None:
            known += _known_hosts_line(remote.proxy, tunnel.host_key)
        made = await self.store.run(["sh", "-c", _KNOWN_HOSTS], input=known)
        workdir = made.stdout.strip()
        try:
            await self.store.run(["sh", "-c", 'umask 077; cat > "$1/config"', "sh", workdir],
                                 input=_ssh_config(remote, workdir))
            argv = ["env", f"NIX_SSHOPTS=-F {workdir}/config", "nix-copy-closure", "--to",
                    f"{remote.user}@{remote.host}", out]
            res = await self.store.run(argv, check=False, timeout=timeout)
        finally:
            await self.store.run(["rm", "-rf", "--", workdir], check=False)
        if res.exit_status == 0:
            return None
        return f"the build host could not copy to {target.target} (exit {res.exit_status}: {_reason(res.stderr)})"

    async def _relay(self, target: Runner, paths: list[str], timeout: float,
                     sink: Sequence[str] = ("nix-store", "--import")) -> int:
        """Export paths on the build host and import them on target, through this process; the bytes moved."""
        export = await self.store.start(["sh", "-c", _EXPORT])
        importing = await target.start(list(sink))
        moved = 0
        try:
            async with asyncio.timeout(timeout):
                export.stdin.write(("\n".join(paths) + "\n").encode())
                export.stdin.write_eof()
                while chunk := await export.stdout.read(CHUNK):
                    importing.stdin.write(chunk)
                    await importing.stdin.drain()
                    moved += len(chunk)
                importing.stdin.write_eof()
                exported, imported = await export.wait(), await importing.wait()
        except TimeoutError:
            raise EngineError(f"relaying {len(paths)} paths from {self.store.target} to {target.target} timed out "
                              f"after {timeout:.0f}s ({moved / 1048576:.1f} MiB moved)") from None
        finally:
            await export.close()
            await importing.close()
        for process, result in ((export, exported), (importing, imported)):
            if result.exit_status != 0:
                raise process.failure(result)
        return moved


def _logins(target: Remote) -> list[Remote]:
    """What the build host logs in to on its way: the target, and its jump host if it has one."""
    return [target] if target.proxy is None else [target, target.proxy]


def _agent_of(logins: list[Remote]) -> str | None:
    """The one agent the deployment logs in with when it has no keys of its own, forwarded as it is."""
    agents = set()
    for login in logins:
        creds = login.credentials
        if creds.agent_socket_path:
            agents.add(creds.agent_socket_path)
        elif creds.empty:
            agents.add(os.environ.get("SSH_AUTH_SOCK") or "")
        else:
            return None
    if len(agents) != 1:
        return None  # two agents, or none that can be forwarded
    return agents.pop() or None


# A host or user name an ssh_config line carries as it is (a `%`, which ssh would expand as a token, is relayed).
_CONFIG_WORD = re.compile(r"^[A-Za-z0-9_.:\[\]$-]+$")


def _ssh_config(remote: Remote, workdir: str) -> str:
    """The build host's `ssh` settings for the copy: the target's pinned key (and its jump host's) only, no prompt;
    the target's port and jump host; then what the build host's own configuration says."""
    jump = ""
    if remote.proxy is not None:
        proxy = remote.proxy
        host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
        jump = f"    ProxyJump {proxy.user}@{host}:{proxy.port}\n"
    return (f"Host {remote.host}\n    Port {remote.port}\n{jump}"
            f"Host *\n    UserKnownHostsFile {workdir}/known_hosts\n    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n    BatchMode yes\n"
            f"    ConnectTimeout {max(1, int(remote.connect_timeout))}\n    ServerAliveInterval 10\n"
            "    Include ~/.ssh/config /etc/ssh/ssh_config\n")


def _reason(stderr: str) -> str:
    """What stopped a copy, in one line: ssh's own complaint or Nix's first error (the last one is often only
    "unexpected end-of-file"), with what to change when the target's Nix did not trust the user."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = next((line for line in lines if line.startswith(("ssh:", "error:"))), lines[-1] if lines else "no message")
    if "signature" in said:
        said += "; a user in the target's trusted-users can take the build host's copy"
    return said
