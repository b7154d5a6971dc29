"""The deploy path without a host: dry-activate's report, the install source, the shared deploy settings."""

from __future__ import annotations

import asyncio

import pytest
from nixos_provider.engine.declaration.typed_inputs import Closure, DeploySettings, MachineInputs, ProfileInputs
from nixos_provider.engine.errors import NoNixosConfiguration
from nixos_provider.engine.install.source import InstallSource, install_source
from nixos_provider.engine.lifecycle.models import MachineGoal, MachineRecord, Report
from nixos_provider.engine.models import ACTIVATION_TIMEOUT, CONFIRM_TIMEOUT, DeployRequest, Profile, Remote
from nixos_provider.engine.nix.cli import Nix, parse_flake_ref
from nixos_provider.engine.resources import machine_preview
from nixos_provider.engine.target.dry_activate import DryActivation, parse_dry_activate
from nixos_provider.pulumi_layer.properties import Secret, reveal
from nixos_provider.pulumi_layer.state import MachineState, ProfileState

# What switch-to-configuration printed for a lab change (stderr), with the
# activation script's own lines between its reports.
DRY_OUTPUT = """\
would stop the following units: old.service, gone.timer
would NOT stop the following changed units: display-manager.service
would activate the configuration...
setting up /etc...
would restart systemd
would reload the following units: dbus-broker.service
would restart the following units: lab-service.service, sshd.service
would start the following units: old.service, gone.timer, new.service
"""


def test_dry_activate_reads_each_kind_of_change() -> None:
    assert parse_dry_activate(DRY_OUTPUT) == DryActivation(
        stop=("old.service", "gone.timer"),
        skip=("display-manager.service",),
        reload=("dbus-broker.service",),
        restart=("lab-service.service", "sshd.service"),
        start=("old.service", "gone.timer", "new.service"),
        restart_systemd=True,
    )


def test_dry_activate_without_changes_reports_none() -> None:
    # The activation script's lines may mention units; only switch-to-configuration's own reports count.
    quiet = "would activate the configuration...\nrestarting the following units: not-ours.service\n"
    assert parse_dry_activate(quiet) == DryActivation()
    assert parse_dry_activate("") == DryActivation()


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_install_source_needs_a_nixos_configuration() -> None:
    built: list[str] = []

    async def build() -> str:
        built.append("system")
        return "/nix/store/x-system"

    with pytest.raises(NoNixosConfiguration) as e:
        _run(install_source(Nix(["false"]), build_system=build, status=print, disko_script=None,
                            flake=parse_flake_ref("/f#packages.x86_64-linux.hello", nixos=False), build_on_target=False))
    assert str(e.value) == "cannot find the NixOS configuration of `/f#packages.x86_64-linux.hello` for nixos-anywhere"
    assert built == []  # nothing was built for a reference nixos-anywhere cannot use


def test_install_source_leaves_the_build_to_the_target_or_skips_disko() -> None:
    built: list[str] = []

    async def build() -> str:
        built.append("system")
        return "/nix/store/x-system"

    ref = parse_flake_ref("/f#web", nixos=True)
    # `false` as nix: any other build than the system's would fail the test.
    on_target = _run(install_source(Nix(["false"]), build_system=build, status=print, disko_script=None, flake=ref,
                                    build_on_target=True))
    assert on_target == InstallSource(flake="/f#nixosConfigurations.web.config") and built == []
    no_disko = _run(install_source(Nix(["false"]), build_system=build, status=print, disko_script=None, flake=ref,
                                   build_on_target=False, phases=("kexec", "install", "reboot")))
    assert no_disko == InstallSource(flake="/f#nixosConfigurations.web.config") and built == ["system"]


def test_deploy_settings_take_the_engine_defaults_and_the_inputs() -> None:
    assert DeploySettings.parse({}) == DeploySettings(confirm_timeout=CONFIRM_TIMEOUT,
                                                      activation_timeout=ACTIVATION_TIMEOUT)
    s = DeploySettings.parse({
        "magicRollback": False, "confirmTimeout": 5, "activationTimeout": 60, "autoRollback": False,
        "healthChecks": [{"tcp": 22}], "substituteOnDestination": True, "compress": "zstd",
        "nixOptions": [{"name": "cores", "value": "1"}],
    })
    assert (s.magic_rollback, s.confirm_timeout, s.activation_timeout, s.auto_rollback) == (False, 5.0, 60.0, False)
    assert [c.tcp for c in s.health_checks] == [22]
    assert (s.substitute_on_destination, s.compress, s.nix_options) == ("always", "zstd", (("cores", "1"),))
    # Unset asks the host's caches with a short timeout; false never asks.
    assert DeploySettings.parse({}).substitute_on_destination == "auto"
    assert DeploySettings.parse({"substituteOnDestination": False}).substitute_on_destination == "never"
    req = s.request(Remote("h"), Profile("/p"), activate_command="true")
    assert (req.magic_rollback, req.confirm_timeout, req.health_checks, req.compress, req.activate_command) == (
        False, 5.0, s.health_checks, "zstd", "true")


