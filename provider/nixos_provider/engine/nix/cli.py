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
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import NixError, Setting
from ..timeline import Step, span
from ..transport.process import LOCAL
from .versions import (
    PATH_INFO_JSON_FORMAT,
    NixOutputError,
    PathInfo,
    error_summary,
    evaluation_error,
    parse_build_outputs,
    parse_copied_paths,
    parse_path_info,
    rejects_flag,
)

__all__ = ["Evaluation", "FileRef", "FlakeRef", "Nix", "PathInfo", "SourceRef", "is_store_path", "parse_flake_ref"]

STORE_PATH_RE = re.compile(r"^/nix/store/[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]+$")
EXPERIMENTAL = ["--extra-experimental-features", "nix-command flakes"]


def is_store_path(value: str) -> bool:
    return bool(STORE_PATH_RE.match(value))


_STORE_SOURCE = re.compile(r"/nix/store/[0-9a-z]{32}-source/([^\s:`'\"]+)")


def local_flake_dir(flake: str) -> Path | None:
    """The directory of a flake on this machine (`path:`, `git+file://` or a plain path), if it is one."""
    url = flake.split("?", 1)[0]
    for prefix in ("path:", "git+file://", ""):
        if url.startswith(prefix) and url[len(prefix):].startswith("/"):
            folder = Path(url[len(prefix):])
            return folder if folder.is_dir() else None
    return None


def in_local_files(message: str, flake: str) -> str:
    """Positions in the store copy of a local flake, shown in the user's own files: the same relative path under
    the flake's directory, with the same content (so never a file of another input, or one edited since)."""
    folder = local_flake_dir(flake)
    if folder is None:
        return message

    def local(m: re.Match[str]) -> str:
        mine = folder / m.group(1)
        try:
            same = mine.is_file() and Path(m.group(0)).read_bytes() == mine.read_bytes()
        except OSError:
            same = False
        return str(mine) if same else m.group(0)

    return _STORE_SOURCE.sub(local, message)


def git_top(folder: Path) -> Path | None:
    """The work tree a directory is in (where `.git` is: a directory, or a file in a linked work tree)."""
    for candidate in (folder, *folder.parents):
        if (candidate / ".git").exists():
            return candidate
    return None


# Nix 2.34 and later say it themselves; the command that mends it is cut with the trace (evaluation_error).
_NOT_TRACKED = re.compile(r"Path '([^']+)' in the repository \"([^\"]+)\" is not tracked by Git")


def untracked_hint(message: str, flake: str) -> str:
    """A file that a flake in a Git repository needs but Git does not track. Nix copies only the tracked files,
    and before 2.34 it names the file missing from that copy (`getting status of '/nix/store/…-source/modules'`),
    which reads as if the user's file were gone: say which of their files it is, and how to make Nix see it."""
    told = _NOT_TRACKED.search(message)
    if told is not None:
        top, rel = told.group(2), told.group(1)
    else:
        folder = None if flake.startswith("path:") else local_flake_dir(flake)  # `path:` copies every file
        work_tree = git_top(folder) if folder is not None else None
        if work_tree is None:
            return message
        missing = (m.group(1) for m in _STORE_SOURCE.finditer(message) if not os.path.lexists(m.group(0)))
        top, rel = str(work_tree), next((r for r in missing if os.path.lexists(work_tree / r)), "")
        if not rel:
            return message
        message += f". `{rel}` is in {top}, but Git does not track it, and Nix sees only the files Git tracks"
    return f"{message}. Run `git -C {shlex.quote(top)} add {shlex.quote(rel)}` to make it visible to Nix"


# What one evaluation answers: the out path and the derivation of one attribute, as JSON.
# drvPath is there for every derivation at no extra cost (computing the out
# path instantiates it); `or null` keeps an attribute that is a plain store path working.
EVALUATE_APPLY = "x: { out = x.outPath; drv = x.drvPath or null; }"
# The same for an attribute of a Nix file, which may be a NixOS evaluation (what `import <nixpkgs/nixos> { ... }`
# and `lib.nixosSystem` give) or the system derivation itself.
EVALUATE_ANY_APPLY = ("x: let top = if x ? config.system.build.toplevel then x.config.system.build.toplevel else x; "
                      "in { out = top.outPath; drv = top.drvPath or null; }")


@dataclass(frozen=True)
class Evaluation:
    """What evaluating (not building) a flake attribute gives."""

    out_path: str
    drv_path: str | None


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
    def source(self) -> str:
        """What identifies the input, for the evaluator's keys."""
        return self.flake

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


@dataclass(frozen=True)
class FileRef:
    """A NixOS system without a flake, as nixos-rebuild, colmena and morph take one.

    With `attr` empty, `file` is a NixOS configuration module (`configuration.nix`), evaluated with
    `<nixpkgs>/nixos` as `nixos-rebuild` does; else `file` is a Nix file and `attr` the attribute in it that is a
    NixOS evaluation or a system (`nixos-rebuild --file F --attr A`). `nixpkgs`: what `<nixpkgs>` means while
    evaluating (required for a configuration module). Every value reaches Nix as an argument of its own
    (`--argstr`, `-I`, the attribute path), never inside an expression.
    """

    file: str  # absolute
    attr: str = ""
    nixpkgs: str | None = None  # absolute

    def __str__(self) -> str:
        return f"{self.attr} of {self.file}" if self.attr else self.file

    @property
    def source(self) -> str:
        """What identifies the input, for the evaluator's keys."""
        return json.dumps([self.file, self.nixpkgs])

    @property
    def configuration(self) -> None:
        """Never a flake's NixOS configuration: nothing to guess siblings from."""
        return None

    def eval_args(self) -> list[str]:
        """The arguments of `nix eval` that name the system, and the --apply that reads it."""
        search = ["-I", f"nixpkgs={self.nixpkgs}"] if self.nixpkgs else []
        if not self.attr:
            assert self.nixpkgs, "a configuration module needs the nixpkgs to evaluate it with"
            return ["--file", os.path.join(self.nixpkgs, "nixos"), "--argstr", "configuration", self.file, *search,
                    "-I", f"nixos-config={self.file}", TOPLEVEL, "--apply", EVALUATE_APPLY]
        return ["--file", self.file, *search, self.attr, "--apply", EVALUATE_ANY_APPLY]


