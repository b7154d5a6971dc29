"""Thin typed wrappers around the deployer's nix CLI.

Works with Nix 2.8 (Debian's) and current Nix: no `--print-out-paths`, no
`nix store diff-closures --json`; `nix build --json` and `nix path-info --json`
exist in both.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NixError
from .process import run_local

STORE_PATH_RE = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+$")
EXPERIMENTAL = ["--extra-experimental-features", "nix-command flakes"]


def is_store_path(value: str) -> bool:
    return bool(STORE_PATH_RE.match(value))


@dataclass(frozen=True)
class FlakeRef:
    """A flake reference split into the flake and the attribute to build."""

    flake: str
    attr: str

    def __str__(self) -> str:
        return f"{self.flake}#{self.attr}"


def parse_flake_ref(ref: str, base_dir: str | None = None, *, nixos: bool = True) -> FlakeRef:
    """`.#web` -> (<abs dir>, nixosConfigurations.web.config.system.build.toplevel).

    Relative paths resolve against base_dir (the Pulumi project directory), not
    the provider's working directory. A full attribute path is kept as given.
    """
    if "#" not in ref:
        raise ValueError(f"flake reference {ref!r} has no `#attribute` (e.g. `.#web`)")
    flake, attr = ref.split("#", 1)
    if not attr:
        raise ValueError(f"flake reference {ref!r} has an empty attribute")
    scheme = ""
    for prefix in ("path:", "git+file:"):
        if flake.startswith(prefix):
            scheme, flake = prefix, flake[len(prefix):]
    looks_like_path = scheme != "" or (":" not in flake and (flake.startswith((".", "/")) or "/" in flake))
    if flake == "" or (looks_like_path and not flake.startswith("/")):
        flake = os.path.normpath(os.path.join(base_dir or os.getcwd(), flake or "."))
    flake = scheme + flake
    if nixos and "." not in attr and '"' not in attr:
        attr = f"nixosConfigurations.{attr}.config.system.build.toplevel"
    return FlakeRef(flake, attr)


@dataclass(frozen=True)
class PathInfo:
    path: str
    nar_size: int
    references: tuple[str, ...]


class Nix:
    """The local nix CLI. `command` is e.g. ["nix"]; `options` are extra `--option name value` pairs."""

    def __init__(self, command: Sequence[str] = ("nix",), options: Sequence[tuple[str, str]] = ()) -> None:
        self.command = list(command)
        self.options = [a for name, value in options for a in ("--option", name, value)]

    def _argv(self, *args: str) -> list[str]:
        return [*self.command, *EXPERIMENTAL, *self.options, *args]

    async def _run(self, *args: str, what: str, timeout: float | None = None) -> str:
        res = await run_local(self._argv(*args), timeout=timeout)
        if res.exit_status != 0:
            raise NixError(f"{what} failed: {_nix_error(res.stderr)}")
        return res.stdout

    async def eval_out_path(self, ref: FlakeRef) -> str:
        """Evaluate (not build) the output path of a flake attribute."""
        out = await self._run("eval", "--raw", f"{ref.flake}#{ref.attr}.outPath", what=f"evaluating {ref}")
        path = out.strip()
        if not is_store_path(path):
            raise NixError(f"evaluating {ref} gave {path!r}, which is not a store path")
        return path

    async def eval_drv_path(self, ref: FlakeRef) -> str:
        """Instantiate (not build) the derivation of a flake attribute."""
        out = await self._run("eval", "--raw", f"{ref.flake}#{ref.attr}.drvPath", what=f"instantiating {ref}")
        path = out.strip()
        if not path.endswith(".drv") or not is_store_path(path):
            raise NixError(f"instantiating {ref} gave {path!r}, which is not a derivation")
        return path

    async def build(self, ref: FlakeRef | str) -> str:
        """Build a flake attribute or realise a store path; return the output path."""
        installable = str(ref)
        out = await self._run("build", "--no-link", "--json", installable, what=f"building {installable}")
        try:
            return str(json.loads(out)[0]["outputs"]["out"])
        except (ValueError, KeyError, IndexError) as e:
            raise NixError(f"building {installable}: unexpected output from nix build") from e

    async def is_valid(self, path: str) -> bool:
        res = await run_local(["nix-store", "--check-validity", path])
        return res.exit_status == 0

    async def closure(self, path: str) -> list[PathInfo]:
        """The closure of path, dependencies first, with NAR sizes."""
        order = (await self._run_store("-qR", path)).split()
        # A .drv installable means its outputs unless --derivation says otherwise.
        drv = ["--derivation"] if path.endswith(".drv") else []
        out = await self._run("path-info", "--json", "-r", *drv, path, what=f"reading the closure of {path}")
        infos = {i["path"]: i for i in json.loads(out)}
        return [
            PathInfo(p, int(infos[p].get("narSize", 0)), tuple(infos[p].get("references", ())))
            for p in order
            if p in infos
        ]

    async def _run_store(self, *args: str) -> str:
        res = await run_local(["nix-store", *args])
        if res.exit_status != 0:
            raise NixError(f"nix-store {' '.join(args[:2])} failed: {_nix_error(res.stderr)}")
        return res.stdout


def _nix_error(stderr: str) -> str:
    """The meaningful lines of a nix error, without download warnings or traces."""
    lines = [
        ln.rstrip() for ln in stderr.splitlines()
        if ln.strip() and not ln.startswith("warning:")
    ]
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith("error:"):
            msg = [ln.strip().removeprefix("error:").strip()] + [x.strip() for x in lines[i + 1:i + 4]]
            return " ".join(x for x in msg if x and not x.startswith("…") and not x.startswith("("))
    return lines[-1].strip() if lines else "unknown error"
