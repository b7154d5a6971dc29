"""The rules of NixosMachine's own inputs beyond their types: the system's source, `install`, `secretFiles`,
`binaryCache` (which the provider's configuration shares). Each failure names the property; secrets are never
echoed."""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any

from ..models import INSTALL_PHASES
from ..nix.cli import resolve_path
from ..target.secret_files import STAGES
from .checks import (
    MAX_REF,
    Failures,
    _is_absolute_file_path,
    _is_file_path,
    check_bool,
    check_choice,
    check_int,
    check_seconds,
    check_store_path,
)
from .values import kind_of, known, short

SYSTEM_SOURCES = ("flake", "systemPath", "configuration", "expression")
_ATTRIBUTE = re.compile(r"[^\x00-\x1f\x7f]+")


def check_system_source(f: Failures, news: dict[str, Any], base_dir: str | None) -> None:
    """NixosMachine's system: exactly one of `flake`, `systemPath`, `configuration` (with `nixpkgs`) and
    `expression` (with `attribute`, and `nixpkgs` if it likes); the files are on this machine."""
    given = [k for k in SYSTEM_SOURCES if news.get(k) is not None]
    if len(given) > 1:
        f.add(given[1], f"set exactly one of `flake`, `systemPath`, `configuration` and `expression`, not both "
                        f"`{given[0]}` and `{given[1]}`")
    elif not given:
        f.add("flake", "set exactly one of `flake` (e.g. `.#web`), `systemPath` (a /nix/store path), `configuration` "
                       "(a configuration.nix, with `nixpkgs`) and `expression` (a Nix file, with `attribute`)")
    configuration, expression = news.get("configuration"), news.get("expression")
    nixpkgs, attribute = news.get("nixpkgs"), news.get("attribute")
    if configuration is not None and nixpkgs is None:
        f.add("nixpkgs", "is required with `configuration`: the nixpkgs tree to evaluate it with, as a path (its "
                         "`nixos` folder evaluates the configuration, and `<nixpkgs>` means it)")
    if nixpkgs is not None and configuration is None and expression is None:
        f.add("nixpkgs", "goes with `configuration` or `expression` only (a flake pins its own nixpkgs)")
    if expression is not None and attribute is None:
        f.add("attribute", "is required with `expression`: the attribute of the file that is the machine's NixOS "
                           "system, as `nixos-rebuild --file F --attr A` takes it")
    if attribute is not None and expression is None:
        f.add("attribute", "goes with `expression` only")
    _check_local_path(f, "configuration", configuration, base_dir, "a NixOS configuration module (configuration.nix)")
    _check_local_path(f, "expression", expression, base_dir, "a Nix file")
    _check_local_path(f, "nixpkgs", nixpkgs, base_dir, "a nixpkgs tree", inside="nixos/default.nix")
    if known(attribute) and not (isinstance(attribute, str) and len(attribute) <= MAX_REF
                                  and _ATTRIBUTE.fullmatch(attribute) and not attribute.startswith(("-", "."))
                                  and not attribute.endswith(".")):
        f.add("attribute", f"{short(attribute)} is not an attribute path, such as `web` or `machines.web`")


def _check_local_path(f: Failures, prop: str, v: Any, base_dir: str | None, what: str, inside: str = "") -> None:
    """A file or folder on this machine (a folder of a Nix file has its default.nix); relative to base_dir."""
    if not known(v):
        return
    if not isinstance(v, str) or not v or len(v) > MAX_REF or "\0" in v:
        f.add(prop, f"{short(v)} is not a path to {what}")
        return
    path = resolve_path(v, base_dir)
    if not os.path.exists(path):
        f.add(prop, f"{path} does not exist (a relative path starts at the Pulumi project's folder)")
    elif inside and not os.path.isfile(os.path.join(path, inside)):
        f.add(prop, f"{path} is not {what}: it has no {inside}")
    elif not inside and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "default.nix")):
        f.add(prop, f"{path} is a folder without a default.nix, not {what}")


def _check_string_list(f: Failures, prop: str, v: Any, *, non_empty: bool = False) -> None:
    if not known(v):
        return
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v) or (non_empty and not v):
        f.add(prop, "must be a non-empty list of strings" if non_empty else "must be a list of strings")


def _check_file_map(f: Failures, prop: str, v: Any, what: str) -> None:
    """Keys are absolute paths on the target; values are contents (never echoed: they are secret)."""
    if not known(v):
        return
    if not isinstance(v, dict):
        f.add(prop, f"must be an object mapping absolute paths to {what}")
        return
    for path, content in v.items():
        if not (isinstance(path, str) and _is_absolute_file_path(path)):
            f.add(f"{prop}[{path!r}]", "must be a normalized absolute file path such as `/etc/ssh/ssh_host_ed25519_key`")
        elif known(content) and not isinstance(content, str):
            f.add(f"{prop}[{path!r}]", f"must be the {what} as a string")


