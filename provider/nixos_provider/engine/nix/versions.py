"""Everything that differs between the Nix versions users run, in one place.

Supported and tested: Debian bookworm's Nix 2.8, trixie's 2.26 and sid's 2.34
(see docs/nix-versions.md). The differences the engine meets:

- `nix path-info --json` prints a list of objects with a `path` field up to
  2.18, and an object keyed by store path from 2.19 on (a path that is not
  valid maps to null). From 2.33 on `--json` without `--json-format` is
  deprecated ("will become an error"); format 1 is the object form, format 2
  adds a `version` field and structured hashes, and keys and references may
  be base names without the store directory. Whether a version knows
  `--json-format` is found out by asking it (rejects_flag), not by a table.
- `nix build --json` prints a list of `{drvPath, outputs: {name: path}}` in
  every version; newer ones add fields (startTime, stopTime, ...).
- `nix-env --list-generations` prints `N   YYYY-MM-DD HH:MM:SS   (current)`
  in every version.
- Binary caches: `nix copy --to 'file://DIR?secret-key=FILE'` signs what it
  uploads with the key in FILE in 2.8, 2.26 and 2.34 alike (the store
  setting `secret-key`), and each prints `copying path '<path>' to '<url>'...`
  on stderr for every path it uploads (none for a path the cache already
  has). `nix-store --realise` takes `--option substituters/trusted-public-keys`
  in every version; a root client of the daemon is trusted, so they apply.
- Errors: 2.8 prints `error: <what>` on one line; later versions often print
  an empty `error:` followed by an evaluation trace (`… while calling`, code
  frames) and the cause as an indented `error:` at the end of the trace.
  With `--show-trace`, 2.8 prints the trace after the cause, innermost frame
  first; 2.13 and later print it before the cause, innermost frame last. Only
  2.13 and later name the position of a `throw` in the user's own file.

The parsers take the text a command printed and never run anything, so their
unit tests feed them outputs recorded from each real version
(tests/data/nix-outputs/).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

STORE_DIR = "/nix/store"


class NixOutputError(ValueError):
    """A Nix command printed something this module does not understand."""


@dataclass(frozen=True, order=True)
class NixVersion:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> NixVersion:
        """From `nix --version` output: `nix (Nix) 2.8.0`, `nix (Nix) 2.34.8`, `nix (Determinate Nix 3.8.2) 2.30.2`."""
        m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?\S*\s*$", text.strip().splitlines()[0] if text.strip() else "")
        if not m:
            raise NixOutputError(f"cannot read a Nix version from {text.strip()[:80]!r}")
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


# Asked for where the version knows it: format 1 is the keyed object of 2.19+,
# which parse_path_info reads, and asking for it silences 2.33+'s warning.
PATH_INFO_JSON_FORMAT = ["--json-format", "1"]


def rejects_flag(stderr: str, flag: str) -> bool:
    """Did a Nix command fail because this version does not know `flag`?"""
    return f"unrecognised flag '{flag}'" in stderr or f"unrecognized flag '{flag}'" in stderr


@dataclass(frozen=True)
class PathInfo:
    """What the store knows of one valid path: enough to register it in another store as it is here."""

    path: str
    nar_size: int
    references: tuple[str, ...]
    nar_hash: str = ""  # SRI (`sha256-...`) or `sha256:...`, as Nix printed it
    deriver: str = ""
    registration_time: int = 0
    ultimate: bool = False
    signatures: tuple[str, ...] = ()
    ca: str = ""  # the content address in Nix's text form (`fixed:r:sha256:...`), "" for none


def _full_path(p: str, store_dir: str = STORE_DIR) -> str:
    return p if p.startswith("/") else f"{store_dir}/{p}"


def parse_path_info(stdout: str) -> dict[str, PathInfo]:
    """`nix path-info --json [-r]` of any supported version -> {path: PathInfo} of the valid paths."""
    try:
        data: Any = json.loads(stdout)
    except ValueError as e:
        raise NixOutputError(f"nix path-info printed no JSON: {stdout.strip()[:80]!r}") from e
    store_dir = STORE_DIR
    if isinstance(data, dict) and isinstance(data.get("info"), dict) and "version" in data:
        # --json-format 2 (2.33+): {"info": {base name: info}, "storeDir": ..., "version": 2}
        store_dir = str(data.get("storeDir") or STORE_DIR)
        data = data["info"]
    if isinstance(data, list):  # up to 2.18
        items = [(str(i.get("path", "")), i) for i in data if isinstance(i, dict)]
    elif isinstance(data, dict):  # 2.19 on, keyed by path (format 1)
        items = [(str(k), v) for k, v in data.items()]
    else:
        raise NixOutputError(f"nix path-info printed {type(data).__name__}, not a list or an object")
    infos: dict[str, PathInfo] = {}
    for key, info in items:
        if not isinstance(info, dict) or not key or info.get("valid") is False:
            continue  # not valid in this store
        path = _full_path(str(info.get("path") or key), store_dir)
        refs = tuple(_full_path(str(r), store_dir) for r in info.get("references") or ())
        deriver = info.get("deriver")
        infos[path] = PathInfo(
            path, int(info.get("narSize") or 0), refs, nar_hash=str(info.get("narHash") or ""),
            deriver=_full_path(str(deriver), store_dir) if deriver else "",
            registration_time=int(info.get("registrationTime") or 0), ultimate=bool(info.get("ultimate")),
            signatures=tuple(str(s) for s in info.get("signatures") or ()), ca=_content_address(info.get("ca")))
    return infos


# Format 2's structured content address, as the text form every Nix reads.
_CA_METHODS = {"nar": "fixed:r:", "flat": "fixed:", "text": "text:", "git": "fixed:git:"}


def _content_address(ca: object) -> str:
    """`ca` of any format -> `fixed:r:sha256:<hash>` (the form `nix-store --serve` parses), "" for none."""
    if isinstance(ca, str):
        return ca
    if not isinstance(ca, dict):
        return ""
    prefix = _CA_METHODS.get(str(ca.get("method")))
    algo, sep, b64 = str(ca.get("hash") or "").partition("-")
    if prefix is None or not sep:
        return ""
    try:
        digest = base64.b64decode(b64, validate=True)
    except ValueError:
        return ""
    return f"{prefix}{algo}:{digest.hex()}"


def parse_build_outputs(stdout: str) -> list[dict[str, str]]:
    """`nix build --json` -> the outputs of each installable, in order ({"out": path, ...})."""
    try:
        data: Any = json.loads(stdout)
    except ValueError as e:
        raise NixOutputError(f"nix build printed no JSON: {stdout.strip()[:80]!r}") from e
    if not isinstance(data, list) or not data:
        raise NixOutputError("nix build printed no results")
    result = []
    for item in data:
        outputs = item.get("outputs") if isinstance(item, dict) else None
        if not isinstance(outputs, dict) or not outputs:
            raise NixOutputError(f"nix build printed a result without outputs: {json.dumps(item)[:120]}")
        result.append({str(k): _full_path(str(v)) for k, v in outputs.items() if v})
    return result


# The binary cache store setting naming the file of the key that signs uploads.
SIGNING_KEY_STORE_SETTING = "secret-key"
_COPIED_PATH = re.compile(r"^copying path '(/[^']+)' to '")


def parse_copied_paths(stderr: str) -> list[str]:
    """The paths `nix copy --to URL` says it uploaded (stderr at the default verbosity), each once, in order."""
    seen: dict[str, None] = {}
    for line in stderr.splitlines():
        m = _COPIED_PATH.match(line.strip())
        if m:
            seen.setdefault(m.group(1))
    return list(seen)


def substituter_options(url: str, public_key: str) -> list[str]:
    """Options that make a Nix command substitute from exactly this cache, trusting exactly this key.

    A negative TTL of 0: an earlier lookup that found nothing (before the
    upload) must not hide what is there now.
    """
    return ["--option", "substituters", url, "--option", "trusted-public-keys", public_key,
            "--option", "narinfo-cache-negative-ttl", "0"]


_GEN_LINE = re.compile(r"^\s*(\d+)\s+(\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d)\s*(\(current\))?\s*$")


@dataclass(frozen=True)
class GenerationLine:
    number: int
    date: str  # ISO 8601, as nix-env prints it (local time of the target)
    current: bool


def parse_generations(stdout: str) -> list[GenerationLine]:
    """`nix-env -p PROFILE --list-generations` -> its lines, oldest first."""
    lines = []
    for line in stdout.splitlines():
        m = _GEN_LINE.match(line)
        if m:
            lines.append(GenerationLine(int(m.group(1)), f"{m.group(2)}T{m.group(3)}Z", bool(m.group(4))))
        elif line.strip():
            raise NixOutputError(f"unexpected line from nix-env --list-generations: {line.strip()[:80]!r}")
    return lines


_GC_SUMMARY = re.compile(r"^(\d+) store paths deleted, ([\d.]+ [KMGT]?i?B) freed\s*$", re.MULTILINE)


def parse_gc_summary(output: str) -> tuple[int, str]:
    """`nix-store --gc`'s last line (stdout on 2.8 to 2.34): the paths it deleted and what that freed, as Nix
    writes it (`0.00 MiB` on 2.8, `0.0 KiB` on 2.34)."""
    m = _GC_SUMMARY.search(output)
    if m is None:
        raise NixOutputError(f"nix-store --gc printed no summary: {output.strip()[-120:]!r}")
    return int(m.group(1)), m.group(2)


_TRACE = re.compile(r"^(…|at |\(stack trace|\(use '--show-trace'|\d+\||\||\^|For full logs|Try 'nix)")


def error_summary(stderr: str, max_lines: int = 8) -> str:
    """The cause of a Nix error in a few lines, without warnings, traces or code frames.

    The first top-level `error:` block is the failure; when its head is empty
    (2.13+ put a trace first), the last indented `error:` inside it is the cause.
    """
    lines = [ln.rstrip() for ln in stderr.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    if not starts:
        rest = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("warning:")]
        return rest[-1] if rest else "unknown error"
    begin = starts[0]
    end = starts[1] if len(starts) > 1 else len(lines)
    block = lines[begin:end]
    nested = [i for i, ln in enumerate(block) if i > 0 and ln.strip().startswith("error:")]
    if not block[0].removeprefix("error:").strip() and nested:
        block = block[nested[-1]:]
    msg = [block[0].strip().removeprefix("error:").strip()]
    for ln in block[1:]:
        text = ln.strip()
        if text and not _TRACE.match(text) and not text.startswith("warning:"):
            msg.append(text)
        if len(msg) >= max_lines:
            break
    return " ".join(m for m in msg if m) or "unknown error"


def build_failure(stderr: str, log_lines: int = 10) -> str:
    """Why `nix-store --realise` failed, on one Nix as on another: the first failure (the derivation whose builder
    failed, not those that depend on it: 2.8's `builder for ... failed with exit code N`, 2.34's `Cannot build
    ...` with its reason) and the last lines its builder printed, which every version streams to stderr first.
    Several lines: `first error`, `  its indented lines`, `> log line`."""
    lines = [ln.rstrip() for ln in stderr.splitlines()]
    first = next((i for i, ln in enumerate(lines) if ln.startswith("error:")), None)
    if first is None:
        return error_summary(stderr)
    block = [lines[first]]
    for ln in lines[first + 1:]:
        if not ln.startswith(" "):
            break
        block.append(ln)
    began = max((i for i in range(first) if lines[i].startswith("building '")), default=first)
    log = [ln for ln in lines[began + 1:first] if ln.strip() and not ln.startswith("warning:")][-log_lines:]
    return "\n".join([*block, *(f"> {ln}" for ln in log)])


_OPTION_FRAME = re.compile(r"^… while evaluating the option `(.+)':$")
_AT_FRAME = re.compile(r"^at (.+):(\d+):(\d+):$")
# A source tree is nixpkgs when the trace passes through its module system.
_NIXPKGS_FILE = re.compile(r"^(.*?)/(?:lib/modules\.nix|nixos/modules/.*)$")
# Every NixOS configuration is evaluated through this option: it says nothing.
_TOPLEVEL_OPTION = "system.build.toplevel"
# The module system's own messages name their option: another one from the trace would only confuse.
_NAMES_OPTION = re.compile(r"option (?:value )?`")


def evaluation_error(stderr: str, max_lines: int = 8) -> str:
    """The cause of a failed evaluation (`nix eval --show-trace`): what went wrong, the option being evaluated
    and the position in the user's own files, without the frames inside nixpkgs.

    `The option `services.nginx.enabel' does not exist. ...`, `no domain for this machine (option
    `networking.domain`, at /nix/store/...-source/flake.nix:23:51)`.
    """
    lines = [ln.strip() for ln in stderr.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    if not starts:
        return error_summary(stderr, max_lines)
    cause = starts[-1] if len(starts) > 1 and lines[starts[0]] == "error:" else starts[0]
    message = [lines[cause].removeprefix("error:").strip()]
    for ln in lines[cause + 1:]:
        if not ln or _TRACE.match(ln) or ln.startswith("error:") or len(message) >= max_lines:
            break
        message.append(ln)
    text = " ".join(m for m in message if m) or "unknown error"
    # Innermost frame first: after the cause in 2.8, before it (read backwards) in 2.13 and later.
    frames = lines[cause - 1::-1] if any(ln.startswith("…") for ln in lines[:cause]) else lines[cause + 1:]
    nixpkgs = {m.group(1) for f in frames if (a := _AT_FRAME.match(f)) and (m := _NIXPKGS_FILE.match(a.group(1)))}
    option = next((m.group(1) for f in frames if (m := _OPTION_FRAME.match(f))), None)
    at = next((a for f in frames if (a := _AT_FRAME.match(f))
               and not any(a.group(1).startswith(root + "/") for root in nixpkgs)), None)
    where = []
    if option and option != _TOPLEVEL_OPTION and not _NAMES_OPTION.search(text):
        where.append(f"option `{option}`")
    if at is not None and "- In `" not in text:
        where.append(f"at {at.group(1)}:{at.group(2)}:{at.group(3)}" + _source_line(lines, at))
    return f"{text} ({', '.join(where)})" if where else text


_CODE_FRAME = re.compile(r"^(\d+)\| ?(.*)$")


def _source_line(lines: list[str], at: re.Match[str]) -> str:
    """The line of the user's file that the position points into, as Nix printed it under `at …:`."""
    start = lines.index(at.group(0))
    for ln in lines[start + 1:start + 6]:
        if (code := _CODE_FRAME.match(ln)) and code.group(1) == at.group(2) and code.group(2).strip():
            text = code.group(2).strip()
            return f": `{text if len(text) <= 100 else text[:99] + '…'}`"
    return ""
