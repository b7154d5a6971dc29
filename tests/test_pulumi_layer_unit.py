"""The Pulumi layer against a fake engine: Create, Update, Read and Delete map properties to engine calls and
back, every failure branch included, and no credential reaches state unwrapped. No root, no lab, no Nix."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nixos_provider.engine.deploy import TargetState
from nixos_provider.engine.errors import EngineError
from nixos_provider.engine.lifecycle.engine import Engine
from nixos_provider.engine.lifecycle.models import (
    ConvergeFailed,
    MachineGoal,
    MachineRecord,
    PreviewGoal,
    ProfileGoal,
    ProfileRecord,
    Report,
)
from nixos_provider.engine.models import Generation, Profile, Remote
from nixos_provider.engine.nix.cli import Nix
from nixos_provider.engine.nix.closure_diff import ClosureChanges
from nixos_provider.engine.resources.fleet import Fleet
from nixos_provider.engine.target.secret_files import RecordedFile
from nixos_provider.pulumi_layer.context import Context
from nixos_provider.pulumi_layer.machine import NixosMachine
from nixos_provider.pulumi_layer.nix_profile import NixProfile
from nixos_provider.pulumi_layer.properties import UNKNOWN, Secret, reveal
from nixos_provider.pulumi_layer.resource import PartialFailure

OLD = "/nix/store/" + "a" * 32 + "-nixos-system-web"
NEW = "/nix/store/" + "b" * 32 + "-nixos-system-web"
URN = "urn:pulumi:staging::fleet::nixos:index:NixosMachine::web"
PURN = "urn:pulumi:staging::fleet::nixos:index:NixProfile::app"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostKey"
CREDENTIALS = ("PRIVATE-KEY", "SUDO-PW", "SIGNING-KEY", "DISK-KEY")


@dataclass
class FakeEngine(Engine):
    """Answers as scripted, and records what it was asked."""

    converged: MachineRecord | ProfileRecord | Exception | None = None
    state: TargetState | Exception | None = None
    found_files: tuple[RecordedFile, ...] | None = None
    changes: ClosureChanges | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def _answer(self, name: str, arg: Any, answer: Any) -> Any:
        self.calls.append((name, arg))
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def converge_machine(self, goal: MachineGoal, recorded: MachineRecord | None, nix: Nix,
                               report: Report) -> MachineRecord:
        return self._answer("converge_machine", (goal, recorded), self.converged)  # type: ignore[no-any-return]

    async def converge_profile(self, goal: ProfileGoal, recorded: ProfileRecord | None, nix: Nix,
                               report: Report) -> ProfileRecord:
        return self._answer("converge_profile", (goal, recorded), self.converged)  # type: ignore[no-any-return]

    async def pending_changes(self, goal: PreviewGoal, nix: Nix, report: Report) -> ClosureChanges:
        return self._answer("pending_changes", goal, self.changes)  # type: ignore[no-any-return]

    async def read_state(self, remote: Remote, profile: Profile, *, with_generations: bool = False) -> TargetState:
        return self._answer("read_state", (remote, profile), self.state)  # type: ignore[no-any-return]

    async def read_secret_files(self, remote: Remote, recorded: MachineRecord,
                                report: Report) -> tuple[RecordedFile, ...]:
        found = self.found_files if self.found_files is not None else recorded.secret_files
        return self._answer("read_secret_files", recorded, found)  # type: ignore[no-any-return]

    async def destroy_machine(self, remote: Remote, recorded: MachineRecord, report: Report) -> None:
        self._answer("destroy_machine", (remote, recorded), None)

    async def destroy_profile(self, remote: Remote, profile: Profile, recorded: ProfileRecord, *, remove: bool,
                              activate_command: str | None, report: Report) -> None:
        self._answer("destroy_profile", (profile, remove, activate_command), None)


def _layer(engine: FakeEngine, kind: Callable[[Context], Any] = NixosMachine) -> tuple[Any, list[str]]:
    said: list[str] = []
    ctx = Context(log=lambda severity, msg, urn, eph: said.append(f"{severity}: {msg}"),
                  fleet=Fleet(project_dir="/p", given_engine=engine))
    return kind(ctx), said


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _news(**extra: Any) -> dict[str, Any]:
    """Checked inputs, as Check recorded them."""
    return {"connection": {"host": "10.0.0.5", "port": 22, "user": "root", "privateKey": Secret("PRIVATE-KEY"),
                           "sudoPassword": Secret("SUDO-PW")},
            "systemPath": NEW, "action": "switch", "onDestroy": "rollback", **extra}


DEPLOYED = MachineRecord(system_path=NEW, generation=5, previous_generation=4, baseline_generation=3,
                         baseline_system_path=OLD, host_key=KEY, deployed_at="2026-12-04T12:00:00Z",
                         pushed_paths=2, pushed_bytes=1024, substituted_paths=0, needs_reboot=False,
                         secret_files=(RecordedFile(path="/run/keys/db", content_hash="h1"),),
                         secret_files_key=b"K" * 32)


def _olds(record: MachineRecord = DEPLOYED, **inputs: Any) -> dict[str, Any]:
    """Recorded state, as the engine hands it back: inputs and outputs, numbers as floats."""
    from nixos_provider.pulumi_layer.state import MachineState

    props = MachineState(_news(systemPath=OLD, **inputs), replace(record, system_path=OLD)).to_properties()
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in props.items()}


def _plain_leaves(value: Any, inside_secret: bool = False) -> list[str]:
    """Every string in value that is not wrapped as a secret."""
    if isinstance(value, Secret):
        return []
    if isinstance(value, dict):
        return [s for v in value.values() for s in _plain_leaves(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _plain_leaves(v)]
    return [value] if isinstance(value, str) else []


# -- NixosMachine -------------------------------------------------------------------------------


def test_create_hands_the_engine_one_goal_and_records_what_it_returns() -> None:
    engine = FakeEngine(converged=DEPLOYED)
    machine, _ = _layer(engine)
    news = _news(flake=".#web")
    news["connection"]["port"] = 22.0  # as Pulumi hands the checked inputs back
    ident, props = _run(machine.create(URN, news, False))
    assert ident == "10.0.0.5:22"
    (name, (goal, recorded)), = engine.calls
    assert (name, recorded, goal.remote.host, goal.remote.host_key, goal.install, goal.deploys) == (
        "converge_machine", None, "10.0.0.5", None, None, True)
    assert goal.source.store_path == NEW and goal.source.evaluated
    assert (props["systemPath"], props["generation"], props["hostKey"], props["flake"]) == (NEW, 5, KEY, ".#web")
    assert props["secretFiles"] == [{"path": "/run/keys/db", "contentHash": "h1", "owner": "root", "group": "root",
                                     "mode": "0400", "stage": "before-activation", "keepOnDestroy": False}]
    assert isinstance(props["secretFilesKey"], Secret) and isinstance(props["connection"]["privateKey"], Secret)
    # A replacement's delete of the old name leaves this machine alone.
    assert machine.ctx.fleet.replaced_in_place(URN, KEY, "/nix/var/nix/profiles/system")


def test_create_with_install_asks_the_engine_to_install_first() -> None:
    engine = FakeEngine(converged=replace(DEPLOYED, install_status="installed"))
    machine, _ = _layer(engine)
    _, props = _run(machine.create(URN, _news(install={"diskoScript": "/nix/store/x-disko",
                                                       "diskEncryptionKeys": {"/tmp/k": "DISK-KEY"}}), False))
    (_, (goal, _)), = engine.calls
    assert goal.install is not None and goal.install.disko_script == "/nix/store/x-disko"
    assert goal.install.disk_encryption_keys == (("/tmp/k", "DISK-KEY"),)
    assert props["installStatus"] == "installed" and "DISK-KEY" not in _plain_leaves(props)


def test_a_create_that_fails_records_what_the_engine_says_runs() -> None:
    runs = MachineRecord(system_path=OLD, generation=3, baseline_generation=3, host_key=KEY)
    engine = FakeEngine(converged=ConvergeFailed("activation failed; generation 3 is running", runs,
                                                 with_new_inputs=True))
    machine, _ = _layer(engine)
    with pytest.raises(PartialFailure) as e:
        _run(machine.create(URN, _news(), False))
    assert str(e.value) == "activation failed; generation 3 is running" and e.value.resource_id == "10.0.0.5:22"
    assert (e.value.outputs["systemPath"], e.value.outputs["generation"], e.value.outputs["hostKey"]) == (OLD, 3, KEY)
    assert e.value.inputs["systemPath"] == NEW  # the inputs asked for; the outputs say what runs


def test_a_create_the_engine_refuses_outright_records_nothing() -> None:
    engine = FakeEngine(converged=EngineError("10.0.0.5:22 does not run NixOS"))
    machine, _ = _layer(engine)
    with pytest.raises(EngineError, match="does not run NixOS"):
        _run(machine.create(URN, _news(), False))
    assert machine.ctx.fleet.created_on == {}


def test_list_generations_refuses_a_typo_in_its_connection_before_any_engine_call() -> None:
    from nixos_provider.engine.declaration.checks import CheckFailed
    from nixos_provider.pulumi_layer.functions import list_generations
    engine = FakeEngine()
    machine, _ = _layer(engine)
    with pytest.raises(CheckFailed) as e:
        _run(list_generations(machine.ctx, {"connection": {"host": "h", "usr": "root"}}))
    assert e.value.failures.items == [("connection.usr", "is not a property of Connection (did you mean `user`?)")]
    assert engine.calls == []


def test_update_pins_the_recorded_host_key_and_says_whether_to_deploy() -> None:
    engine = FakeEngine(converged=DEPLOYED)
    machine, _ = _layer(engine)
    props = _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(), False))
    (_, (goal, recorded)), = engine.calls
    assert goal.remote.host_key == KEY and goal.deploys and recorded.system_path == OLD
    assert recorded.baseline_generation == 3 and recorded.secret_files_key == b"K" * 32  # read back typed
    assert props["systemPath"] == NEW and props["generation"] == 5
    engine = FakeEngine(converged=replace(DEPLOYED, system_path=OLD))
    machine, _ = _layer(engine)
    _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(systemPath=OLD, triggers={"a": "1"}), False))
    assert engine.calls[0][1][0].deploys  # a trigger deploys again
    engine = FakeEngine(converged=replace(DEPLOYED, system_path=OLD))
    machine, _ = _layer(engine)
    _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(systemPath=OLD, autoRollback=False), False))
    assert not engine.calls[0][1][0].deploys


@pytest.mark.parametrize("with_new_inputs", [False, True])
def test_a_failed_update_pairs_what_runs_with_the_inputs_that_describe_it(with_new_inputs: bool) -> None:
    runs = replace(DEPLOYED, system_path=NEW if with_new_inputs else OLD)
    engine = FakeEngine(converged=ConvergeFailed("it failed", runs, with_new_inputs=with_new_inputs))
    machine, _ = _layer(engine)
    with pytest.raises(PartialFailure) as e:
        _run(machine.update(URN, "10.0.0.5:22", _olds(magicRollback=True), _news(magicRollback=False), False))
    outputs = e.value.outputs
    # Before the new system took over, the outputs keep the old inputs; after, the new ones.
    assert outputs["magicRollback"] is (not with_new_inputs) and outputs["systemPath"] == runs.system_path
    assert e.value.inputs["magicRollback"] is False
    assert not set(CREDENTIALS) & set(_plain_leaves(outputs))


def test_an_unfinished_install_is_installed_again_on_update() -> None:
    failed = MachineRecord(install_status="failed", install_error="kexec: timed out")
    engine = FakeEngine(converged=replace(DEPLOYED, install_status="adopted"))
    machine, said = _layer(engine)
    olds = _olds(failed, install={})
    props = _run(machine.update(URN, "10.0.0.5:22", olds, _news(install={}), False))
    (_, (goal, recorded)), = engine.calls
    assert goal.install is not None and recorded.install_error == "kexec: timed out"
    assert props["installStatus"] == "adopted"
    assert any("did not finish last time" in line for line in said)
    # The preview of it knows nothing of what the install will find.
    preview = _run(machine.update(URN, "10.0.0.5:22", olds, _news(install={}), True))
    assert preview["generation"] is UNKNOWN and preview["hostKey"] is UNKNOWN


def test_check_keeps_what_the_program_marked_secret_secret_in_the_form_it_records() -> None:
    machine, _ = _layer(FakeEngine())
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBq8ZNH9lIzGYcG0KHmQX0cLgHQ6YXZxqD1z2ePHf0lJ"
    news = _news(connection={"host": "10.0.0.5", "hostKey": Secret(f"  {key} root@web  ")})
    checked = _run(machine.check(URN, {}, news))
    assert checked["connection"]["hostKey"] == Secret(key)  # canonical, and still secret
    assert (checked["connection"]["port"], checked["onDestroy"]) == (22, "rollback")


def test_preview_of_a_new_machine_leaves_what_the_engine_finds_unknown() -> None:
    machine, said = _layer(FakeEngine())
    ident, props = _run(machine.create(URN, _news(install={}), True))
    assert ident == "10.0.0.5:22" and props["systemPath"] == NEW
    assert all(props[k] is UNKNOWN for k in ("generation", "hostKey", "installStatus", "baselineGeneration"))
    assert props["secretFiles"] is None and any("nixos-anywhere" in line for line in said)
    _, props = _run(machine.create(URN, _news(systemPath=UNKNOWN), True))
    assert props["systemPath"] is UNKNOWN


def test_a_preview_that_does_not_know_the_connection_yet_shows_it_unknown() -> None:
    """A connection made from another resource's outputs is unknown to a first preview: Create and Update still
    answer, with what they cannot know unknown, and ask the engine nothing."""
    engine = FakeEngine()
    machine, _ = _layer(engine)
    ident, props = _run(machine.create(URN, _news(connection=UNKNOWN), True))
    assert (ident, props["connection"], props["hostKey"]) == ("", UNKNOWN, UNKNOWN)
    props = _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(connection=UNKNOWN), True))
    assert props["generation"] is UNKNOWN and props["pendingChanges"] is None
    profile, _ = _layer(engine, NixProfile)
    olds = {**_profile_news(), "profilePath": "/nix/var/nix/profiles/per-user/alice/app", "hostKey": KEY}
    props = _run(profile.update(PURN, "10.0.0.5:22:/p", olds, _profile_news(connection=UNKNOWN, storePath=NEW), True))
    assert props["hostKey"] == KEY and props["generation"] is UNKNOWN and engine.calls == []


def test_preview_of_an_update_shows_the_engine_s_package_diff_and_predicts_a_reboot() -> None:
    changes = ClosureChanges(before=OLD, after=NEW, boot_changes=("kernel",))
    engine = FakeEngine(changes=changes)
    machine, _ = _layer(engine)
    props = _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(flake=".#web", dryActivate=True), True))
    (name, goal), = engine.calls
    assert (name, goal.current, goal.new, goal.dry_activate, goal.remote.host_key) == (
        "pending_changes", OLD, NEW, True, KEY)
    assert goal.source is not None and goal.source.store_path == NEW
    assert props["pendingChanges"]["bootChanges"] == ["kernel"] and props["needsReboot"] is True
    assert props["generation"] is UNKNOWN and props["hostKey"] == KEY and props["baselineGeneration"] == 3
    # A reboot in the deployment itself leaves nothing due; a diff that could not be made predicts nothing.
    machine, said = _layer(FakeEngine(changes=changes))
    props = _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(reboot="ifNeeded"), True))
    assert props["needsReboot"] is False and any("reboots into it once" in line for line in said)
    machine, _ = _layer(FakeEngine(changes=replace(changes, note="no package diff: not in the local store")))
    assert _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(), True))["needsReboot"] is UNKNOWN


def test_preview_names_secret_files_by_path_and_compares_them_by_hash() -> None:
    machine, said = _layer(FakeEngine())
    files = [{"path": "/run/keys/db", "content": Secret("new contents")}, {"path": "/run/keys/api",
                                                                            "content": Secret("x")}]
    props = _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(systemPath=OLD, secretFiles=files), True))
    assert any(line == "INFO: secret files to write: /run/keys/db, /run/keys/api" for line in said)
    assert [f["path"] for f in props["secretFiles"]] == ["/run/keys/db", "/run/keys/api"]
    assert "new contents" not in str(reveal(props))
    unknown = _run(machine.update(URN, "10.0.0.5:22", _olds(), _news(systemPath=OLD, secretFiles=UNKNOWN), True))
    assert unknown["secretFiles"] is UNKNOWN


def test_refresh_records_what_runs_and_the_secret_files_as_found() -> None:
    now = TargetState(host_key=KEY, generation=Generation(7, NEW, True), current_system=NEW,
                      nixos_version="26.05", reboot_for=("kernel",))
    engine = FakeEngine(state=now, found_files=())
    machine, _ = _layer(engine)
    ident, props, inputs = _run(machine.read(URN, "10.0.0.5:22", _olds(), _news(systemPath=OLD)))
    assert ident == "10.0.0.5:22" and inputs["systemPath"] == NEW  # drift: the inputs say what runs
    assert (props["systemPath"], props["generation"], props["needsReboot"], props["nixosVersion"]) == (
        NEW, 7, True, "26.05")
    assert props["secretFiles"] is None and props["baselineGeneration"] == 3  # the file is gone from the host


def test_import_describes_the_running_system_and_deploys_nothing_next() -> None:
    now = TargetState(host_key=KEY, generation=Generation(9, OLD, True), current_system=OLD, nixos_version=None)
    engine = FakeEngine(state=now)
    machine, _ = _layer(engine)
    ident, props, inputs = _run(machine.read(URN, "10.0.0.9:2222", {}, {}))
    assert ident == "10.0.0.9:2222" and engine.calls[0][1][0].port == 2222
    assert (props["baselineGeneration"], props["baselineSystemPath"], props["systemPath"]) == (9, OLD, OLD)
    assert inputs["systemPath"] == OLD and inputs["action"] == "switch" and inputs["onDestroy"] == "rollback"
    # Credentials given to the import (`--properties`) are recorded as secrets in its inputs as in its outputs.
    engine = FakeEngine(state=now)
    machine, _ = _layer(engine)
    _, props, inputs = _run(machine.read(URN, "10.0.0.9:2222", {}, {"connection": {"host": "10.0.0.9",
                                                                                 "password": "PW"}}))
    assert inputs["connection"]["password"] == props["connection"]["password"] == Secret("PW")
    engine = FakeEngine(state=replace(now, current_system=None, generation=None))
    machine, _ = _layer(engine)
    with pytest.raises(EngineError, match="it has no /run/current-system"):
        _run(machine.read(URN, "10.0.0.9:2222", {}, {}))


def test_delete_rolls_back_unless_retained_or_replaced_in_place() -> None:
    engine = FakeEngine()
    machine, _ = _layer(engine)
    _run(machine.delete(URN, "10.0.0.5:22", _olds()))
    (name, (remote, recorded)), = engine.calls
    assert (name, remote.host_key, recorded.baseline_generation, recorded.baseline_system_path) == (
        "destroy_machine", KEY, 3, OLD)
    assert remote.credentials.private_key == "PRIVATE-KEY"
    engine = FakeEngine()
    machine, said = _layer(engine)
    _run(machine.delete(URN, "10.0.0.5:22", _olds(onDestroy="retain")))
    assert engine.calls == [] and any("onDestroy is `retain`" in line for line in said)
    machine.ctx.fleet.created_on[URN] = (KEY, "/nix/var/nix/profiles/system")
    _run(machine.delete(URN, "10.0.0.5:22", _olds()))
    assert engine.calls == []


# -- NixProfile -------------------------------------------------------------------------------

APP = "/nix/store/" + "c" * 32 + "-app"


def _profile_news(**extra: Any) -> dict[str, Any]:
    return {"connection": {"host": "10.0.0.5", "port": 22, "user": "alice", "password": Secret("SUDO-PW")},
            "profile": "app", "storePath": APP, "onDestroy": "rollback", **extra}


def test_a_profile_converges_through_the_engine_and_fails_with_what_it_holds() -> None:
    record = ProfileRecord(profile_path="/nix/var/nix/profiles/per-user/alice/app", store_path=APP, generation=2,
                           baseline_generation=1, host_key=KEY)
    engine = FakeEngine(converged=record)
    profile, _ = _layer(engine, NixProfile)
    ident, props = _run(profile.create(PURN, _profile_news(activate="systemctl restart app"), False))
    (_, (goal, recorded)), = engine.calls
    assert ident == "10.0.0.5:22:/nix/var/nix/profiles/per-user/alice/app" and recorded is None
    assert goal.request.profile.path == "/nix/var/nix/profiles/per-user/alice/app"
    assert goal.request.activate_command == "systemctl restart app"
    assert (props["storePath"], props["generation"], props["profilePath"]) == (APP, 2, record.profile_path)
    olds = {**props, "generation": 2.0}
    engine = FakeEngine(converged=ConvergeFailed("activate failed", replace(record, generation=2),
                                                 with_new_inputs=False))
    profile, _ = _layer(engine, NixProfile)
    with pytest.raises(PartialFailure) as e:
        _run(profile.update(PURN, ident, olds, _profile_news(storePath=NEW, activate="true"), False))
    assert e.value.outputs["activate"] == "systemctl restart app" and e.value.outputs["storePath"] == APP
    preview = _run(profile.update(PURN, ident, olds, _profile_news(storePath=NEW), True))
    assert preview["storePath"] == NEW and preview["generation"] is UNKNOWN and preview["baselineGeneration"] == 1
    # Built on a build host: its key, pinned by the last deployment, goes with it while it names that host.
    builder = {"host": "builder", "port": 22, "user": "root"}
    engine = FakeEngine(converged=replace(record, build_host_key="ssh-ed25519 BUILDER"))
    profile, _ = _layer(engine, NixProfile)
    props = _run(profile.update(PURN, ident, {**olds, "buildHost": builder, "buildHostKey": "ssh-ed25519 BUILDER"},
                                _profile_news(storePath=NEW, buildHost=builder), False))
    (_, (goal, _)), = engine.calls
    assert goal.build_host.host == "builder" and goal.build_host.host_key == goal.build_host_key == \
        "ssh-ed25519 BUILDER" and not goal.build_on_target and props["buildHostKey"] == "ssh-ed25519 BUILDER"
    preview = _run(profile.update(PURN, ident, olds, _profile_news(storePath=NEW, buildHost=builder), True))
    assert preview["buildHostKey"] is UNKNOWN  # pinned by the deployment
    engine = FakeEngine()
    profile, _ = _layer(engine, NixProfile)
    _run(profile.delete(PURN, ident, {**olds, "onDestroy": "remove"}))
    assert engine.calls == [("destroy_profile", (Profile(record.profile_path, None), True,
                                                 "systemctl restart app"))]


# -- secrecy, over the schema, whatever the path ------------------------------------------------------


def _secret_examples(token: str) -> dict[str, Any]:
    """For each input of the resource whose type has `secret` fields (at any depth), a value with every one of them
    set in plain text `plain-<name>`, as a program that did not mark them secret passes them. secretFiles are kept
    as HMACs, not wrapped (below)."""
    from nixos_provider.pulumi_layer.schema import schema

    doc = schema()
    types = doc["types"]

    def example(spec: dict[str, Any], depth: int = 0) -> Any:
        ref = spec.get("$ref", "").removeprefix("#/types/")
        if ref not in types or depth > 3:
            return None
        props = types[ref].get("properties", {})
        value: dict[str, Any] = {"host": "10.0.0.6"} if "host" in props else {}  # a connection needs its host
        for name, f in props.items():
            plain = f"plain-{name}"
            shaped = {"object": {"/etc/x": plain}, "array": [plain]}.get(f.get("type", ""), plain)
            inner = shaped if f.get("secret") else example(f, depth + 1)
            if inner is not None:
                value[name] = inner
        return value if set(value) - {"host"} else None

    out = {}
    for prop, spec in doc["resources"][token]["inputProperties"].items():
        value = example(spec)
        if value is not None and prop != "secretFiles":
            out[prop] = value
    return out


MACHINE_SECRETS = _secret_examples("nixos:index:NixosMachine")
PROFILE_SECRETS = _secret_examples("nixos:index:NixProfile")
PATHS = ["create", "create-fails", "update", "update-fails-old", "update-fails-new", "preview-create",
         "preview-update", "read", "import"]
_records = st.builds(
    MachineRecord,
    system_path=st.sampled_from([OLD, NEW, None]), generation=st.none() | st.integers(1, 99),
    host_key=st.sampled_from([KEY, None]), secret_files_key=st.none() | st.binary(min_size=32, max_size=32),
    secret_files=st.lists(st.builds(RecordedFile, path=st.sampled_from(["/run/a", "/run/b"]),
                                    content_hash=st.text("abcdef0123", min_size=4, max_size=8)),
                          max_size=2).map(tuple),
    install_status=st.sampled_from([None, "installed", "failed"]))


def test_the_schema_has_secret_fields_in_every_kind_of_input() -> None:
    assert {"connection", "buildHost", "binaryCache", "install"} <= set(MACHINE_SECRETS)
    assert MACHINE_SECRETS["connection"]["proxy"]["privateKey"] == "plain-privateKey"
    assert set(PROFILE_SECRETS) == {"connection", "buildHost"}


def _outputs_of(resource: Any, path: str, news: dict[str, Any], olds: dict[str, Any]) -> dict[str, Any]:
    """The properties one path hands Pulumi: its answer, or its partial failure's outputs."""
    urn = PURN if isinstance(resource, NixProfile) else URN
    try:
        if path.startswith("create") or path == "preview-create":
            return dict(_run(resource.create(urn, news, path == "preview-create"))[1])
        if path.startswith("update") or path == "preview-update":
            return dict(_run(resource.update(urn, "h:22", olds, news, path == "preview-update")))
        return dict(_run(resource.read(urn, "h:22", {} if path == "import" else olds, news))[1])
    except PartialFailure as e:
        return e.outputs