def check_install(f: Failures, news: dict[str, Any]) -> None:
    """install: what nixos-anywhere needs, caught before anything touches the host."""
    inst = news.get("install")
    if not known(inst):
        return
    if not isinstance(inst, dict):
        f.add("install", "must be an object (see the Install type)")
        return
    _check_string_list(f, "install.command", inst.get("command"), non_empty=True)
    _check_string_list(f, "install.extraArgs", inst.get("extraArgs"))
    phases = inst.get("phases")
    _check_string_list(f, "install.phases", phases)
    if known(phases) and isinstance(phases, list):
        for i, ph in enumerate(phases):
            check_choice(f, f"install.phases[{i}]", ph, INSTALL_PHASES)
        if "install" not in phases or "reboot" not in phases:
            f.add("install.phases", "must include `install` and `reboot`: the provider manages the machine once it "
                  "has rebooted into the installed system (leave out `kexec`, and `disko`, when they are done already)")
    _check_file_map(f, "install.extraFiles", inst.get("extraFiles"), "file content")
    _check_file_map(f, "install.diskEncryptionKeys", inst.get("diskEncryptionKeys"), "key")
    for b in ("copyHostKeys", "substituteOnDestination"):
        check_bool(f, f"install.{b}", inst.get(b))
    check_choice(f, "install.buildOn", inst.get("buildOn"), ("auto", "local", "remote"))
    check_store_path(f, "install.diskoScript", inst.get("diskoScript"))
    check_int(f, "install.sshPort", inst.get("sshPort"), 1, 65535)
    check_seconds(f, "install.timeout", inst.get("timeout"), 10, 86400)
    kexec = inst.get("kexecUrl")
    if known(kexec) and (not isinstance(kexec, str) or not kexec):
        f.add("install.kexecUrl", "must be a URL or a local path to a kexec tarball")
    without = next((k for k in ("systemPath", "configuration", "expression") if news.get(k) is not None), None)
    if news.get("flake") is None and without is not None:
        # nixos-anywhere builds only a flake itself; anything else goes to it built, as store paths.
        if inst.get("diskoScript") is None:
            f.add("install.diskoScript", f"is required when installing from `{without}`: nixos-anywhere takes "
                  "`--store-paths <diskoScript> <system>` (or set `flake` instead)")
        if inst.get("buildOn") == "remote":
            f.add("install.buildOn", f"`remote` lets nixos-anywhere build a `flake` on the target; `{without}` is built "
                                     "here")
    conn = news.get("connection")
    if isinstance(conn, dict) and conn.get("proxy") is not None:
        f.add("install", "cannot be used with `connection.proxy`: nixos-anywhere must reach the host directly")


# Store URL schemes `nix copy` and substituters understand; anything else is a typo.
CACHE_SCHEMES = ("file", "http", "https", "s3", "ssh", "ssh-ng", "gs")
_CACHE_URL = re.compile(r"^([a-z0-9+-]+)://\S+$")
_NIX_KEY = re.compile(r"^([^:\s]+):([A-Za-z0-9+/]+={0,2})$")


def _nix_key(value: str, size: int) -> tuple[str, bytes] | None:
    """(name, key bytes) of a Nix signing key `name:base64`, when it is one of `size` bytes."""
    m = _NIX_KEY.match(value.strip())
    if not m:
        return None
    try:
        raw = base64.b64decode(m.group(2), validate=True)
    except (binascii.Error, ValueError):
        return None
    return (m.group(1), raw) if len(raw) == size else None


def _check_cache_url(f: Failures, prop: str, v: Any) -> None:
    if not known(v):
        return
    m = _CACHE_URL.match(v) if isinstance(v, str) else None
    if not m or m.group(1) not in CACHE_SCHEMES:
        f.add(prop, f"must be a Nix store URL such as `https://cache.example.org` or `file:///srv/cache` "
                    f"(schemes: {', '.join(CACHE_SCHEMES)}), not {short(v)}")


