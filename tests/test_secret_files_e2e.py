"""secretFiles through the real `pulumi` CLI against lab hosts (issue 15, item 2).

What a user would check: the files on the host with their owner and mode, a
before-activation file that the new system's activation really reads, a
rotation that replaces the file atomically without deploying the system
again, no plaintext in state, logs or on the deployer's disk, removal of a
dropped entry, and destroy removing (or keeping) the files.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import labctl
import pytest
from conftest import PulumiProject, in_host, write_flake
from test_provider_e2e import connection, program, strip_ansi

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

KEY_PATH = "/etc/lab-secrets/age.key"  # the new system's activation reads it (the activationReads fault)
BLOB_PATH = "/etc/lab-secrets/blob"  # large enough that a non-atomic write would be seen half done
TOKEN_PATH = "/run/keys/app/token"  # written after activation
KEEP_PATH = "/etc/lab-keep/keep"  # keepOnDestroy
FLAKE = """{ outputs = { self }: let lab = import ./lib.nix; in {
  nixosConfigurations.agenix = lab.nixosConfiguration {
    hostName = "agenix"; version = "agenix"; faults.activationReads = "KEY";
  };
}; }""".replace("KEY", KEY_PATH)


def stat(host: labctl.LabHost, path: str) -> dict[str, str]:
    """Mode, owner, group, inode and mtime of a file, as the target sees it."""
    out = in_host(host, "stat", "-c", "%a %U %G %i %.9Y", path).stdout.split()
    return dict(zip(("mode", "owner", "group", "inode", "mtime"), out, strict=True))


def read(host: labctl.LabHost, path: str) -> str:
    return in_host(host, "cat", path).stdout


def exists(host: labctl.LabHost, path: str) -> bool:
    return in_host(host, "test", "-e", path, check=False).returncode == 0


def generation(host: labctl.LabHost) -> str:
    return in_host(host, "readlink", "/nix/var/nix/profiles/system").stdout.strip()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def machine(host: labctl.LabHost, flake: str, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {"web": {"type": "nixos:NixosMachine", "properties": {
        "connection": connection(host), "flake": f"{flake}#agenix", "confirmTimeout": 10, "secretFiles": files}}}


def files_program(blob_file: Path, *, token: bool = True) -> list[dict[str, Any]]:
    files: list[dict[str, Any]] = [
        {"path": KEY_PATH, "content": "${ageKey}", "owner": "nobody", "group": "nogroup", "mode": "0440"},
        {"path": BLOB_PATH, "content": {"fn::secret": {"fn::readFile": str(blob_file)}}},
        {"path": KEEP_PATH, "content": "${keepMe}", "keepOnDestroy": True, "mode": "0600"},
    ]
    if token:
        # Not marked secret by the program: Check makes it secret all the same.
        files.append({"path": TOKEN_PATH, "content": "${token}", "stage": "after-activation"})
    return files


CONFIG = {"ageKey": {"type": "string"}, "token": {"type": "string"}, "keepMe": {"type": "string"}}


def deployer_files_containing(needle: str, roots: list[Path], newer_than: float) -> list[str]:
    """Files on the deployer under roots (changed since the test began) that contain needle."""
    hits = []
    data = needle.encode()
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = Path(dirpath, name)
                try:
                    if p.is_symlink() or not p.is_file() or p.stat().st_mtime < newer_than or p.stat().st_size > 64 << 20:
                        continue
                    if data in p.read_bytes():
                        hits.append(str(p))
                except OSError:
                    continue
    return hits


class Reader(threading.Thread):
    """Reads a file on the target in a loop and records the SHA-256 of every read (what a service would see)."""

    def __init__(self, host: labctl.LabHost, path: str) -> None:
        super().__init__(daemon=True)
        script = 'while [ ! -e /run/stop-reader ]; do sha256sum < "$1" | cut -c1-64; done'
        self.proc = subprocess.Popen(labctl.nsenter(host.state, ["sh", "-c", script, "sh", path]),
                                     stdout=subprocess.PIPE, text=True)
        self.seen: list[str] = []

    def run(self) -> None:
        assert self.proc.stdout is not None
        self.seen = [line.strip() for line in self.proc.stdout]


def test_secret_files_placed_rotated_removed_and_destroyed(
        project: PulumiProject, lab_host: labctl.LabHost, tmp_path: Path) -> None:
    started = time.time() - 1
    flake = write_flake(tmp_path / "flake", FLAKE)
    key1, key2 = (f"AGE-SECRET-KEY-{secrets.token_hex(16).upper()}" for _ in range(2))
    token = f"token-{secrets.token_hex(12)}"
    keep = f"keep-{secrets.token_hex(12)}"
    blob_file = tmp_path / "inputs" / "blob"
    blob_file.parent.mkdir()
    blob1 = secrets.token_hex(150_000)  # 300 KB
    blob2 = secrets.token_hex(150_000)
    blob_file.write_text(blob1)
    program(project, machine(lab_host, flake, files_program(blob_file)), config=CONFIG)
    project.run("stack", "init", "dev")
    project.run("config", "set", "--secret", "ageKey", key1)
    project.run("config", "set", "--secret", "keepMe", keep)
    project.run("config", "set", "--plaintext", "token", token)  # plain config: the provider keeps it secret in state

    first = project.up("--logtostderr", "-v=3")

    # Placed with owner, group and mode; the activation read the key (before-activation).
    assert stat(lab_host, KEY_PATH) | {"inode": "", "mtime": ""} == {
        "mode": "440", "owner": "nobody", "group": "nogroup", "inode": "", "mtime": ""}
    assert read(lab_host, KEY_PATH) == key1
    assert in_host(lab_host, "cat", "/run/lab/activation-read").stdout.strip() == sha256(key1)
    assert stat(lab_host, BLOB_PATH)["mode"] == "400" and stat(lab_host, BLOB_PATH)["owner"] == "root"
    assert read(lab_host, TOKEN_PATH) == token
    assert stat(lab_host, KEEP_PATH)["mode"] == "600"
    # after-activation: written once the activation (which wrote activation-read) was over.
    assert float(stat(lab_host, TOKEN_PATH)["mtime"]) >= float(stat(lab_host, "/run/lab/activation-read")["mtime"])
    assert float(stat(lab_host, KEY_PATH)["mtime"]) <= float(stat(lab_host, "/run/lab/activation-read")["mtime"])
    # No temporary files are left beside them.
    assert in_host(lab_host, "ls", "-A", "/etc/lab-secrets").stdout.split() == ["age.key", "blob"]
    gen = generation(lab_host)

    # State keeps HMACs, never contents; outputs say which files are there.
    exported = project.run("stack", "export").stdout
    for secret in (key1, token, keep, blob1[:64]):
        assert secret not in exported
    res = project.resource("NixosMachine")
    recorded = {f["path"]: f for f in res["outputs"]["secretFiles"]}  # type: ignore[index]
    assert set(recorded) == {KEY_PATH, BLOB_PATH, KEEP_PATH, TOKEN_PATH}
    assert all(f["contentHash"].startswith("hmac-sha256:") and "content" not in f for f in recorded.values())
    assert recorded[KEY_PATH]["contentHash"] != "hmac-sha256:" + sha256(key1)  # keyed, not a plain hash
    assert recorded[TOKEN_PATH]["stage"] == "after-activation"
    logs = first.stdout + first.stderr
    for secret in (key1, token, keep):
        assert secret not in logs
    assert "placing secret files" in logs or KEY_PATH in logs

    # Rotation: only contents change. Preview names the files, not the contents.
    project.run("config", "set", "--secret", "ageKey", key2)
    blob_file.write_text(blob2)
    preview = project.run("preview", "--diff")
    shown = strip_ansi(preview.stdout + preview.stderr)
    assert f"secret files to write: {KEY_PATH}, {BLOB_PATH}\n" in shown, shown
    assert key2 not in shown and key1 not in shown
    before = {p: stat(lab_host, p) for p in (KEY_PATH, BLOB_PATH)}
    reader = Reader(lab_host, BLOB_PATH)
    reader.start()
    try:
        rotated = project.up("--logtostderr", "-v=3")
    finally:
        in_host(lab_host, "touch", "/run/stop-reader")
        reader.proc.wait(timeout=30)
        reader.join(timeout=30)
        in_host(lab_host, "rm", "-f", "/run/stop-reader")
    assert read(lab_host, KEY_PATH) == key2
    assert read(lab_host, BLOB_PATH) == blob2
    # A new file renamed into place (a new inode), with the same owner and mode.
    assert stat(lab_host, KEY_PATH)["inode"] != before[KEY_PATH]["inode"]
    assert stat(lab_host, KEY_PATH)["mode"] == "440" and stat(lab_host, KEY_PATH)["owner"] == "nobody"
    # The reader saw the old content or the new one, never anything else.
    assert reader.seen and set(reader.seen) <= {sha256(blob1), sha256(blob2)}, set(reader.seen)
    assert reader.seen[-1] == sha256(blob2)
    # The system was not deployed again: same generation, and activation did not run (it would have read key2).
    assert generation(lab_host) == gen
    assert in_host(lab_host, "cat", "/run/lab/activation-read").stdout.strip() == sha256(key1)
    assert "copying" not in rotated.stdout and "activating" not in rotated.stdout
    for secret in (key1, key2, token, keep):
        assert secret not in rotated.stdout + rotated.stderr
    assert "- 1 changed" in rotated.stdout or "1 updated" in rotated.stdout

    # A dropped entry is removed on the next up.
    program(project, machine(lab_host, flake, files_program(blob_file, token=False)), config=CONFIG)
    project.up()
    assert not exists(lab_host, TOKEN_PATH)
    assert exists(lab_host, KEY_PATH) and generation(lab_host) == gen

    # Nothing on the deployer's disk holds a secret: the project, the backend,
    # /tmp. (`token` is plain config on purpose: Pulumi itself keeps it in
    # Pulumi.dev.yaml and the update history; state keeps it secret.)
    exported = project.run("stack", "export").stdout
    assert key2 not in exported and blob2[:64] not in exported
    roots = [project.dir, project.dir.parent / "state", Path("/tmp")]
    for secret in (key1, key2, keep):
        assert deployer_files_containing(secret, roots, started) == [], secret

    # Destroy removes the files, except the one marked keepOnDestroy.
    project.run("destroy", "--yes", "--skip-preview")
    assert not exists(lab_host, KEY_PATH) and not exists(lab_host, BLOB_PATH)
    assert read(lab_host, KEEP_PATH) == keep


def test_refresh_finds_secret_files_changed_or_removed_on_the_host_and_up_writes_them_again(
        project: PulumiProject, lab_host: labctl.LabHost, tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "flake", FLAKE)
    key = f"AGE-SECRET-KEY-{secrets.token_hex(16).upper()}"
    token = f"token-{secrets.token_hex(12)}"
    keep = f"keep-{secrets.token_hex(12)}"
    files = [{"path": KEY_PATH, "content": {"fn::secret": key}, "owner": "nobody", "group": "nogroup", "mode": "0440"},
             {"path": TOKEN_PATH, "content": {"fn::secret": token}, "stage": "after-activation", "owner": "0"},
             {"path": KEEP_PATH, "content": {"fn::secret": keep}, "mode": "600"}]
    program(project, machine(lab_host, flake, files))
    project.run("stack", "init", "dev")
    project.up()
    gen = generation(lab_host)

    # Untouched files: a refresh changes nothing (names and ids, "0600" and "600" as the program spelled them).
    quiet = project.run("refresh", "--yes", "--expect-no-changes", check=False)
    assert quiet.returncode == 0, strip_ansi(quiet.stdout + quiet.stderr)
    assert "secret file" not in quiet.stdout + quiet.stderr

    # Someone changes them on the host: one removed, one loosened, one overwritten.
    in_host(lab_host, "rm", TOKEN_PATH)
    in_host(lab_host, "chmod", "0644", KEY_PATH)
    in_host(lab_host, "sh", "-c", 'echo tampered > "$1"', "sh", KEEP_PATH)
    refreshed = project.run("refresh", "--yes")
    shown = strip_ansi(refreshed.stdout + refreshed.stderr)
    assert f"secret file {TOKEN_PATH} on the host: missing since it was written" in shown, shown
    assert f"secret file {KEY_PATH} on the host: mode changed since it was written" in shown, shown
    assert f"secret file {KEEP_PATH} on the host: content changed since it was written" in shown, shown
    for secret in (key, token, keep, "tampered"):
        assert secret not in shown
    recorded = {f["path"]: f for f in project.resource("NixosMachine")["outputs"]["secretFiles"]}  # type: ignore[index]
    assert set(recorded) == {KEY_PATH, KEEP_PATH} and recorded[KEY_PATH]["mode"] == "0644"
    exported = project.run("stack", "export").stdout
    assert "tampered" not in exported and keep not in exported

    # The preview names what the next up writes; the up restores them without deploying the system again.
    previewed = project.run("preview", "--diff")
    preview = strip_ansi(previewed.stdout + previewed.stderr)
    assert f"secret files to write: {KEY_PATH}, {KEEP_PATH}, {TOKEN_PATH}\n" in preview, preview
    project.up()
    assert read(lab_host, TOKEN_PATH) == token and read(lab_host, KEEP_PATH) == keep
    assert stat(lab_host, KEY_PATH)["mode"] == "440" and read(lab_host, KEY_PATH) == key
    assert generation(lab_host) == gen
    again = project.run("refresh", "--yes", "--expect-no-changes", check=False)
    assert again.returncode == 0 and "secret file" not in again.stdout + again.stderr, strip_ansi(again.stdout)


def test_before_activation_file_stays_after_a_rollback_and_state_says_so(
        project: PulumiProject, lab_host: labctl.LabHost, tmp_path: Path) -> None:
    """Rollback policy: files written before a failed activation stay (state records them); after-activation
    files are not written, so the next up writes them."""
    flake = write_flake(tmp_path / "flake", FLAKE.replace("faults.activationReads", "faults.activationFails = true; faults.activationReads"))
    key = f"AGE-SECRET-KEY-{secrets.token_hex(16).upper()}"
    files = [{"path": KEY_PATH, "content": {"fn::secret": key}},
             {"path": TOKEN_PATH, "content": {"fn::secret": "t"}, "stage": "after-activation"}]
    program(project, machine(lab_host, flake, files))
    project.run("stack", "init", "dev")
    gen = generation(lab_host)
    failed = project.up(check=False)
    out = strip_ansi(failed.stdout + failed.stderr)
    assert failed.returncode != 0 and "Rolled back" in out, out
    assert generation(lab_host) == gen
    assert read(lab_host, KEY_PATH) == key
    assert not exists(lab_host, TOKEN_PATH)
    recorded = [f["path"] for f in project.resource("NixosMachine")["outputs"]["secretFiles"]]  # type: ignore[index]
    assert recorded == [KEY_PATH]
    assert key not in project.run("stack", "export").stdout


def test_bad_secret_files_fail_check_naming_the_property(project: PulumiProject) -> None:
    files = [
        {"path": "etc/relative", "content": "x"},
        {"path": "/etc/../shadow", "content": "x"},
        {"path": "/etc/a", "content": "x", "mode": "644x"},
        {"path": "/etc/b", "content": "x", "stage": "during-activation"},
        {"path": "/etc/a", "content": "x"},
        {"path": "/etc/c", "content": "x", "owner": "bad name!", "group": "wheel;rm"},
        {"path": "/etc/e", "content": "x", "contentHash": "abc", "mode": 420},
    ]
    program(project, {"bad": {"type": "nixos:NixosMachine", "properties": {
        "connection": {"host": "127.0.0.1"}, "systemPath": "/nix/store/00000000000000000000000000000000-x",
        "secretFiles": files}}})
    project.run("stack", "init", "dev")
    res = project.run("preview", check=False)
    out = strip_ansi(res.stdout + res.stderr)
    assert res.returncode != 0

    def problem(prop: str, reason: str) -> None:
        assert f"property {prop} value" in out and reason in out, (prop, reason, out)

    problem("secretFiles[0].path", "must be a normalized absolute file path without `..`")
    problem("secretFiles[1].path", "must be a normalized absolute file path without `..`")
    problem("secretFiles[2].mode", 'must be an octal mode as a string, such as "0400"')
    problem("secretFiles[3].stage", "must be one of 'before-activation', 'after-activation', not 'during-activation'")
    problem("secretFiles[4].path", "'/etc/a' is already secretFiles[2].path")
    problem("secretFiles[5].owner", "is not a valid user name or id")
    problem("secretFiles[5].group", "is not a valid group name or id")
    problem("secretFiles[6].contentHash", "is computed by the provider")
    problem("secretFiles[6].mode", "must be a string, not a number")
    assert "Traceback" not in out


def test_files_written_as_root_through_sudo_and_a_failed_write_activates_nothing(
        project: PulumiProject, lab_host: labctl.LabHost, tmp_path: Path) -> None:
    """A non-root SSH user: files are written as root through sudo. A write that fails (the path is a directory)
    stops the update before activation; state records the file written before it, and the next up finishes."""
    flake = write_flake(tmp_path / "flake", FLAKE)
    key = f"AGE-SECRET-KEY-{secrets.token_hex(16).upper()}"
    good = {"path": KEY_PATH, "content": {"fn::secret": key}}
    bad = {"path": "/etc/lab", "content": {"fn::secret": "x"}}  # a directory: the rename must fail
    resources = machine(lab_host, flake, [good, bad])
    resources["web"]["properties"]["connection"]["user"] = lab_host.nonRootUser
    program(project, resources)
    project.run("stack", "init", "dev")
    gen = generation(lab_host)
    failed = project.up(check=False)
    out = strip_ansi(failed.stdout + failed.stderr)
    assert failed.returncode != 0
    assert "writing secret file /etc/lab on" in out and "the new system was not activated" in out, out
    assert "Traceback" not in out
    assert generation(lab_host) == gen
    assert stat(lab_host, KEY_PATH)["owner"] == "root" and read(lab_host, KEY_PATH) == key
    assert in_host(lab_host, "test", "-d", "/etc/lab").returncode == 0
    assert in_host(lab_host, "sh", "-c", "ls -A /etc | grep -c '^\\.lab\\.' || true").stdout.strip() == "0"
    recorded = [f["path"] for f in project.resource("NixosMachine")["outputs"]["secretFiles"]]  # type: ignore[index]
    assert recorded == [KEY_PATH]

    resources["web"]["properties"]["secretFiles"] = [good]
    program(project, resources)
    project.up()
    assert generation(lab_host) != gen
    assert in_host(lab_host, "cat", "/run/lab/activation-read").stdout.strip() == sha256(key)