@settings(max_examples=60, deadline=None)
@given(record=_records, chosen=st.sets(st.sampled_from(sorted(MACHINE_SECRETS))), path=st.sampled_from(PATHS),
       files=st.booleans())
def test_no_secret_field_of_the_schema_reaches_a_machine_s_state_unwrapped(
        record: MachineRecord, chosen: set[str], path: str, files: bool) -> None:
    """Whatever the record, the inputs that carry secrets and the path (failures included), every secret field of
    the schema comes back wrapped, and so do the secret files' key; their contents never come back at all."""
    extras: dict[str, Any] = {k: MACHINE_SECRETS[k] for k in chosen if k != "connection"}
    if files:
        extras["secretFiles"] = [{"path": "/run/a", "content": "plain-contents"}]
    news = {**_news(**extras), "connection": {"host": "10.0.0.5", "port": 22, **MACHINE_SECRETS["connection"]}}
    failing = ConvergeFailed("failed", record, with_new_inputs=path != "update-fails-old")
    now = TargetState(host_key=KEY, generation=Generation(3, OLD, True), current_system=OLD, nixos_version=None)
    engine = FakeEngine(converged=failing if "fails" in path else record, state=now,
                        changes=ClosureChanges(before=OLD, after=NEW))
    machine, said = _layer(engine)
    olds = _olds(record, **extras)
    olds["connection"] = news["connection"]
    props = _outputs_of(machine, path, news, olds)
    key = base64.b64encode(record.secret_files_key).decode() if record.secret_files_key else None
    plain = _plain_leaves(props)
    assert not [s for s in plain if s.startswith("plain-") or s == key], (path, plain)
    assert not any("plain-" in line for line in said)