def test_closure_and_the_state_of_a_deployment() -> None:
    assert Closure.parse({"flake": ".#web", "systemPath": "/nix/store/x-s"}, "systemPath") == Closure(
        ".#web", "/nix/store/x-s")
    record = MachineRecord(system_path="/nix/store/x-s", generation=3, previous_generation=2,
                           host_key="ssh-ed25519 AAAA", pushed_paths=4, pushed_bytes=512, substituted_paths=7,
                           secret_files_key=b"k" * 32)
    props = MachineState({"connection": {"host": "h", "password": "pw"}}, record).to_properties()
    assert {k: v for k, v in props.items() if v is not None and k not in ("connection", "secretFilesKey")} == {
        "systemPath": "/nix/store/x-s", "generation": 3, "previousGeneration": 2, "hostKey": "ssh-ed25519 AAAA",
        "pushedPaths": 4, "pushedBytes": 512, "substitutedPaths": 7}
    # Secrecy comes with the state: the credential and the files' key, whoever made the record.
    assert props["connection"]["password"] == Secret("pw") and isinstance(props["secretFilesKey"], Secret)
    assert set(props) - {"systemPath", "connection", "secretFilesKey", "secretFiles", *machine_preview.CHANGE_REPORTS} \
        == set(machine_preview.COMPUTED)
    # State comes back from the engine with numbers as floats and secrets wrapped: the same record.
    back = {k: float(v) if isinstance(v, int) else v for k, v in props.items()}
    assert MachineState.record_of(back) == record


def test_inputs_parse_once_into_models_that_keep_secrets_out_of_their_repr() -> None:
    news = {"connection": {"host": "h", "password": Secret("pw")}, "flake": ".#web", "systemPath": "/nix/store/x-s",
            "buildOn": "remote", "action": "boot", "confirmTimeout": 9, "nixOptions": [{"name": "a", "value": "b"}],
            "install": {"diskoScript": "/nix/store/x-d", "extraFiles": Secret({"/etc/k": "key"})},
            "secretFiles": [{"path": "/etc/s", "content": Secret("sec")}],
            "binaryCache": {"url": "file:///c", "publicKey": "c:k", "signingKey": Secret("c:secret")}}
    m = MachineInputs.parse(reveal(news))  # as the Pulumi layer hands it over
    assert (m.closure, m.build_on_target, m.action, m.settings.confirm_timeout) == (
        Closure(".#web", "/nix/store/x-s"), True, "boot", 9.0)
    assert m.connection["password"] == "pw" and m.install and m.install["extraFiles"] == {"/etc/k": "key"}
    assert [f.path for f in m.secret_files] == ["/etc/s"] and m.binary_cache and m.binary_cache.signing_key == "c:secret"
    assert not {"pw", "key", "sec", "c:secret"} & set(repr(m).replace("'", " ").split())
    assert MachineInputs.parse({"connection": {"host": "h"}, "systemPath": "/nix/store/x-s"}).action == "switch"
    p = ProfileInputs.parse({"connection": {"host": "h"}, "storePath": "/nix/store/x-p", "activate": "true"})
    assert (p.closure, p.activate, p.settings) == (Closure(None, "/nix/store/x-p"), "true", DeploySettings())


def test_a_source_failure_names_the_install_properties_it_needs() -> None:
    from nixos_provider.engine.declaration.error_text import describe
    from nixos_provider.engine.errors import EngineError
    from nixos_provider.engine.lifecycle.machine import _install_source
    from nixos_provider.engine.models import InstallRequest
    from nixos_provider.engine.resources.fleet import Fleet

    closure = Closure("/f#packages.x86_64-linux.hello", "/nix/store/x-s")
    source = Fleet(project_dir="/f").source(closure, Nix(["false"]), Report(), nixos=True)
    goal = MachineGoal(remote=Remote("h"), source=source,
                       request=DeployRequest(Remote("h"), ""))
    with pytest.raises(EngineError) as e:
        _run(_install_source(goal, InstallRequest(Remote("h"), "/nix/store/x-s"), Nix(["false"]), Report()))
    assert describe(e.value) == (
        "cannot find the NixOS configuration of `/f#packages.x86_64-linux.hello` for nixos-anywhere: use a flake "
        "reference like `.#web` (or `.#nixosConfigurations.<name>.config.system.build.toplevel`), or set "
        "`install.diskoScript`")


def test_delete_reads_the_recorded_state_once_as_the_engine_left_it() -> None:
    # State as the engine hands it back: numbers as floats, credentials as secrets.
    conn = Secret({"host": "h", "port": 22.0, "user": "root", "privateKey": "KEY"})
    machine_state = {"connection": conn, "hostKey": "ssh-ed25519 AAA", "baselineGeneration": 3.0,
                     "baselineSystemPath": "/nix/store/a-base", "secretFiles": None, "onDestroy": "rollback"}
    m = MachineState.from_properties(machine_state)
    assert (m.record.baseline_generation, m.record.baseline_system_path, m.record.host_key) == (
        3, "/nix/store/a-base", "ssh-ed25519 AAA")
    assert (m.inputs["connection"], m.inputs["onDestroy"], m.record.secret_files) == (conn, "rollback", ())
    assert "KEY" not in repr(m)
    assert MachineState.record_of({**machine_state, "baselineGeneration": None}).baseline_generation is None
    p = ProfileState.from_properties({"connection": conn, "profilePath": "/p/app", "user": "alice",
                                      "onDestroy": "remove", "baselineGeneration": 0.0,
                                      "activate": "systemctl restart app"})
    assert p.record.profile_path == "/p/app" and p.record.baseline_generation == 0
    assert p.inputs["activate"] == "systemctl restart app" and p.record.baseline_store_path is None
