"""The rules of one setting beyond its type; each failure names the setting's path (`connection.port`,
`healthChecks[1]`), which is what the Pulumi CLI shows next to the resource and nixos-deploy prints."""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from ..models import COMPRESSIONS
from ..nix.cli import is_store_path
from ..transport import host_keys
from .values import UNKNOWN, kind_of, known, short

HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_.:\-\[\]%]+$")
# A DNS name: dot-separated labels of letters, digits, `-` and `_`, none
# starting or ending with `-`.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
HOSTNAME_RE = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_.\-]*\$?$", re.IGNORECASE)


@dataclass
class Failures:
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, prop: str, reason: str) -> None:
        # One reason per property: the first (its type, when that is wrong) is the one to fix first.
        if not any(p == prop for p, _ in self.items):
            self.items.append((prop, reason))

    def add_all(self, items: list[tuple[str, str]]) -> None:
        for prop, reason in items:
            self.add(prop, reason)

    def __bool__(self) -> bool:
        return bool(self.items)


def check_int(f: Failures, prop: str, v: Any, lo: int, hi: int) -> None:
    if not known(v):
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v:
        f.add(prop, f"must be a whole number, not {v!r}")
    elif not lo <= int(v) <= hi:
        f.add(prop, f"must be between {lo} and {hi}, not {int(v)}")


def check_seconds(f: Failures, prop: str, v: Any, lo: float = 0.1, hi: float = 86400) -> None:
    if not known(v):
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        f.add(prop, f"must be a number of seconds, not {v!r}")
    elif not lo <= v <= hi:
        f.add(prop, f"must be between {lo:g} and {hi:g} seconds, not {v:g}")


def check_choice(f: Failures, prop: str, v: Any, choices: tuple[str, ...]) -> None:
    if known(v) and v not in choices:
        f.add(prop, f"must be one of {', '.join(repr(c) for c in choices)}, not {v!r}")


def check_bool(f: Failures, prop: str, v: Any) -> None:
    if known(v) and not isinstance(v, bool):
        f.add(prop, f"must be true or false, not {v!r}")


def check_connection(f: Failures, conn: Any, prop: str = "connection", *, allow_proxy: bool = True) -> None:
    if conn is UNKNOWN:
        return
    if not isinstance(conn, dict):
        f.add(prop, "is required: an object with at least `host`")
        return
    host = conn.get("host")
    if host is None:
        f.add(f"{prop}.host", "is required")
    elif known(host) and (not isinstance(host, str) or not HOST_RE.match(host)):
        f.add(f"{prop}.host", f"{host!r} is not a host name or IP address")
    check_int(f, f"{prop}.port", conn.get("port"), 1, 65535)
    user = conn.get("user")
    if known(user) and (not isinstance(user, str) or not USER_RE.match(user)):
        f.add(f"{prop}.user", f"{user!r} is not a valid user name")
    check_seconds(f, f"{prop}.connectTimeout", conn.get("connectTimeout"), 1, 3600)
    check_int(f, f"{prop}.retries", conn.get("retries"), 0, 100)
    key = conn.get("hostKey")
    if known(key):
        try:
            host_keys.normalize_host_key(str(key))
        except (ValueError, Exception):
            f.add(f"{prop}.hostKey", "must be an OpenSSH public key line such as `ssh-ed25519 AAAA...`")
    for k in ("password", "privateKeyPassword", "agentSocketPath", "sudoPassword"):
        val = conn.get(k)
        if known(val) and not isinstance(val, str):
            # Never echo the value: most of these are secrets.
            f.add(f"{prop}.{k}", f"must be a string, not {kind_of(val)}")
    sudo_password = conn.get("sudoPassword")
    if sudo_password is not None and not allow_proxy:
        f.add(f"{prop}.sudoPassword", "a jump host only forwards the connection and runs no command, so it needs no sudo")
    elif known(sudo_password) and isinstance(sudo_password, str) and (
            not sudo_password or "\n" in sudo_password or "\r" in sudo_password):
        # sudo reads the password up to the end of its line, so it can be
        # neither empty nor more than one line.
        f.add(f"{prop}.sudoPassword", "must be one non-empty line (sudo reads the password up to a line break)")
    pk = conn.get("privateKey")
    if known(pk) and not isinstance(pk, str):
        f.add(f"{prop}.privateKey", f"must be the private key as a string, not {kind_of(pk)}")
    elif known(pk) and "PRIVATE KEY" not in str(pk):
        # Never echo the value: it is a secret.
        f.add(f"{prop}.privateKey", "does not look like a private key (expected a PEM/OpenSSH `-----BEGIN ... PRIVATE KEY-----` block)")
    proxy = conn.get("proxy")
    if proxy is not None:
        if not allow_proxy:
            f.add(f"{prop}.proxy", "a jump host cannot itself have a proxy")
        else:
            check_connection(f, proxy, f"{prop}.proxy", allow_proxy=False)


