"""secretFiles without a host: the plan an up carries out, the records state keeps, and Check."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from nixos_provider.engine.declaration import checks, defaults, machine_checks
from nixos_provider.engine.target.secret_files import READ_SCRIPT, WRITE_SCRIPT, RecordedFile, SecretFile, content_hash, parse_found, plan
from nixos_provider.pulumi_layer.properties import Secret

KEY = b"k" * 32


def test_plan_writes_changed_files_by_stage_and_removes_dropped_ones() -> None:
    a = SecretFile(path="/etc/a", content=b"1")
    b = SecretFile(path="/etc/b", content=b"2", stage="after-activation")
    c = SecretFile(path="/etc/c", content=b"3")
    recorded = [a.record(KEY), b.record(KEY), c.record(KEY)]
    wanted = [SecretFile(path="/etc/a", content=b"new"), SecretFile(path="/etc/b", content=b"2",
                                                                    stage="after-activation", mode="0440")]
    p = plan(recorded, wanted, KEY)
    assert [f.path for f in p.before] == ["/etc/a"]
    assert [f.path for f in p.after] == ["/etc/b"]  # the mode changed
    assert p.remove == ("/etc/c",)


def test_stage_or_keep_alone_writes_nothing() -> None:
    a = SecretFile(path="/etc/a", content=b"1")
    p = plan([a.record(KEY)], [SecretFile(path="/etc/a", content=b"1", stage="after-activation",
                                          keep_on_destroy=True)], KEY)
    assert not p


def test_content_hash_is_keyed_and_never_the_content() -> None:
    short = b"1234"
    h = content_hash(KEY, short)
    assert h.startswith("hmac-sha256:") and h != content_hash(b"x" * 32, short)
    assert "1234" not in repr(SecretFile(path="/etc/pin", content=short))


def test_write_script_takes_values_as_positional_args_only() -> None:
    # The script is a constant: path, owner, group and mode arrive as $1..$4, content on stdin.
    assert "$1" in WRITE_SCRIPT and "{" not in WRITE_SCRIPT.replace("${path##*/}", "")
    assert "mktemp" in WRITE_SCRIPT and WRITE_SCRIPT.index("chmod") < WRITE_SCRIPT.index("mv -f -T")


def test_check_names_each_bad_property_and_normalize_fills_defaults() -> None:
    f = checks.Failures()
    machine_checks.check_secret_files(f, [{"path": "/a/../b", "content": "x"}, {"path": "/a", "content": "x", "mode": "777"},
                              {"path": "/a", "content": "x", "owner": "-x"}, "nope",
                              {"path": "/nix/store/abc-key", "content": "x"}])
    props = dict(f.items)
    assert "in /nix/store" in props["secretFiles[4].path"]
    assert "secretFiles[0].path" in props and "secretFiles[2].path" in props
    assert "secretFiles[2].owner" in props and "secretFiles[3]" in props
    assert "secretFiles[1].mode" not in props  # "777" is a valid octal mode
    out = defaults.machine({"secretFiles": [{"path": "/a", "content": "x"}]}, None)["secretFiles"]
    assert out == [{"path": "/a", "content": "x", "owner": "root", "group": "root", "mode": "0400",
                    "stage": "before-activation", "keepOnDestroy": False}]
    # The content is secret in state, as the schema says, however the program passed it.
    from nixos_provider.pulumi_layer.secrecy import secret_fields
    assert secret_fields({"secretFiles": out}, "nixos:index:NixosMachine")["secretFiles"][0]["content"] == Secret("x")


def test_refresh_reads_files_as_they_are_and_keeps_the_programs_spelling(tmp_path: Path) -> None:
    # The read script runs here as it runs on a host: this machine's sh, stat and base64.
    same, loosened, changed, gone, linked = (tmp_path / n for n in ("same", "loosened", "changed", "gone", "linked"))
    for p, data in ((same, b"s\x00\n"), (loosened, b"l"), (changed, b"new")):
        p.write_bytes(data)
        p.chmod(0o600)
    loosened.chmod(0o644)
    linked.symlink_to(same)
    uid, gid = os.getuid(), os.getgid()
    recorded = [RecordedFile(path=str(same), content_hash=content_hash(KEY, b"s\x00\n"), owner=str(uid),
                             group=str(gid), mode="600"),
                RecordedFile(path=str(loosened), content_hash=content_hash(KEY, b"l"), owner=str(uid),
                             group=str(gid), mode="0600"),
                RecordedFile(path=str(changed), content_hash=content_hash(KEY, b"old"), owner=str(uid),
                             group=str(gid), mode="0600"),
                RecordedFile(path=str(gone), content_hash=content_hash(KEY, b"g"), owner=str(uid), group=str(gid)),
                RecordedFile(path=str(linked), content_hash=content_hash(KEY, b"s\x00\n"), owner=str(uid),
                             group=str(gid), mode="600")]
    out = subprocess.run(["sh", "-c", READ_SCRIPT, "sh", *(r.path for r in recorded)], capture_output=True,
                         text=True, check=True).stdout
    found = parse_found(recorded, out, KEY)
    assert [f.drift() for f in found] == [None, "mode changed", "content changed", "missing", "missing"]
    assert found[0].now == recorded[0]  # "600" and the numeric owner kept as the program wrote them
    assert found[1].now is not None and found[1].now.mode == "0644"


@pytest.mark.parametrize("output", ["", "file 0 root 0 root 600\n", "garbage\n", "file 0 root 0 root 600\n!!!\n"])
def test_refresh_refuses_output_that_is_not_one_entry_per_file(output: str) -> None:
    recorded = [RecordedFile(path="/etc/a", content_hash="hmac-sha256:00")]
    with pytest.raises(ValueError, match="not one entry per recorded file") as e:
        parse_found(recorded, output, KEY)
    assert "root" not in str(e.value)
