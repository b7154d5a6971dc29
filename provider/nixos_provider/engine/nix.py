"""Thin typed wrappers around the deployer's nix CLI.

Every local Nix call goes through one installation: the configured nix
command, and the `nix-store` beside it (not whichever one PATH finds). What
differs between Nix versions (2.8 to 2.34) is nix_versions' business.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NixError, Setting
from .nix_versions import (
    PATH_INFO_JSON_FORMAT,
    NixOutputError,
    PathInfo,
    error_summary,
    parse_build_outputs,
    parse_copied_paths,
    parse_path_info,
    rejects_flag,
)
from .process import LOCAL
from .timeline import Step, span

__all__ = ["FlakeRef", "Nix", "PathInfo", "is_store_path", "parse_flake_ref"]

STORE_PATH_RE = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+$")
EXPERIMENTAL = ["--extra-experimental-features", "nix-command flakes"]


def is_store_path(value: str) -> bool:
    return bool(STORE_PATH_RE.match(value))


def split_attr_path(attr: str) -> list[str]:
    """`nixosConfigurations."web.example".config` -> its names, as Nix reads an attribute path."""
    names: list[str] = []
    current, quoted, i = "", False, 0
    while i < len(attr):
        c = attr[i]
        if quoted and c == "\\" and i + 1 < len(attr):
            current += attr[i + 1]
            i += 1
        elif c == '"':
            quoted = not quoted
        elif c == "." and not quoted:
            names.append(current)
            current = ""
        else:
            current += c
        i += 1
    if quoted:
        raise ValueError(f"attribute path {attr!r} has an unclosed quote")
    names.append(current)
    if any(n == "" for n in names):
        raise ValueError(f"attribute path {attr!r} has an empty name")
    return names


# Evaluates the out paths of many attributes of one flake in one process. The
# request (the flake and the attribute paths) arrives as JSON in the
# environment, so nothing a user wrote is ever pasted into the expression.
EVAL_MANY_ENV = "PULUMI_NIXOS_EVAL_REQUEST"
EVAL_MANY_EXPR = f"""
let
  request = builtins.fromJSON (builtins.getEnv "{EVAL_MANY_ENV}");
  flake = builtins.getFlake request.flake;
  get = path: builtins.foldl' (value: name: builtins.getAttr name value) flake path;
in map (path: (get path).outPath) request.attrs
"""


TOPLEVEL = "config.system.build.toplevel"
DISKO_SCRIPT = "config.system.build.diskoScript"
_CONFIGURATION = re.compile(r'^nixosConfigurations\.("(?:[^"\\]|\\.)*"|[^".]+)\.(.+)$')


@dataclass(frozen=True)
class FlakeRef:
    """A flake reference split into the flake and the attribute to build.

    The one place that knows the shape of a NixOS configuration's attribute
    path: `nixosConfigurations.<name>.<rest>`, with `<name>` quoted when it
    has dots, and `<rest>` the toplevel or another build product of it.
    """

    flake: str
    attr: str

    def __str__(self) -> str:
        return f"{self.flake}#{self.attr}"

    @property
    def configuration(self) -> tuple[str, str] | None:
        """(`<name>` as written, `<rest>`) for an attribute of a NixOS configuration; None otherwise."""
        m = _CONFIGURATION.match(self.attr)
        return (m.group(1), m.group(2)) if m else None

    def of_configuration(self, name: str) -> FlakeRef:
        """The same attribute of another configuration of the flake (name unquoted, as `attrNames` gives it)."""
        own = self.configuration
        if own is None:
            raise ValueError(f"{self} is not an attribute of a NixOS configuration")
        return FlakeRef(self.flake, f"nixosConfigurations.{quote_attr(name)}.{own[1]}")

    def build_product(self, rest: str) -> FlakeRef | None:
        """Another build product of this toplevel's configuration (e.g. DISKO_SCRIPT); None if this is no toplevel."""
        own = self.configuration
        if own is None or own[1] != TOPLEVEL:
            return None
        return FlakeRef(self.flake, f"nixosConfigurations.{own[0]}.{rest}")

    @property
    def system(self) -> FlakeRef | None:
        """The configuration's `config`, for tools that take a NixOS system (nixos-anywhere); None if no toplevel."""
        return self.build_product("config")