@settings(max_examples=20, deadline=None)
@given(path=st.sampled_from(PATHS), generation=st.integers(0, 9), build_host=st.booleans())
def test_no_secret_field_of_the_schema_reaches_a_profile_s_state_unwrapped(path: str, generation: int,
                                                                          build_host: bool) -> None:
    news = _profile_news(connection={"host": "10.0.0.5", "port": 22, **PROFILE_SECRETS["connection"]},
                         **({"buildHost": PROFILE_SECRETS["buildHost"]} if build_host else {}))
    record = ProfileRecord(profile_path="/nix/var/nix/profiles/per-user/alice/app", store_path=APP,
                           generation=generation, host_key=KEY)
    failing = ConvergeFailed("failed", record, with_new_inputs=path != "update-fails-old")
    now = TargetState(host_key=KEY, generation=Generation(generation, APP, True) if generation else None,
                      current_system=None, nixos_version=None)
    engine = FakeEngine(converged=failing if "fails" in path else record, state=now)
    profile, _ = _layer(engine, NixProfile)
    olds = {**news, "profilePath": record.profile_path, "generation": float(generation), "hostKey": KEY}
    props = _outputs_of(profile, path, news, olds)
    assert not [s for s in _plain_leaves(props) if s.startswith("plain-")], (path, props)