def is_host_literal(v: Any) -> bool:
    """A host name (DNS labels) or an IP address literal: nothing a shell could read as code."""
    if not isinstance(v, str):
        return False
    try:
        ipaddress.ip_address(v)
        return True
    except ValueError:
        return HOSTNAME_RE.fullmatch(v) is not None


def check_health_checks(f: Failures, checks: Any, prop: str = "healthChecks") -> None:
    if not known(checks):
        return
    if not isinstance(checks, list):
        f.add(prop, "must be a list of health checks")
        return
    for i, c in enumerate(checks):
        p = f"{prop}[{i}]"
        if not isinstance(c, dict):
            f.add(p, "must be an object with one of `command`, `http` or `tcp`")
            continue
        kinds = [k for k in ("command", "http", "tcp") if c.get(k) is not None]
        if len(kinds) != 1:
            f.add(p, f"needs exactly one of `command`, `http` or `tcp` (got {', '.join(kinds) or 'none'})")
        check_command(f, f"{p}.command", c.get("command"))
        http = c.get("http")
        if known(http) and (not isinstance(http, str) or not re.match(r"^https?://[^\s/]+", http)):
            f.add(f"{p}.http", f"{short(http)} is not an http:// or https:// URL")
        host = c.get("host")
        if known(host) and not is_host_literal(host):
            f.add(f"{p}.host", f"{short(host)} is not a host name or IP address")
        check_int(f, f"{p}.tcp", c.get("tcp"), 1, 65535)
        check_seconds(f, f"{p}.timeout", c.get("timeout"), 0.1, 3600)
        check_int(f, f"{p}.retries", c.get("retries"), 0, 1000)
        check_seconds(f, f"{p}.interval", c.get("interval"), 0, 3600)


# Longer than any real flake reference or store path, far shorter than a command line may be.
MAX_REF = 4096


def check_store_path(f: Failures, prop: str, v: Any) -> None:
    if known(v) and not (isinstance(v, str) and len(v) <= MAX_REF and is_store_path(v)):
        f.add(prop, f"{short(v)} is not a Nix store path (/nix/store/<hash>-<name>)")


def check_flake(f: Failures, prop: str, v: Any) -> None:
    if not known(v):
        return
    if isinstance(v, str) and len(v) > MAX_REF:
        f.add(prop, f"is {len(v)} characters long; a flake reference has at most {MAX_REF}")
    elif not isinstance(v, str) or "#" not in v or v.endswith("#"):
        f.add(prop, f"{short(v)} is not a flake reference with an attribute, such as `.#web`")


def check_command(f: Failures, prop: str, v: Any) -> None:
    """A shell command run on the target (NixProfile `activate`)."""
    if known(v) and not isinstance(v, str):
        f.add(prop, f"must be a shell command as a string, not {kind_of(v)}")


def check_nix_options(f: Failures, opts: Any) -> None:
    if not known(opts):
        return
    if not isinstance(opts, list):
        f.add("nixOptions", "must be a list of {name, value}")
        return
    for i, o in enumerate(opts):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str) or not isinstance(o.get("value"), str):
            f.add(f"nixOptions[{i}]", "needs string `name` and `value`")


def check_deploy_settings(f: Failures, news: dict[str, Any], booleans: tuple[str, ...]) -> None:
    """The settings NixosMachine and NixProfile share: timeouts, switches, checks, nix options."""
    check_seconds(f, "confirmTimeout", news.get("confirmTimeout"), 1, 3600)
    check_seconds(f, "activationTimeout", news.get("activationTimeout"), 1, 86400)
    for b in booleans:
        check_bool(f, b, news.get(b))
    check_choice(f, "compress", news.get("compress"), COMPRESSIONS)
    check_health_checks(f, news.get("healthChecks"))
    check_nix_options(f, news.get("nixOptions"))
    check_int(f, "keepGenerations", news.get("keepGenerations"), 1, 10000)


def _is_absolute_file_path(path: str) -> bool:
    """Absolute, normalized, not `/`, no `..`: a file on the target (install.extraFiles, secretFiles)."""
    return path.startswith("/") and posixpath.normpath(path) == path and path != "/" and ".." not in path.split("/")


def _is_file_path(path: str) -> bool:
    return _is_absolute_file_path(path) and len(path) <= MAX_REF and "\0" not in path


class CheckFailed(Exception):
    """A declaration its rules refuse, each failure naming its setting."""

    def __init__(self, failures: Failures) -> None:
        super().__init__("; ".join(f"{p}: {r}" for p, r in failures.items))
        self.failures = failures