def quote_attr(name: str) -> str:
    """A name as it is written in an attribute path: quoted when Nix would not read it bare."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'-]*", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
        attr = f"nixosConfigurations.{attr}.{TOPLEVEL}"
    return FlakeRef(flake, attr)


# What each nix command answered about --json-format, learnt on first use and
# kept for the life of the process (one installation answers the same).
_PATH_INFO_FORMAT: dict[tuple[str, ...], list[str]] = {}


class Nix:
    """The local nix CLI. `command` is e.g. ["nix"]; `options` are extra `--option name value` pairs."""

    def __init__(self, command: Sequence[str] = ("nix",), options: Sequence[tuple[str, str]] = ()) -> None:
        self.command = list(command)
        self.options = [a for name, value in options for a in ("--option", name, value)]

    def _argv(self, *args: str) -> list[str]:
        return [*self.command, *EXPERIMENTAL, *self.options, *args]

    def legacy_tool(self, name: str) -> str:
        """The path of `nix-store` or `nix-env` of the same installation as the nix command.

        Nix installs them beside `nix` (links to the same program), so a
        nixCommand of /opt/nix-2.34/bin/nix never mixes with another
        installation's nix-store found on PATH.
        """
        program = shutil.which(self.command[0])
        if program is None:
            raise NixError(f"`{self.command[0]}` ({Setting.NIX_COMMAND.value}) was not found on PATH",
                           blames=Setting.NIX_COMMAND)
        tool = os.path.join(os.path.dirname(os.path.abspath(program)), name)
        if not os.access(tool, os.X_OK):
            raise NixError(f"{program} has no `{name}` beside it: {Setting.NIX_COMMAND.value} must be the `nix` "
                           "program of a Nix installation", blames=Setting.NIX_COMMAND)
        return tool

    def store_argv(self, *args: str) -> list[str]:
        """A `nix-store` command line of this installation, with the resource's options."""
        return [self.legacy_tool("nix-store"), *self.options, *args]

    async def _run(self, *args: str, what: str, timeout: float | None = None) -> str:
        res = await LOCAL.run(self._argv(*args), check=False, timeout=timeout)
        if res.exit_status != 0:
            raise NixError(f"{what} failed: {error_summary(res.stderr)}")
        return res.stdout

    async def eval_out_path(self, ref: FlakeRef) -> str:
        """Evaluate (not build) the output path of a flake attribute."""
        with span(str(ref), Step.EVALUATE):
            out = await self._run("eval", "--raw", f"{ref.flake}#{ref.attr}.outPath", what=f"evaluating {ref}")
        path = out.strip()
        if not is_store_path(path):
            raise NixError(f"evaluating {ref} gave {path!r}, which is not a store path")
        return path

    async def attr_names(self, flake: str, attr: str) -> list[str]:
        """The names of an attribute set in a flake (e.g. its nixosConfigurations), without evaluating them."""
        out = await self._run("eval", "--json", f"{flake}#{attr}", "--apply", "builtins.attrNames",
                              what=f"listing {flake}#{attr}")
        try:
            names = json.loads(out)
        except ValueError as e:
            raise NixError(f"listing {flake}#{attr}: nix eval printed no JSON") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise NixError(f"listing {flake}#{attr} gave {out[:100]!r}, not a list of names")
        return names

    async def eval_out_paths(self, flake: str, attrs: list[str], *, background: bool = False) -> dict[str, str]:
        """Evaluate the output paths of many attributes of one flake in one Nix process.

        --impure only because builtins.getFlake refuses unlocked references
        (a local path) in pure mode; the flake itself is evaluated as usual.
        In the background, the process runs at low CPU priority.
        """
        request = json.dumps({"flake": flake, "attrs": [split_attr_path(a) for a in attrs]})
        with span(f"{flake} ({len(attrs)} configurations)", Step.EVALUATE):
            res = await LOCAL.run(self._argv("eval", "--json", "--impure", "--expr", EVAL_MANY_EXPR), check=False,
                                  env={**os.environ, EVAL_MANY_ENV: request}, niceness=10 if background else 0)
        if res.exit_status != 0:
            raise NixError(f"evaluating {len(attrs)} configurations of {flake} failed: {error_summary(res.stderr)}")
        try:
            paths = json.loads(res.stdout)
        except ValueError as e:
            raise NixError(f"evaluating {flake}: nix eval printed no JSON") from e
        if not isinstance(paths, list) or len(paths) != len(attrs) or not all(
                isinstance(p, str) and is_store_path(p) for p in paths):
            raise NixError(f"evaluating {flake} gave {str(paths)[:200]}, not one store path per configuration")
        return dict(zip(attrs, paths, strict=True))

    async def build_outputs(self, flake: str, attrs: list[str]) -> set[str]:
        """Build many attributes of one flake in one `nix build`; the `out` paths it produced.

        A set, because `nix build --json` does not list its results in the
        order of the installables.
        """
        installables = [str(FlakeRef(flake, a)) for a in attrs]
        with span(f"{flake} ({len(attrs)} configurations)", Step.BUILD):
            out = await self._run("build", "--no-link", "--json", *installables,
                                  what=f"building {len(attrs)} configurations of {flake}")
        try:
            return {o["out"] for o in parse_build_outputs(out) if "out" in o}
        except NixOutputError as e:
            raise NixError(f"building {flake}: {e}") from e

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
        # A store path is a plain installable; `^out` would be needed only for .drv files.
        with span(installable, Step.BUILD):
            out = await self._run("build", "--no-link", "--json", installable, what=f"building {installable}")
        try:
            outputs = parse_build_outputs(out)[0]
        except NixOutputError as e:
            raise NixError(f"building {installable}: {e}") from e
        if "out" not in outputs:
            raise NixError(f"building {installable} gave no `out` output (outputs: {', '.join(outputs)})")
        return outputs["out"]

    async def copy_to(self, url: str, paths: Sequence[str], *, what: str) -> list[str]:
        """`nix copy --to url` of the paths' closures; the paths it uploaded (those the store lacked)."""
        res = await LOCAL.run(self._argv("copy", "--to", url, *paths), check=False)
        if res.exit_status != 0:
            raise NixError(f"{what} failed: {error_summary(res.stderr)}")
        return parse_copied_paths(res.stderr)

    async def is_valid(self, path: str) -> bool:
        res = await LOCAL.run(self.store_argv("--check-validity", path), check=False)
        return res.exit_status == 0

    async def closure(self, path: str) -> list[PathInfo]:
        """The closure of path, dependencies first, with NAR sizes."""
        # A .drv installable means its outputs unless --derivation says otherwise.
        drv = ["--derivation"] if path.endswith(".drv") else []
        listing = self._run_store("-qR", path)
        reading = self._path_infos("-r", *drv, path, what=f"reading the closure of {path}")
        # Both to the end, even when one fails: a task left behind would be
        # cancelled later, and asyncio (3.11) can hang cancelling a process
        # that is still starting.
        listed, infos = await asyncio.gather(listing, reading, return_exceptions=True)
        for outcome in (listed, infos):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(listed, str) and isinstance(infos, dict)
        return [infos[p] for p in listed.split() if p in infos]

    async def _path_infos(self, *args: str, what: str) -> dict[str, PathInfo]:
        known = _PATH_INFO_FORMAT.get(tuple(self.command))
        if known is None:
            res = await LOCAL.run(self._argv("path-info", "--json", *PATH_INFO_JSON_FORMAT, *args), check=False)
            if res.exit_status == 0:
                _PATH_INFO_FORMAT[tuple(self.command)] = PATH_INFO_JSON_FORMAT
                out = res.stdout
            elif rejects_flag(res.stderr, "--json-format"):
                _PATH_INFO_FORMAT[tuple(self.command)] = []  # before 2.33: the only JSON there is
                out = await self._run("path-info", "--json", *args, what=what)
            else:
                raise NixError(f"{what} failed: {error_summary(res.stderr)}")
        else:
            out = await self._run("path-info", "--json", *known, *args, what=what)
        try:
            return parse_path_info(out)
        except NixOutputError as e:
            raise NixError(f"{what}: {e}") from e

    async def _run_store(self, *args: str) -> str:
        res = await LOCAL.run(self.store_argv(*args), check=False)
        if res.exit_status != 0:
            raise NixError(f"nix-store {' '.join(args[:2])} failed: {error_summary(res.stderr)}")
        return res.stdout