def check_binary_cache(f: Failures, cache: Any, prop: str = "binaryCache") -> None:
    """`{url, publicKey, uploadUrl?, signingKey? | signingKeyFile?}`: each field named on failure, keys never echoed."""
    if not known(cache):
        return
    if not isinstance(cache, dict):
        f.add(prop, f"must be an object with `url` and `publicKey`, not {kind_of(cache)}")
        return
    if cache.get("url") is None:
        f.add(f"{prop}.url", "is required: the cache's URL as the targets reach it")
    _check_cache_url(f, f"{prop}.url", cache.get("url"))
    _check_cache_url(f, f"{prop}.uploadUrl", cache.get("uploadUrl"))
    public = cache.get("publicKey")
    public_key = _nix_key(public, 32) if isinstance(public, str) else None
    if cache.get("publicKey") is None:
        f.add(f"{prop}.publicKey", "is required: the key targets trust, such as `cache-1:AbC...=` "
                                   "(from `nix-store --generate-binary-cache-key`)")
    elif known(public) and public_key is None:
        f.add(f"{prop}.publicKey", "must be a Nix public key `name:base64` of 32 bytes, as "
                                   "`nix-store --generate-binary-cache-key` writes it")
    secret = cache.get("signingKey")
    if secret is not None and cache.get("signingKeyFile") is not None:
        f.add(f"{prop}.signingKeyFile", "set either `signingKey` or `signingKeyFile`, not both")
    if known(secret):
        secret_key = _nix_key(secret, 64) if isinstance(secret, str) else None
        if secret_key is None:
            # Never echo the value: it is a secret.
            f.add(f"{prop}.signingKey", "must be a Nix secret key `name:base64` of 64 bytes, as "
                                        "`nix-store --generate-binary-cache-key` writes it")
        elif public_key is not None and (secret_key[0] != public_key[0] or secret_key[1][32:] != public_key[1]):
            f.add(f"{prop}.signingKey", "is not the secret key of `publicKey`: targets would refuse what it signs")
    key_file = cache.get("signingKeyFile")
    if known(key_file) and (not isinstance(key_file, str) or not key_file.startswith("/")):
        f.add(f"{prop}.signingKeyFile", "must be the absolute path of a secret key file on the deployer")


MODE_RE = re.compile(r"^0?[0-7]{3}$")
# A user or group name as useradd accepts it, or a numeric id.
ACCOUNT_RE = re.compile(r"^(?:[a-z_][a-z0-9_-]{0,31}\$?|[0-9]{1,10})$")


def check_secret_files(f: Failures, files: Any, prop: str = "secretFiles") -> None:
    """secretFiles: absolute distinct paths, octal modes, valid accounts, known stages. Contents are never echoed."""
    if not known(files):
        return
    if not isinstance(files, list):
        f.add(prop, "must be a list of {path, content, owner, group, mode, stage}")
        return
    seen: dict[str, int] = {}
    for i, entry in enumerate(files):
        p = f"{prop}[{i}]"
        if not isinstance(entry, dict):
            f.add(p, "must be an object with `path` and `content`")
            continue
        _check_secret_file(f, p, entry)
        path = entry.get("path")
        if isinstance(path, str) and path in seen:
            f.add(f"{p}.path", f"{path!r} is already {prop}[{seen[path]}].path: each file can be declared once")
        elif isinstance(path, str):
            seen[path] = i


def _check_secret_file(f: Failures, p: str, entry: dict[str, Any]) -> None:
    if "contentHash" in entry:
        f.add(f"{p}.contentHash", "is not a property of a secret file: it is computed by the provider")
    path = entry.get("path")
    if path is None:
        f.add(f"{p}.path", "is required: the absolute path of the file on the host")
    elif known(path) and (not isinstance(path, str) or not _is_file_path(path)):
        f.add(f"{p}.path", f"{short(path)} must be a normalized absolute file path without `..`, "
              "such as `/var/lib/secrets/age.key`")
    elif known(path) and (path + "/").startswith("/nix/store/"):
        f.add(f"{p}.path", "must not be in /nix/store: the store is readable by every user, which is what "
              "secretFiles avoids")
    content = entry.get("content")
    if content is None:
        f.add(f"{p}.content", "is required: the file's content (secret)")
    for k in ("owner", "group"):
        name = entry.get(k)
        if known(name) and (not isinstance(name, str) or not ACCOUNT_RE.match(name)):
            f.add(f"{p}.{k}", f"{short(name)} is not a valid {'user' if k == 'owner' else 'group'} name or id")
    mode = entry.get("mode")
    if known(mode) and (not isinstance(mode, str) or not MODE_RE.match(mode)):
        f.add(f"{p}.mode", f"{short(mode)} must be an octal mode as a string, such as \"0400\" or \"0640\"")
    check_choice(f, f"{p}.stage", entry.get("stage"), STAGES)
    check_bool(f, f"{p}.keepOnDestroy", entry.get("keepOnDestroy"))