SourceRef = FlakeRef | FileRef  # what is evaluated: a flake attribute, or a system without a flake


def quote_attr(name: str) -> str:
    """A name as it is written in an attribute path: quoted when Nix would not read it bare."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'-]*", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def resolve_path(path: str, base_dir: str | None = None) -> str:
    """A local path as given, absolute: a relative one starts at base_dir (the Pulumi project's folder)."""
    return os.path.normpath(os.path.join(base_dir or os.getcwd(), path))


def names_a_configuration(ref: str) -> bool:
    """Whether a flake reference's attribute names a NixOS configuration (`#web`, whose toplevel is meant), not an
    attribute path as it is (`#packages.x86_64-linux.hello`)."""
    attribute = ref.split("#", 1)[1] if "#" in ref else ""
    return attribute != "" and "." not in attribute


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
        flake = resolve_path(flake or ".", base_dir)
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
        self.settings = tuple(options)
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

    async def evaluate(self, ref: SourceRef, *, started: Callable[[int], None] | None = None) -> Evaluation:
        """Evaluate (not build) a flake attribute or a system without a flake: its out path and derivation, in
        one Nix process.

        --show-trace costs nothing when the evaluation succeeds, and when it
        fails it names the option and the user's own file (evaluation_error).
        started: called with the process id once it runs (the evaluation pool watches its memory).
        """
        with span(str(ref), Step.EVALUATE):
            # Nix's own evaluation cache is off: the provider keeps results itself (evaluation.py), and the cache
            # would only write rows nobody reads, into one database that the flake's other evaluations also lock.
            names = (["--option", "eval-cache", "false", str(ref), "--apply", EVALUATE_APPLY]
                     if isinstance(ref, FlakeRef) else ref.eval_args())
            res = await LOCAL.run(self._argv("eval", "--json", "--show-trace", *names), check=False, started=started)
        if res.exit_status != 0:
            message = evaluation_error(res.stderr)
            if isinstance(ref, FlakeRef):
                message = untracked_hint(in_local_files(message, ref.flake), ref.flake)
            raise NixError(f"evaluating {ref} failed: {message}")
        try:
            value = json.loads(res.stdout)
        except ValueError as e:
            raise NixError(f"evaluating {ref}: nix eval printed no JSON") from e
        out, drv = (value.get("out"), value.get("drv")) if isinstance(value, dict) else (None, None)
        if not isinstance(out, str) or not is_store_path(out):
            raise NixError(f"evaluating {ref} gave {str(out)[:200]!r}, which is not a store path")
        if drv is not None and not (isinstance(drv, str) and drv.endswith(".drv") and is_store_path(drv)):
            raise NixError(f"evaluating {ref} gave the derivation {str(drv)[:200]!r}, which is not one")
        return Evaluation(out, drv)

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

    async def flake_fingerprint(self, flake: str) -> str | None:
        """What identifies the flake's content and its locked inputs, without evaluating anything; None when
        the flake has no content hash (a Git tree with uncommitted changes has one in 2.8, 2.26 and 2.34) or Nix
        cannot say.

        `nix flake metadata --json` prints `locked` (the flake itself: a narHash or a Git revision) and `locks`
        (the lock file as Nix resolved it). Equal fingerprints mean an equal evaluation.
        """
        res = await LOCAL.run(self._argv("flake", "metadata", "--json", flake), check=False)
        if res.exit_status != 0:
            return None  # the evaluation that follows says what is wrong
        try:
            meta = json.loads(res.stdout)
        except ValueError:
            return None
        locked = meta.get("locked") if isinstance(meta, dict) else None
        if not isinstance(locked, dict) or not (locked.get("narHash") or locked.get("rev")):
            return None
        identity = {k: v for k, v in locked.items() if k != "lastModified"}
        return json.dumps({"locked": identity, "locks": meta.get("locks")},
                          sort_keys=True)

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

    async def realise(self, drv: str) -> str:
        """Build a derivation's `out` (`nix-store --realise drv!out`, the same in every Nix); its path."""
        with span(drv, Step.BUILD):
            res = await LOCAL.run(self.store_argv("--realise", f"{drv}!out"), check=False)
        if res.exit_status != 0:
            raise NixError(f"building {drv} failed: {error_summary(res.stderr)}")
        outputs = [line for line in res.stdout.split() if is_store_path(line)]
        if not outputs:
            raise NixError(f"building {drv} printed no output path")
        return outputs[0]

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

    async def requisites(self, path: str) -> list[str]:
        """`nix-store -qR`: the closure of a path; of a `.drv`, every derivation it needs (no build)."""
        return (await self._run_store("-qR", path)).split()

    async def _run_store(self, *args: str) -> str:
        res = await LOCAL.run(self.store_argv(*args), check=False)
        if res.exit_status != 0:
            raise NixError(f"nix-store {' '.join(args[:2])} failed: {error_summary(res.stderr)}")
        return res.stdout
