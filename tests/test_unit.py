"""Pure units: flake references, quoting and sudo, property encoding, validation, diffs."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import nixos_provider.engine
import pytest
from nixos_provider.engine.declaration.checks import (
    Failures,
    check_connection,
    check_deploy_settings,
    check_flake,
    check_health_checks,
    check_store_path,
)
from nixos_provider.engine.errors import RemoteCommandError
from nixos_provider.engine.models import Generation, Profile, Remote, Retention
from nixos_provider.engine.nix.cli import FlakeRef, is_store_path, parse_flake_ref, untracked_hint
from nixos_provider.engine.resources.changes import machine_deploys
from nixos_provider.engine.resources.fleet import FleetSettings
from nixos_provider.engine.target.activation import ActivationSpec, Supervisor
from nixos_provider.engine.target.profiles import doomed_generations
from nixos_provider.engine.target.supervisor_protocol import Cause, Phase, Registered, RollbackSpec, SupervisorState, supervisor_argv
from nixos_provider.engine.transport.process import Target
from nixos_provider.pulumi_layer.context import Context
from nixos_provider.pulumi_layer.machine import NixosMachine
from nixos_provider.pulumi_layer.nix_profile import NixProfile
from nixos_provider.pulumi_layer.properties import SECRET_SIG, SIG_KEY, UNKNOWN, UNKNOWN_STR, Secret, decode, encode

TOPLEVEL = "config.system.build.toplevel"


@pytest.mark.parametrize("ref,base,expected", [
    (".#web", "/proj", FlakeRef("/proj", f"nixosConfigurations.web.{TOPLEVEL}")),
    ("./nix#web", "/proj", FlakeRef("/proj/nix", f"nixosConfigurations.web.{TOPLEVEL}")),
    ("#web", "/proj", FlakeRef("/proj", f"nixosConfigurations.web.{TOPLEVEL}")),
    ("path:./x#web", "/proj", FlakeRef("path:/proj/x", f"nixosConfigurations.web.{TOPLEVEL}")),
    ("sub/dir#a", "/proj", FlakeRef("/proj/sub/dir", f"nixosConfigurations.a.{TOPLEVEL}")),
    ("/abs#nixosConfigurations.x.config.system.build.toplevel", "/p",
     FlakeRef("/abs", f"nixosConfigurations.x.{TOPLEVEL}")),
    ("github:me/infra#web", "/p", FlakeRef("github:me/infra", f"nixosConfigurations.web.{TOPLEVEL}")),
])
def test_flake_refs_resolve_against_the_project(ref: str, base: str, expected: FlakeRef) -> None:
    assert parse_flake_ref(ref, base) == expected


def test_profile_flake_refs_keep_the_attribute() -> None:
    assert parse_flake_ref(".#app", "/p", nixos=False) == FlakeRef("/p", "app")
    with pytest.raises(ValueError, match="no `#attribute`"):
        parse_flake_ref("/p", "/p")


def test_store_path_shape() -> None:
    assert is_store_path("/nix/store/xkqms51krmg5pmyp0h8j5v5mrybgxgch-nixos-system-web-24.05")
    assert not is_store_path("/nix/store/x")
    assert not is_store_path("/nix/store/xkqms51krmg5pmyp0h8j5v5mrybgxgch-a b")


class _Conn:
    def __init__(self, user: str) -> None:
        self.remote = Remote("h", 22, user)
        self.target = f"{user}@h:22"


@pytest.mark.parametrize("ssh_user,run_as,expected", [
    ("root", None, ["nix-env", "--list-generations"]),
    ("root", "root", ["nix-env", "--list-generations"]),
    ("deploy", "root", ["sudo", "-n", "--", "nix-env", "--list-generations"]),
    ("root", "alice", ["sudo", "-n", "-H", "-u", "alice", "--", "nix-env", "--list-generations"]),
    ("alice", "alice", ["nix-env", "--list-generations"]),
])
def test_sudo_is_added_only_when_the_user_differs(ssh_user: str, run_as: str | None, expected: list[str]) -> None:
    target = Target(_Conn(ssh_user), run_as)  # type: ignore[arg-type]
    assert target.argv(["nix-env", "--list-generations"]) == expected


def test_supervisor_arguments_are_named_and_complete() -> None:
    spec = ActivationSpec("system", "/nix/var/nix/profiles/system", "/nix/store/a-new", 3, 2, "/nix/store/b-old",
                          "switch", True, 30, True, 240)
    sup = Supervisor(Target(_Conn("root")), None, spec)  # type: ignore[arg-type]
    args = sup._args("activate")
    assert args[:6] == ["--task", "activate", "--dir", sup.workdir, "--token", sup.token]
    # The generations are not the deployer's to say: the supervisor registers, under its lock (`Registered`).
    assert args[6:] == ["--mode", "system", "--profile", "/nix/var/nix/profiles/system", "--new-path", "/nix/store/a-new",
                        "--action", "switch", "--magic-rollback", "1", "--confirm-timeout", "30", "--auto-rollback", "1",
                        "--activation-timeout", "240", "--ready-timeout", "30"]
    other = Supervisor(Target(_Conn("root")), None, spec)  # type: ignore[arg-type]
    assert other.token != sup.token and other.workdir != sup.workdir  # a stale token can never confirm
    # Unset values are left out; a command is one argument, whatever it holds.
    bare = dataclasses.replace(spec, new_gen=None, prev_gen=None, prev_path=None, magic_rollback=False,
                               activate_command="echo $PROFILE; exit 3")
    bare_args = supervisor_argv("activate", "/tmp/d", "t", bare)
    assert bare_args[-2:] == ["--activate-command", "echo $PROFILE; exit 3"]
    assert bare_args[bare_args.index("--magic-rollback") + 1] == "0"


def test_the_rollback_task_names_its_generation_and_its_fallback_path() -> None:
    spec = RollbackSpec("profile", "/p/app", 4, "/nix/store/a-app", 60, "systemctl --user restart app")
    assert supervisor_argv("rollback-to", "/tmp/d", "t", spec) == [
        "--task", "rollback-to", "--dir", "/tmp/d", "--token", "t", "--mode", "profile", "--profile", "/p/app",
        "--to-gen", "4", "--to-path", "/nix/store/a-app", "--activation-timeout", "60",
        "--activate-command", "systemctl --user restart app"]
    bare = supervisor_argv("rollback-to", "/tmp/d", "t", RollbackSpec("system", "/s", 1, None, 240))
    assert "--to-path" not in bare and "--activate-command" not in bare


def test_what_the_supervisor_registered_is_read_once_the_file_is_whole() -> None:
    assert Registered.parse("") is None and Registered.parse("3\n2\n") is None
    assert Registered.parse("3\n2\n/nix/store/b-old\n") == Registered(3, 2, "/nix/store/b-old")
    # `test`, or the same path again: nothing new to switch away from.
    assert Registered.parse("\n\n/nix/store/b-old\n") == Registered(None, None, "/nix/store/b-old")
    assert Registered.parse("1\n\n\n") == Registered(1, None, None)  # a new profile


@pytest.mark.parametrize("argv,state", [
    (["--dir", "D", "--token"], "failed usage: --token needs a value"),
    (["--dir", "D", "--token", "t", "--bogus", "x"], "failed usage: unknown option --bogus"),
    (["--dir", "D", "--token", "t", "--profile", "/p", "--new-path", "/x"], "failed usage: --action is required"),
    # Generations are the supervisor's to register, not the deployer's to say.
    (["--dir", "D", "--token", "t", "--profile", "/p", "--new-path", "/x", "--action", "switch", "--mode", "system",
      "--new-gen", "1"], "failed usage: unknown option --new-gen"),
    (["--task", "rollback-to", "--dir", "D", "--token", "t", "--profile", "/p", "--mode", "system"],
     "failed usage: --to-gen is required"),
    (["--task", "rollback-to", "--dir", "D", "--token", "t", "--profile", "/p", "--mode", "system",
      "--to-gen", "$(id)"], "failed usage: a generation is a number, not $(id)"),
])
def test_supervisor_refuses_a_malformed_command_line(tmp_path: Any, argv: list[str], state: str) -> None:
    script = resources.files("nixos_provider.engine.target").joinpath("supervisor.sh")
    argv = [str(tmp_path) if a == "D" else a for a in argv]
    done = subprocess.run(["sh", str(script), *argv], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert (tmp_path / "state").read_text() == state + "\n"
    parsed = SupervisorState.parse(state)
    assert parsed.phase is Phase.FAILED and parsed.cause is Cause.USAGE and parsed.terminal


@pytest.mark.parametrize("line,phase,cause,status,detail", [
    ("", Phase.STARTING, None, None, ""),
    ("ready", Phase.READY, None, None, ""),
    ("registering", Phase.REGISTERING, None, None, ""),
    ("activating", Phase.ACTIVATING, None, None, ""),
    ("failed register: nix-env could not make /nix/store/x a generation of /p", Phase.FAILED, Cause.REGISTER, None,
     "nix-env could not make /nix/store/x a generation of /p"),
    ("waiting-confirm", Phase.WAITING_CONFIRM, None, None, ""),
    ("rolling-back activation-failed:4", Phase.ROLLING_BACK, Cause.ACTIVATION_FAILED, 4, ""),
    ("rolled-back aborted", Phase.ROLLED_BACK, Cause.ABORTED, None, ""),
    ("rolled-back unconfirmed\n", Phase.ROLLED_BACK, Cause.UNCONFIRMED, None, ""),
    ("rolled-back no-word-from-the-deployer", Phase.ROLLED_BACK, Cause.NO_WORD, None, ""),
    ("failed activation-failed:124", Phase.FAILED, Cause.ACTIVATION_FAILED, 124, ""),
    ("rollback-failed activation-failed:1: re-activating /nix/store/x failed", Phase.ROLLBACK_FAILED,
     Cause.ACTIVATION_FAILED, 1, "re-activating /nix/store/x failed"),
    ("rollback-failed unconfirmed: there is no previous generation to return to", Phase.ROLLBACK_FAILED,
     Cause.UNCONFIRMED, None, "there is no previous generation to return to"),
    ("failed lock: cannot open /p/.lock", Phase.FAILED, Cause.LOCK, None, "cannot open /p/.lock"),
    ("locked-out deployment /tmp/x of /nix/store/y, since 2026", Phase.LOCKED_OUT, None, None,
     "deployment /tmp/x of /nix/store/y, since 2026"),
    ("failed gone: generation 3 of /p no longer exists", Phase.FAILED, Cause.GONE, None,
     "generation 3 of /p no longer exists"),
    ("failed switch: cannot switch /p to generation 3", Phase.FAILED, Cause.SWITCH, None,
     "cannot switch /p to generation 3"),
    ("done", Phase.DONE, None, None, ""),
    ("something new", Phase.UNKNOWN, None, None, "something new"),
])
def test_supervisor_states_parse_once(line: str, phase: Phase, cause: Cause | None, status: int | None,
                                      detail: str) -> None:
    state = SupervisorState.parse(line)
    assert (state.phase, state.cause, state.exit_status, state.detail) == (phase, cause, status, detail)
    assert state.terminal == (phase in (Phase.DONE, Phase.FAILED, Phase.ROLLED_BACK, Phase.ROLLBACK_FAILED,
                                        Phase.LOCKED_OUT))
    assert SupervisorState.parse("failed activation-failed:124").timed_out
    assert SupervisorState.parse("rolled-back unconfirmed").failed_step == "confirmation"


def test_remote_command_error_hides_sudo_and_keeps_the_tail() -> None:
    # The runner elevates the command, and its error names the caller's argv.
    target = Target(_Conn("root"), "alice")  # type: ignore[arg-type]
    argv = ["nix-env", "-p", "/x", "--set", "/y"]
    assert target.argv(argv)[0] == "sudo"
    err = target.failure(argv, 1, "a\nb\nerror: boom\n")
    assert isinstance(err, RemoteCommandError) and err.argv == argv
    assert str(err).startswith("`nix-env -p /x ...` failed on root@h:22 (exit 1)")
    assert str(err).endswith("error: boom")


def test_secrets_and_unknowns_round_trip() -> None:
    wire = {"connection": {"host": "h", "privateKey": {SIG_KEY: SECRET_SIG, "value": "KEY"}}, "flake": UNKNOWN_STR}
    value = decode(wire)
    assert value["connection"]["privateKey"] == Secret("KEY") and value["flake"] is UNKNOWN
    assert repr(value["connection"]["privateKey"]) == "Secret(****)"
    assert encode(value) == wire


def machine_check(news: dict[str, Any], project_dir: str | None = None) -> Failures:
    """A NixosMachine's Check, short of evaluating: the schema's types, the declaration's rules, unknown keys."""
    from nixos_provider.engine.declaration.input_rules import machine_failures
    from nixos_provider.pulumi_layer.schema import MACHINE, held_to
    return held_to(MACHINE, news, lambda plain, f: machine_failures(plain, project_dir, f))


def profile_check(news: dict[str, Any]) -> Failures:
    """A NixProfile's Check, short of evaluating."""
    from nixos_provider.engine.declaration.input_rules import profile_failures
    from nixos_provider.pulumi_layer.schema import PROFILE, held_to
    return held_to(PROFILE, news, profile_failures)


def failures(fn: Any, *args: Any) -> list[tuple[str, str]]:
    f = Failures()
    fn(f, *args)
    return f.items


def test_connection_validation_names_the_property_and_never_echoes_secrets() -> None:
    items = failures(check_connection, {"host": "bad host!", "port": 0, "privateKey": "hunter2",
                                        "proxy": {"host": "j", "proxy": {"host": "k"}}})
    props = [p for p, _ in items]
    assert props == ["connection.host", "connection.port", "connection.privateKey", "connection.proxy.proxy"]
    assert all("hunter2" not in reason for _, reason in items)
    assert failures(check_connection, {"host": UNKNOWN, "port": UNKNOWN}) == []


def test_health_check_validation() -> None:
    items = failures(check_health_checks, [{"http": "ftp://x"}, {"tcp": 99999}, {}, {"command": "true"}])
    assert ("healthChecks[0].http", "'ftp://x' is not an http:// or https:// URL") in items
    assert ("healthChecks[1].tcp", "must be between 1 and 65535, not 99999") in items
    assert ("healthChecks[2]", "needs exactly one of `command`, `http` or `tcp` (got none)") in items
    assert not [p for p, _ in items if p.startswith("healthChecks[3]")]


def gens(*numbers: int, current: int) -> list[Generation]:
    return [Generation(n, f"/nix/store/{'a' * 32}-system-{n}", n == current) for n in numbers]


def test_keep_generations_lets_go_of_all_but_the_newest_the_current_and_the_baseline() -> None:
    assert doomed_generations(gens(1, 2, 3, 4, 5, 6, 7, current=7), Retention(keep=3, protect=(1,))) == [2, 3, 4]
    assert doomed_generations(gens(1, 2, 3, current=3), Retention(keep=3, protect=(1,))) == []
    assert doomed_generations(gens(1, 2, 3, 4, current=4), Retention()) == []  # unset: every one is kept
    # Switched back by hand to an old generation: it runs, so it stays.
    assert doomed_generations(gens(3, 4, 5, 6, current=3), Retention(keep=1)) == [4, 5]
    assert doomed_generations(gens(2, 9, 10, current=10), Retention(keep=1, protect=(2,))) == [9]


def test_keep_generations_and_collect_garbage_are_checked() -> None:
    def settings(**news: Any) -> list[tuple[str, str]]:
        return failures(check_deploy_settings, news, ("collectGarbage",))
    assert settings(keepGenerations=3, collectGarbage=True) == []
    assert settings(keepGenerations=0) == [("keepGenerations", "must be between 1 and 10000, not 0")]
    assert settings(keepGenerations=2.5) == [("keepGenerations", "must be a whole number, not 2.5")]
    assert settings(collectGarbage="yes") == [("collectGarbage", "must be true or false, not 'yes'")]
    assert settings(keepGenerations=UNKNOWN) == []


@pytest.mark.parametrize("host", ["127.0.0.1/80; touch /tmp/x; echo", "$(touch /tmp/x)", "`touch /tmp/x`",
                                  "-oProxyCommand", "a b", "localhost\n", "", "x" * 300, 80, ["h"]])
def test_health_check_host_must_be_a_host_name_or_ip(host: Any) -> None:
    items = failures(check_health_checks, [{"tcp": 80, "host": host}])
    assert [p for p, _ in items] == ["healthChecks[0].host"]
    assert "is not a host name or IP address" in items[0][1]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "fe80::1%eth0", "localhost", "web-1.example.org", "db_2"])
def test_health_check_host_accepts_names_and_addresses(host: str) -> None:
    assert failures(check_health_checks, [{"tcp": 80, "host": host}]) == []


def test_health_check_command_and_http_must_be_strings() -> None:
    items = failures(check_health_checks, [{"command": ["true"]}, {"http": 8080}])
    assert [p for p, _ in items] == ["healthChecks[0].command", "healthChecks[1].http"]


def test_connection_credentials_must_be_strings_and_are_never_echoed() -> None:
    items = failures(check_connection, {"host": "h", "password": 123456, "agentSocketPath": 5,
                                        "privateKeyPassword": 987654, "privateKey": 42})
    assert [p for p, _ in items] == ["connection.password", "connection.privateKeyPassword",
                                     "connection.agentSocketPath", "connection.privateKey"]
    assert all("123456" not in r and "987654" not in r for _, r in items)


def test_a_huge_flake_or_store_path_is_refused_without_echoing_it() -> None:
    huge = "x" * 1_000_000 + "#web"
    (prop, reason), = failures(check_flake, "flake", huge)
    assert prop == "flake" and reason == "is 1000004 characters long; a flake reference has at most 4096"
    (prop, reason), = failures(check_store_path, "systemPath", "/nix/store/" + "a" * 100_000)
    assert prop == "systemPath" and len(reason) < 200


def _ctx() -> Context:
    return Context(log=lambda *a: None)


def test_a_progress_line_is_shown_once_until_another_comes() -> None:
    shown: list[tuple[str, str, str, bool]] = []
    ctx = Context(log=lambda *a: shown.append(a))
    for urn, line in [("a", "copying 2 paths, 0.1 MiB, 100%"), ("a", "copying 2 paths, 0.1 MiB, 100%"),
                      ("b", "copying 2 paths, 0.1 MiB, 100%"), ("a", "copied 2 paths"), ("a", "copying 2 paths, 0.1 MiB, 100%")]:
        ctx.status(urn, line)
    assert [(urn, msg) for _, msg, urn, _ in shown] == [
        ("a", "copying 2 paths, 0.1 MiB, 100%"), ("b", "copying 2 paths, 0.1 MiB, 100%"), ("a", "copied 2 paths"),
        ("a", "copying 2 paths, 0.1 MiB, 100%")]
    assert all(ephemeral for *_, ephemeral in shown)


def test_machine_diff_replaces_on_host_and_port_and_deploys_on_system_path() -> None:
    m = NixosMachine(_ctx())
    old = {"connection": {"host": "a", "port": 22, "user": "root", "privateKey": Secret("K1")},
           "systemPath": "/nix/store/" + "a" * 32 + "-s", "action": "switch", "generation": 4}
    moved = m.diff(old, {**old, "connection": {**old["connection"], "host": "b"}})
    assert moved.replaces == ["connection.host"]
    rekeyed = m.diff(old, {**old, "connection": {**old["connection"], "privateKey": Secret("K2")}})
    assert rekeyed.replaces == [] and rekeyed.detailed == {"connection.privateKey": "UPDATE"}
    assert not machine_deploys(old, {**old, "connection": {**old["connection"], "privateKey": "K2"}})
    new_system = {**old, "systemPath": "/nix/store/" + "b" * 32 + "-s"}
    assert m.diff(old, new_system).detailed == {"systemPath": "UPDATE"} and machine_deploys(old, new_system)
    assert m.diff(old, {**old, "systemPath": UNKNOWN}).detailed == {"systemPath": "UPDATE"}
    # install changes are shown but never reinstall or redeploy
    with_install = {**old, "install": {"kexecUrl": "x"}}
    assert m.diff(with_install, {**with_install, "install": {"kexecUrl": "y"}}).detailed == {"install.kexecUrl": "UPDATE"}
    assert not machine_deploys(with_install, {**with_install, "install": {"kexecUrl": "y"}})


def test_profile_diff_compares_resolved_profile_paths() -> None:
    p = NixProfile(_ctx())
    conn = {"host": "a", "port": 22, "user": "root"}
    old = {"connection": conn, "profile": "app", "user": "alice", "profilePath": "/nix/var/nix/profiles/per-user/alice/app",
           "storePath": "/nix/store/" + "a" * 32 + "-app"}
    same_profile = {"connection": conn, "profilePath": "/nix/var/nix/profiles/per-user/alice/app", "user": "alice",
                    "storePath": old["storePath"]}
    assert p.diff(old, same_profile).replaces == []
    other = {**same_profile, "profilePath": "/home/alice/.local/state/nix/profiles/app"}
    assert p.diff(old, other).replaces == ["profilePath"]


def test_system_profile_model() -> None:
    assert Profile().is_system and not Profile("/nix/var/nix/profiles/per-user/a/x").is_system


# -- closure diffs ------------------------------------------------------------------

from nixos_provider.engine.nix.cli import PathInfo  # noqa: E402
from nixos_provider.engine.nix.closure_diff import (  # noqa: E402
    compare_versions,
    diff_closures,
    parse_drv_name,
    split_store_path,
)


@pytest.mark.parametrize("name,expected", [
    ("nginx-1.24.0", ("nginx", "1.24.0")),
    ("lab-tools", ("lab-tools", "")),
    ("nixos-system-web-24.05.lab-1", ("nixos-system-web", "24.05.lab-1")),
    ("python3.11-requests-2.31.0", ("python3.11-requests", "2.31.0")),
    ("font-2-4", ("font", "2-4")),
])
def test_parse_drv_name_follows_nix(name: str, expected: tuple[str, str]) -> None:
    assert parse_drv_name(name) == expected


def test_split_store_path_handles_outputs() -> None:
    h = "/nix/store/" + "a" * 32 + "-"
    assert split_store_path(h + "openssl-3.0.13-dev") == ("openssl", "3.0.13", "dev")
    assert split_store_path(h + "openssl-3.0.13") == ("openssl", "3.0.13", "")
    assert split_store_path(h + "glibc-locales-2.39-52") == ("glibc-locales", "2.39-52", "")
    assert split_store_path(h + "etc") == ("etc", "", "")


@pytest.mark.parametrize("a,b,expected", [
    ("1.24.0", "1.26.1", -1), ("1.10", "1.9", 1), ("1.0", "1.0", 0), ("1.0pre1", "1.0", -1),
    ("2.0", "2.0.1", -1), ("1.0a", "1.0", 1), ("1.0", "1.0b", -1), ("2.39-52", "2.39-6", 1),
])
def test_compare_versions_follows_nix(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected


def test_diff_closures_reports_changes_added_removed_and_sizes() -> None:
    def p(name: str, size: int) -> PathInfo:
        return PathInfo("/nix/store/" + (name[:1] * 32) + "-" + name, size, ())
    old_root, new_root = p("nixos-system-web-1", 10), p("nixos-system-web-2", 10)
    before = [p("nginx-1.24.0", 100), p("openssl-3.0.13", 200), p("lab-tools", 50), old_root]
    after = [p("nginx-1.26.1", 120), p("openssl-3.0.13", 200), p("redis-7.2.4", 300), new_root]
    ch = diff_closures(old_root.path, before, new_root.path, after)
    assert [(c.name, c.before, c.after, c.size_delta) for c in ch.changed] == [("nginx", ("1.24.0",), ("1.26.1",), 20)]
    assert ch.added == ("redis-7.2.4",) and ch.removed == ("lab-tools",)
    assert (ch.size_before, ch.size_after, ch.paths_to_push) == (360, 630, 3)
    assert "  nginx: 1.24.0 → 1.26.1 (+20 B)" in ch.lines()


@pytest.mark.parametrize("argv,expected", [
    (["127.0.0.1:1234"], "127.0.0.1:1234"),
    (["--tracing", "http://t:9411", "127.0.0.1:1234"], "127.0.0.1:1234"),
    (["--logtostderr", "-v=9", "127.0.0.1:1"], "127.0.0.1:1"),
    (["--tracing", "http://t:9411"], None),
    ([], None),
])
def test_engine_address_is_the_last_argument(argv: list[str], expected: str | None) -> None:
    from nixos_provider.pulumi_layer.plugin import engine_address_from
    assert engine_address_from(argv) == expected


@pytest.mark.parametrize("parent,begins", [
    (["pulumi", "--non-interactive", "preview"], True),
    (["/usr/local/bin/pulumi", "up", "--refresh", "--yes"], True),
    (["pulumi", "-C", "infra", "destroy", "--yes"], False),
    (["pulumi", "refresh", "-s", "prod"], False),
    (["pulumi", "down", "--yes"], False),
    (["/root/.pulumi/bin/pulumi-language-yaml", "127.0.0.1:40123"], False),  # reading the schema
    ([], False),  # no /proc
])
def test_the_plan_begins_early_for_the_engine_of_a_command_that_checks(parent: list[str], begins: bool) -> None:
    from nixos_provider.pulumi_layer.plugin import begins_early
    assert begins_early(parent) is begins


def test_a_check_failure_never_quotes_a_value_the_program_marked_secret() -> None:
    """The declaration's rules see values revealed and may quote what they refuse; what reaches the CLI does not."""
    from nixos_provider.pulumi_layer.server import _check_failures
    token = "github:o/r?token=" + "x" * 100
    news = {"connection": {"host": Secret("bad host!"), "port": 22}, "action": Secret("swtich"), "flake": Secret(token)}
    reasons = {f.property: f.reason for f in _check_failures(machine_check(news), news)}
    assert reasons == {
        "connection.host": "[secret] is not a host name or IP address",
        "action": "must be one of 'switch', 'boot', 'test', not [secret]",
        "flake": f"[secret]... ({len(repr(token))} characters) is not a flake reference with an attribute, such as "
                 "`.#web`"}
    plain = {**news, "action": "swtich"}
    assert {f.reason for f in _check_failures(machine_check(plain), plain)} >= {
        "must be one of 'switch', 'boot', 'test', not 'swtich'"}


def test_nixos_deploy_holds_its_flags_to_a_declarations_rules(tmp_path: Path, capsys: Any) -> None:
    """The engine's command reads its flags as the declaration a NixosMachine or NixProfile would make, and refuses
    what Check would, naming the flag and the setting, before it reaches any host."""
    from nixos_provider.engine.nixos_deploy import main
    (tmp_path / "key").write_text("hunter2")
    (tmp_path / "db").write_text("s3cret")
    assert main(["--host", "a b", "--port", "0", "--key-file", str(tmp_path / "key"), "--store-path", "/nix/store/x",
                 "--health-http", "ftp://x", "--secret-file", f"db={tmp_path / 'db'}",
                 "--secret-file", f"/nix/store/db={tmp_path / 'db'}"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "nixos-deploy: --host (connection.host): 'a b' is not a host name or IP address",
        "nixos-deploy: --port (connection.port): must be between 1 and 65535, not 0",
        "nixos-deploy: --key-file (connection.privateKey): does not look like a private key (expected a PEM/OpenSSH "
        "`-----BEGIN ... PRIVATE KEY-----` block)",
        "nixos-deploy: --store-path (systemPath): '/nix/store/x' is not a Nix store path (/nix/store/<hash>-<name>)",
        "nixos-deploy: --health-http (healthChecks[0].http): 'ftp://x' is not an http:// or https:// URL",
        "nixos-deploy: --secret-file (secretFiles[0].path): 'db' must be a normalized absolute file path without "
        "`..`, such as `/var/lib/secrets/age.key`",
        "nixos-deploy: --secret-file (secretFiles[1].path): must not be in /nix/store: the store is readable by every "
        "user, which is what secretFiles avoids"]
    assert "hunter2" not in err and "s3cret" not in err
    assert main(["--host", "h", "--profile", "app", "--flake", ".#app"]) == 2
    assert capsys.readouterr().err == "nixos-deploy: --profile (profilePath): 'app' must be an absolute path without `..`\n"
    assert main(["--host", "h", "--profile", "/p/app", "--flake", ".#app", "--action", "dry-activate"]) == 2
    assert capsys.readouterr().err == "nixos-deploy: --action dry-activate applies to a NixOS system, not to a profile\n"


def test_a_secret_object_becomes_an_object_of_secrets() -> None:
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nx\n-----END OPENSSH PRIVATE KEY-----\n"
    wire = {"connection": {SIG_KEY: SECRET_SIG, "value": {"host": "h", "port": 22, "privateKey": key}}}
    value = decode(wire)
    assert value["connection"] == {"host": Secret("h"), "port": Secret(22), "privateKey": Secret(key)}
    # Check holds what the secrets hold to the connection's rules.
    assert [p for p, _ in profile_check(value).items if p.startswith("connection")] == []
    assert profile_check({"connection": Secret({"host": "h h"})}).items[0] == (
        "connection.host", "'h h' is not a host name or IP address")


# -- installing with nixos-anywhere ---------------------------------------------------------

import stat as _stat  # noqa: E402

from nixos_provider.engine import install as inst  # noqa: E402
from nixos_provider.engine.models import Credentials, InstallRequest  # noqa: E402

SYSTEM = "/nix/store/" + "b" * 32 + "-nixos-system-web"
DISKO = "/nix/store/" + "c" * 32 + "-disko-web"
KEEPALIVE = ["--ssh-option", "ConnectTimeout=15", "--ssh-option", "ServerAliveInterval=10",
             "--ssh-option", "ServerAliveCountMax=3"]
KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAsecretkeymaterialline\n-----END OPENSSH PRIVATE KEY-----\n"


def _request(**kw: Any) -> InstallRequest:
    remote = Remote("10.0.0.5", 2222, "ubuntu", Credentials(private_key=KEY))
    return InstallRequest(**{"remote": remote, "system_path": SYSTEM, "disko_script": DISKO, **kw})


def test_nixos_anywhere_argv_passes_secrets_only_as_files(tmp_path: Path) -> None:
    req = _request(phases=("disko", "install", "reboot"), kexec_url="https://example.invalid/kexec.tar.gz",
                   post_kexec_ssh_port=22, build_on="local", copy_host_keys=True, substitute_on_destination=False,
                   extra_files=(("/etc/ssh/ssh_host_ed25519_key", "host-private-key-content"),
                                ("/etc/ssh/ssh_host_ed25519_key.pub", "ssh-ed25519 AAAA host")),
                   disk_encryption_keys=(("/tmp/disk.key", "luks-passphrase"),),
                   extra_args=("--debug",), nix_options=(("substituters", ""),))
    files = inst.write_install_files(req, tmp_path)
    argv = inst.nixos_anywhere_argv(req, files)
    assert argv == [
        "nixos-anywhere", "--target-host", "ubuntu@10.0.0.5", "--ssh-port", "2222", *KEEPALIVE,
        "-i", str(tmp_path / "ssh-key"),
        "--store-paths", DISKO, SYSTEM, "--phases", "disko,install,reboot",
        "--kexec", "https://example.invalid/kexec.tar.gz", "--post-kexec-ssh-port", "22", "--build-on", "local",
        "--copy-host-keys", "--no-substitute-on-destination", "--extra-files", str(tmp_path / "extra-files"),
        "--disk-encryption-keys", "/tmp/disk.key", str(tmp_path / "disk-keys" / "0"),
        "--option", "substituters", "", "--debug",
    ]
    assert not any(s in " ".join(argv) for s in ("secretkeymaterial", "host-private-key-content", "luks-passphrase"))

    def mode(p: Path) -> int:
        return _stat.S_IMODE(p.stat().st_mode)

    assert (tmp_path / "ssh-key").read_text() == KEY and mode(tmp_path / "ssh-key") == 0o600
    assert mode(tmp_path / "extra-files" / "etc" / "ssh" / "ssh_host_ed25519_key") == 0o600
    assert mode(tmp_path / "extra-files" / "etc" / "ssh" / "ssh_host_ed25519_key.pub") == 0o644
    assert mode(tmp_path / "extra-files" / "etc") == 0o755
    assert mode(tmp_path / "disk-keys") == 0o700 and mode(tmp_path / "disk-keys" / "0") == 0o600


def test_nixos_anywhere_argv_with_a_flake_and_a_password(tmp_path: Path) -> None:
    remote = Remote("h", 22, "root", Credentials(password="hunter2-password"))
    req = InstallRequest(remote=remote, system_path=SYSTEM, flake="/src#nixosConfigurations.web.config")
    argv = inst.nixos_anywhere_argv(req, inst.write_install_files(req, tmp_path))
    assert argv == ["nixos-anywhere", "--target-host", "root@h", "--ssh-port", "22", *KEEPALIVE, "--env-password",
                    "--flake", "/src#nixosConfigurations.web.config"]
    assert inst.child_env(req)["SSHPASS"] == "hunter2-password"


def test_phases_follow_the_step_lines() -> None:
    phase = "start"
    seen = []
    for step in ["Uploading install SSH keys", "Gathering machine facts", "Switching system into kexec",
                 "Gathering machine facts", "Uploading /tmp/x/0 to /tmp/disk.key", "Formatting hard drive with disko",
                 "Uploading the system closure", "Installing NixOS", "Rebooting", "Done!"]:
        phase = inst.phase_after(step, phase)
        seen.append(phase)
    assert seen == ["connect", "connect", "kexec", "kexec", "disko", "disko", "install", "install", "reboot", "done"]
    assert inst.step_of("### Installing NixOS ###") == "Installing NixOS"
    assert inst.step_of("installing the boot loader...") is None
    assert inst.describe_phase("disko") == "in the disko phase"


def test_output_lines_are_redacted() -> None:
    req = _request(disk_encryption_keys=(("/tmp/disk.key", "luks-passphrase"),))
    secrets = inst.secrets_of(req)
    assert inst.redact("cat luks-passphrase > /tmp/disk.key", secrets) == "cat [secret] > /tmp/disk.key"
    assert "secretkeymaterial" not in inst.redact("key: AAAAsecretkeymaterialline", secrets)


def test_host_key_expected_after_install() -> None:
    import asyncssh
    private = asyncssh.generate_private_key("ssh-ed25519")
    pem = private.export_private_key("openssh").decode()
    pub = private.export_public_key("openssh").decode().strip()
    with_file = _request(extra_files=((inst.HOST_KEY_FILE, pem),))
    assert inst.expected_host_key(with_file, "ssh-ed25519 AAAAbefore") == (pub, f"the {inst.HOST_KEY_FILE} placed among the install's extra files")
    copied = _request(copy_host_keys=True)
    assert inst.expected_host_key(copied, pub)[0] == pub
    assert inst.expected_host_key(_request(), pub) == (None, "first use after the reboot")


def test_install_check_failures_name_the_property() -> None:
    f = machine_check({"connection": {"host": "h"}, "flake": ".#web", "install": {
        "phases": ["kexec", "reboot"], "command": [], "extraFiles": {"/etc/../x": Secret("s3cret-value")},
        "bogus": True}})
    props = dict(f.items)
    assert set(props) == {"install.bogus", "install.command", "install.phases", "install.extraFiles['/etc/../x']"}
    assert "s3cret-value" not in str(f.items)


async def test_local_runner_errors_carry_the_callers_argv() -> None:
    from nixos_provider.engine.errors import CommandNotFound, LocalCommandError, NixError
    from nixos_provider.engine.transport.process import LOCAL, Stderr
    ok = await LOCAL.run(["sh", "-c", 'cat; echo "$1" >&2', "sh", "err"], input="in")
    assert (ok.exit_status, ok.stdout, ok.stderr) == (0, "in", "err\n")
    with pytest.raises(LocalCommandError) as failed:
        await LOCAL.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert isinstance(failed.value, NixError) and failed.value.exit_status == 3
    assert str(failed.value).startswith("`sh -c echo boom >&2; exit 3` failed on the deployer (exit 3)")
    assert (await LOCAL.run(["sh", "-c", "exit 4"], check=False)).exit_status == 4
    with pytest.raises(CommandNotFound, match="`no-such-program-x` was not found on PATH"):
        await LOCAL.run(["no-such-program-x"])
    with pytest.raises(NixError, match="timed out after 1s"):
        await LOCAL.run(["sleep", "5"], timeout=1)
    # A started command: its stdin and stdout stream, its stderr comes with the result.
    proc = await LOCAL.start(["sh", "-c", "tr a-z A-Z; echo done >&2"])
    proc.stdin.write(b"stream")
    proc.stdin.write_eof()
    assert await proc.stdout.read() == b"STREAM"
    assert await proc.wait() == type(ok)(0, "", "done\n")
    merged = await LOCAL.start(["sh", "-c", "echo out; echo err >&2"], stdin=False, stderr=Stderr.STDOUT)
    assert sorted((await merged.stdout.read()).split()) == [b"err", b"out"]
    assert (await merged.close()).exit_status == 0


# -- input types come from the schema --------------------------------------------------------


def test_every_wrong_type_is_named_at_its_path() -> None:
    from nixos_provider.pulumi_layer.schema import MACHINE, PROFILE, held_to

    def type_failures(token: str, news: dict[str, Any]) -> list[tuple[str, str]]:
        return held_to(token, news, lambda plain, f: None).items  # the types alone: no rule, no unknown key here

    news = {"connection": {"host": "h", "port": "22x", "proxy": {"retries": 1.5, "password": Secret(7)}},
            "nixOptions": [{"name": "a", "value": 0}], "healthChecks": [{"tcp": 80, "name": False}],
            "install": {"extraFiles": {"/etc/x": ["no"]}}, "triggers": [{"any": "thing"}, 3],
            "confirmTimeout": UNKNOWN, "dryActivate": "yes"}
    got = dict(type_failures(MACHINE, news))
    assert got == {
        "connection.port": "must be a whole number, not a string",
        "connection.proxy.retries": "must be a whole number, not a number",
        "connection.proxy.password": "must be a string, not a number",  # the value itself is never shown
        "nixOptions[0].value": "must be a string, not a number",
        "healthChecks[0].name": "must be a string, not a boolean",
        'install.extraFiles["/etc/x"]': "must be a string, not a list",
        "dryActivate": "must be true or false, not a string",
    }
    assert type_failures(PROFILE, {"user": [], "activate": "ok"}) == [("user", "must be a string, not a list")]


def test_input_keys_are_the_schemas() -> None:
    from nixos_provider.engine.declaration.input_rules import MACHINE_INPUTS, PROFILE_INPUTS
    from nixos_provider.pulumi_layer.schema import MACHINE, PROFILE, input_properties
    assert set(MACHINE_INPUTS) == set(input_properties(MACHINE))
    assert set(PROFILE_INPUTS) == set(input_properties(PROFILE))


def test_guesses_fill_the_gaps_then_go_before_then_after() -> None:
    """A first preview's guesses of the next Checks: the gaps between the names asked for, then toward the start
    of a numbered run (where a stack's machines are), the end (configurations not in a stack yet) last."""
    from nixos_provider.engine.nix.evaluation import neighbours
    names = [f"web{i}" for i in range(1, 21)] + ["db", "cache"]
    web = parse_flake_ref(".#web10", "/p")

    def guesses(asked: list[str]) -> list[str]:
        return [str(r.configuration[0]) for r in neighbours(web, names, [parse_flake_ref(f".#{a}", "/p") for a in asked])
                if r.configuration]

    assert guesses([])[:3] == ["web9", "web8", "web7"]
    assert guesses(["web4"])[:8] == ["web5", "web6", "web7", "web8", "web9", "web3", "web2", "web1"]
    assert guesses(["web4"])[8:] == [f"web{i}" for i in range(11, 21)]  # a numbered fleet: no `db`, no `cache`
    db = parse_flake_ref(".#db", "/p")
    assert [r.configuration[0] for r in neighbours(db, names) if r.configuration][:2] == ["cache", "web1"]


def test_computed_outputs_are_the_schemas() -> None:
    """The Pulumi layer's lists of computed outputs name exactly what schema.json declares."""
    from nixos_provider.engine.resources import machine_preview, profiles
    from nixos_provider.pulumi_layer.schema import MACHINE, PROFILE, schema

    doc = schema()
    for token, computed in ((MACHINE, [*machine_preview.COMPUTED, *machine_preview.CHANGE_REPORTS]),
                            (PROFILE, profiles.COMPUTED)):
        declared = doc["resources"][token]
        assert set(computed) == set(declared["properties"]) - set(declared["inputProperties"]), token


def test_a_key_the_schema_does_not_declare_is_refused_at_any_depth() -> None:
    """A typo is a Check failure at its path, with the property meant when one is close; never ignored."""
    news = {"connection": {"host": "h", "prot": 22, "proxy": {"host": "j", "usr": "x"}},
            "healthChecks": [{"tcp": 80, "timout": 3}], "install": {"phases": ["install", "reboot"], "kexec": "x"},
            "binaryCache": {"url": "https://c", "publicKey": Secret("k"), "signingkey": "s"},
            "secretFiles": [{"path": "/etc/k", "content": "c", "contentHash": "h", "xyzzy": 1}],
            "systemPath": "/nix/store/00000000000000000000000000000000-x", "flakee": ".#web"}
    got = dict(machine_check(news).items)
    assert got["connection.prot"] == "is not a property of Connection (did you mean `port`?)"
    assert got["connection.proxy.usr"] == "is not a property of ProxyConnection (did you mean `user`?)"
    assert got["healthChecks[0].timout"] == "is not a property of HealthCheck (did you mean `timeout`?)"
    assert got["install.kexec"] == "is not a property of Install (did you mean `kexecUrl`?)"
    assert got["binaryCache.signingkey"] == "is not a property of BinaryCache (did you mean `signingKey`?)"
    assert got["secretFiles[0].contentHash"] == "is not a property of a secret file: it is computed by the provider"
    assert got["secretFiles[0].xyzzy"].startswith("is not a property of SecretFile (it has `content`, `group`, ")
    assert "`contentHash`" not in got["secretFiles[0].xyzzy"]  # an output, never an input
    assert got["flakee"] == "is not a property of NixosMachine (did you mean `flake`?)"
    # A rule that knows why a key has no place says so (a jump host's own proxy), not the generic line.
    jump = dict(machine_check({**news, "connection": {"host": "h", "proxy": {"host": "j", "proxy": {
        "host": "k"}}}}).items)
    assert jump["connection.proxy.proxy"] == "a jump host cannot itself have a proxy"
    profile = dict(profile_check({"connection": {"host": "h", "pasword": "x"}, "profile": "p",
                                  "storePath": "/nix/store/00000000000000000000000000000000-x"}).items)
    assert profile == {"connection.pasword": "is not a property of Connection (did you mean `password`?)"}
    # The provider's binaryCache, as `pulumi config set` gives it (JSON text) and as a secret object.
    from nixos_provider.pulumi_layer import provider_config
    for cache in ('{"url": "https://c", "publicKey": "k", "urll": 1}', Secret({"url": "https://c", "urll": 1})):
        assert ("binaryCache.urll", "is not a property of BinaryCache (did you mean `url`?)") in \
            provider_config.check({"binaryCache": cache}).items


def _message_strings(source: str) -> list[str]:
    """The string literals of a module that can reach a user (docstrings are for readers of the code)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_engine_errors_speak_engine_terms_and_the_pulumi_layer_names_the_property() -> None:
    """Engine messages name no property of the schema; each setting they can blame has its property path."""
    from nixos_provider.engine.declaration.error_text import PROPERTY_OF, describe
    from nixos_provider.engine.errors import HostKeyMismatch, Setting
    from nixos_provider.pulumi_layer.schema import schema

    assert set(PROPERTY_OF) == set(Setting)
    doc = schema()
    connection = doc["types"]["nixos:index:Connection"]["properties"]
    config = doc["config"]["variables"]
    machine = doc["resources"]["nixos:index:NixosMachine"]["inputProperties"]
    install = doc["types"][machine["install"]["$ref"].rsplit("/", 1)[1]]["properties"]
    known = {f"connection.{k}" for k in connection} | set(config) | {f"install.{k}" for k in install}
    for setting, names in PROPERTY_OF.items():
        for path in re.findall(r"`([^`]+)`", names):
            assert path in known, (setting, path)
    engine = Path(nixos_provider.engine.__file__).parent
    for source in engine.rglob("*.py"):
        if source.parent.name == "declaration":
            continue  # a declaration's rules name its settings by their paths: that is what they are for
        quoted = {name for text in _message_strings(source.read_text())
                  for name in re.findall(r"`([A-Za-z.\[\]]+)`", text)}
        assert not quoted & known, (source.name, quoted & known)
    mismatch = HostKeyMismatch("root@h:22", "SHA256:a (ssh-ed25519)", "SHA256:b (ssh-ed25519)")
    assert "update the pinned host key" in str(mismatch)
    assert describe(mismatch).endswith("update `connection.hostKey`)")
    assert describe(ValueError("plain")) == "plain"


def test_the_schema_documents_the_engine_defaults() -> None:
    from nixos_provider.engine.models import ACTIVATION_TIMEOUT, CONFIRM_TIMEOUT, REBOOT_TIMEOUT
    from nixos_provider.pulumi_layer.schema import input_properties

    for resource in ("nixos:index:NixosMachine", "nixos:index:NixProfile"):
        props = input_properties(resource)
        assert props["confirmTimeout"]["default"] == CONFIRM_TIMEOUT
        assert props["activationTimeout"]["default"] == ACTIVATION_TIMEOUT
    assert input_properties("nixos:index:NixosMachine")["rebootTimeout"]["default"] == REBOOT_TIMEOUT


def test_a_system_without_a_flake_reaches_nix_as_separate_arguments() -> None:
    from nixos_provider.engine.nix.cli import EVALUATE_ANY_APPLY, EVALUATE_APPLY, FileRef

    # A configuration.nix: `<nixpkgs>/nixos` evaluates it, as nixos-rebuild does; no value inside an expression.
    conf = FileRef("/p/my conf;.nix", "", "/np")
    assert conf.eval_args() == [
        "--file", "/np/nixos", "--argstr", "configuration", "/p/my conf;.nix", "-I", "nixpkgs=/np",
        "-I", "nixos-config=/p/my conf;.nix", TOPLEVEL, "--apply", EVALUATE_APPLY]
    assert str(conf) == "/p/my conf;.nix" and conf.configuration is None
    # An attribute of a Nix file: a NixOS evaluation or a system; `<nixpkgs>` only when given.
    assert FileRef("/p/default.nix", "machines.web").eval_args() == [
        "--file", "/p/default.nix", "machines.web", "--apply", EVALUATE_ANY_APPLY]
    assert FileRef("/p/default.nix", "web", "/np").eval_args()[:4] == ["--file", "/p/default.nix", "-I", "nixpkgs=/np"]
    assert str(FileRef("/p/default.nix", "web")) == "web of /p/default.nix"
    # The evaluator's plan keeps both kinds across runs.
    from nixos_provider.engine.nix.cli import Nix
    from nixos_provider.engine.nix.evaluation import PlannedRef

    for ref in (conf, FileRef("/p/default.nix", "web"), parse_flake_ref("/f#web")):
        planned = PlannedRef.of(Nix(["nix"], [("cores", "1")]), ref)
        assert PlannedRef.from_json(json.loads(json.dumps(planned.to_json()))) == planned
    assert PlannedRef.from_json({"command": ["nix"], "settings": [], "file": 1, "attr": "web"}) is None


def test_a_machines_source_resolves_against_the_project() -> None:
    from nixos_provider.engine.declaration.typed_inputs import Closure
    from nixos_provider.engine.nix.cli import FileRef

    def ref(**props: Any) -> Any:
        return Closure.parse(props, "systemPath").ref("/proj", nixos=True)

    assert ref(configuration="hosts/web.nix", nixpkgs="../nixpkgs") == FileRef("/proj/hosts/web.nix", "", "/nixpkgs")
    assert ref(expression="/x/default.nix", attribute="web") == FileRef("/x/default.nix", "web", None)
    assert ref(flake=".#web") == FlakeRef("/proj", f"nixosConfigurations.web.{TOPLEVEL}")
    assert ref(systemPath="/nix/store/x-s") is None
    assert Closure.parse({"configuration": "c.nix"}, "systemPath").evaluated
    assert not Closure.parse({"systemPath": "/nix/store/x-s"}, "systemPath").evaluated


def test_a_flake_reference_knows_its_configuration_and_its_siblings() -> None:
    ref = parse_flake_ref("/f#web")
    assert ref.configuration == ("web", "config.system.build.toplevel")
    assert str(ref.system) == "/f#nixosConfigurations.web.config"
    assert ref.build_product("config.system.build.diskoScript") == FlakeRef(
        "/f", "nixosConfigurations.web.config.system.build.diskoScript")
    dotted = parse_flake_ref('/f#nixosConfigurations."web.example.org".config.system.build.toplevel')
    assert dotted.configuration == ('"web.example.org"', "config.system.build.toplevel")
    assert dotted.of_configuration("db").attr == "nixosConfigurations.db.config.system.build.toplevel"
    assert ref.of_configuration('a"b.c').attr == 'nixosConfigurations."a\\"b.c".config.system.build.toplevel'
    # Not a configuration's toplevel: no system, no disko script, no siblings.
    package = parse_flake_ref("/f#packages.x86_64-linux.app", nixos=False)
    assert package.configuration is None and package.system is None
    assert parse_flake_ref("/f#nixosConfigurations.web.config.system.build.vm").system is None
    with pytest.raises(ValueError):
        package.of_configuration("web")
# -- binaryCache --------------------------------------------------------------------


def _cache_keys(tmp_path: Any, name: str) -> tuple[str, str]:
    secret, public = tmp_path / f"{name}.secret", tmp_path / f"{name}.public"
    subprocess.run(["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)], check=True)
    return secret.read_text().strip(), public.read_text().strip()


def test_binary_cache_check_names_each_field_and_matches_the_key_pair(tmp_path: Any) -> None:
    from nixos_provider.engine.declaration.conversion import parse_binary_cache, to_binary_cache
    from nixos_provider.engine.declaration.machine_checks import check_binary_cache
    secret, public = _cache_keys(tmp_path, "c-1")
    other_secret, _ = _cache_keys(tmp_path, "c-2")

    def failures(value: Any) -> dict[str, str]:
        f = Failures()
        check_binary_cache(f, value)
        return dict(f.items)

    good = {"url": "https://cache.example.org", "uploadUrl": "s3://bucket?region=eu-west-1", "publicKey": public,
            "signingKey": secret}
    assert failures(good) == {}
    assert failures({**good, "signingKey": other_secret}) == {
        "binaryCache.signingKey": "is not the secret key of `publicKey`: targets would refuse what it signs"}
    # The same key bytes under another name is not the key targets trust either.
    renamed = "x-9:" + secret.split(":", 1)[1]
    assert "binaryCache.signingKey" in failures({**good, "signingKey": renamed})
    assert set(failures({"url": "ftp://x", "publicKey": other_secret})) == {"binaryCache.url", "binaryCache.publicKey"}
    assert set(failures({})) == {"binaryCache.url", "binaryCache.publicKey"}
    assert set(failures({**good, "signingKeyFile": "/k"})) == {"binaryCache.signingKeyFile"}
    assert set(failures({"url": "file:///srv/c", "publicKey": public, "signingKeyFile": "k"})) == {
        "binaryCache.signingKeyFile"}
    assert failures("https://cache.example.org") == {"binaryCache": "must be an object with `url` and `publicKey`, not a string"}
    assert failures(UNKNOWN) == {}
    assert all(secret.split(":")[1] not in reason for reason in failures({**good, "signingKey": "c-1:AAAA"}).values())
    # Provider config set with `pulumi config set --path` arrives as JSON text.
    parsed = parse_binary_cache(json.dumps({"url": "http://h:1/c", "publicKey": public}))
    assert failures(parsed) == {}
    cache = to_binary_cache({**good, "uploadUrl": None})
    assert cache is not None and cache.write_url == "https://cache.example.org" and cache.signing_key == secret
    assert secret not in repr(cache)


def test_the_plugin_starts_without_ssh_or_the_deployment_code() -> None:
    # The engine starts the plugin for every preview and up; its first calls need neither.
    # asyncssh (with cryptography) alone doubled the start (bench/cold_start.py). Modules loaded on
    # first use are in sys.modules before they run, so the test looks for modules they import.
    probe = ("import sys, nixos_provider.__main__; "
             "print(' '.join(sorted(m for m in ('asyncssh.connection', 'cryptography', 'nixos_provider.engine.closures.push', "
             "'nixos_provider.engine.target.activation', 'pulumi.runtime.proto.resource_pb2', 'pulumi.automation') "
             "if m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


# A grub.cfg as NixOS's install-grub.pl writes it: the default entry, then every generation in a submenu, newest
# first; generation 3 has a specialisation, so it is a submenu whose first entry is its default.
GRUB_CFG = """if [ -s $prefix/grubenv ]; then
  load_env
fi
function savedefault {
  saved_entry="${chosen}"
  save_env saved_entry
}
menuentry "NixOS" --class nixos --unrestricted {
  linux /nix/store/a-linux/bzImage init=/nix/store/c-nixos-system/init
}

submenu "NixOS - All configurations" --class submenu {
menuentry "NixOS - Configuration 12 (2026-12-04 - 26.05pre)" --class nixos {
  linux /nix/store/a-linux/bzImage init=/nix/store/d-nixos-system/init
}
submenu "NixOS - Configuration 3 (2026-12-01 - 26.05pre)" --class submenu {
menuentry "NixOS - Configuration 3 - Default (2026-12-01 - 26.05pre)" --class nixos {
  linux x
}
menuentry "NixOS - Configuration 3 - (web - 2026-12-01 - 26.05pre)" --class nixos {
  linux x
}
}
menuentry "NixOS - Configuration 1 (2026-11-01 - 26.05pre)" --class nixos {
  linux x
}
}
"""


@pytest.mark.parametrize(("generation", "entry"), [
    ("12", "NixOS - All configurations>NixOS - Configuration 12 (2026-12-04 - 26.05pre)"),
    ("3", "NixOS - All configurations>NixOS - Configuration 3 (2026-12-01 - 26.05pre)>"
          "NixOS - Configuration 3 - Default (2026-12-01 - 26.05pre)"),
    ("1", "NixOS - All configurations>NixOS - Configuration 1 (2026-11-01 - 26.05pre)"),
    ("2", ""),
])
def test_grub_reboot_names_a_generation_by_its_titles(tmp_path: Path, generation: str, entry: str) -> None:
    from nixos_provider.engine.target import reboot
    (tmp_path / "grub.cfg").write_text(GRUB_CFG)
    script = reboot._ONE_SHOT.replace("/boot/grub/grub.cfg", str(tmp_path / "grub.cfg")) + '\ngrub_entry "$1"'
    res = subprocess.run(["sh", "-c", script, "sh", generation], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == entry


def test_build_host_check_failures_name_the_property() -> None:
    from nixos_provider.engine.declaration.input_rules import _check_build_on

    def machine(f: Failures, news: dict[str, Any]) -> None:
        _check_build_on(f, news, "systemPath")

    def profile(f: Failures, news: dict[str, Any]) -> None:
        _check_build_on(f, news, "storePath")

    conn = {"host": "builder.example", "port": 22}
    assert failures(machine, {"flake": ".#web", "buildHost": conn}) == []
    assert failures(machine, {"flake": ".#web"}) == failures(profile, {"flake": ".#app", "buildHost": conn}) == []
    assert failures(machine, {"flake": ".#web", "buildHost": {**conn, "host": "a b", "port": 0}}) == [
        ("buildHost.host", "'a b' is not a host name or IP address"),
        ("buildHost.port", "must be between 1 and 65535, not 0")]
    said = failures(machine, {"flake": ".#web", "buildOn": "remote", "buildHost": conn})
    assert said == [("buildHost", "`buildOn: remote` builds on the target itself; set either, not both")]
    said = failures(machine, {"systemPath": "/nix/store/" + "a" * 32 + "-x", "buildHost": conn})
    assert said == [("buildHost", "a prebuilt `systemPath` has nothing to build; a build host builds a `flake`, "
                                  "`configuration` or `expression`")]
    said = failures(profile, {"storePath": "/nix/store/" + "a" * 32 + "-x", "buildHost": conn, "buildOn": "remote"})
    assert said == [("buildOn", "`remote` builds a `flake` on the host; a prebuilt `storePath` has nothing to build"),
                    ("buildHost", "`buildOn: remote` builds on the target itself; set either, not both")]
    said = failures(profile, {"storePath": "/nix/store/" + "a" * 32 + "-x", "buildHost": conn})
    assert said == [("buildHost", "a prebuilt `storePath` has nothing to build; a build host builds a `flake`")]
    said = failures(machine, {"flake": ".#web", "buildHost": {**conn, "sudoPassword": "pw"}})
    assert [p for p, _ in said] == ["buildHost.sudoPassword"] and "pw" not in said[0][1]
    assert failures(profile, {"flake": ".#app", "buildOn": "elsewhere"}) == [
        ("buildOn", "must be one of 'local', 'remote', not 'elsewhere'")]


async def test_the_agent_lists_and_signs_with_its_keys_and_refuses_the_rest() -> None:
    import struct

    import asyncssh
    from nixos_provider.engine.transport.agent import KeyAgent
    key, jump_key = asyncssh.generate_private_key("ssh-ed25519"), asyncssh.generate_private_key("ssh-rsa")
    agent = await KeyAgent([key, jump_key, key]).start()  # the target's, its jump host's (the same key once)
    try:
        async with asyncssh.connect_agent(agent.path) as client:
            listed = await client.get_keys()
            assert [k.public_data for k in listed] == [key.public_data, jump_key.public_data]
            for private, public in zip((key, jump_key), listed, strict=True):
                signature = await public.sign_async(b"to sign")
                assert private.convert_to_public().verify(b"to sign", signature)
        other = asyncssh.generate_private_key("ssh-ed25519").public_data
        asking = bytes([13]) + struct.pack(">I", len(other)) + other + struct.pack(">I", 1) + b"x" + struct.pack(">I", 0)
        assert agent.answer(asking) == bytes([5])  # another key's blob: refused
        assert agent.answer(bytes([17])) == bytes([5])  # adding a key: refused
        assert agent.answer(bytes([13, 0, 0])) == bytes([5])  # malformed
    finally:
        await agent.close()
    assert not Path(agent.path).parent.exists()


def test_every_secret_field_of_every_resource_input_is_kept_secret_in_outputs() -> None:
    """Over the schema: each input whose type has `secret` fields (at any depth: a connection's proxy) passes
    through secret_fields, which every output site uses, and comes out with each of them wrapped (secretFiles'
    contents too: they are inputs in state; outputs keep only their HMACs, test_secret_files_unit)."""
    from nixos_provider.pulumi_layer.schema import schema
    from nixos_provider.pulumi_layer.secrecy import secret_fields
    doc = schema()
    types = doc["types"]

    def example(spec: dict[str, Any], depth: int = 0) -> tuple[Any, list[tuple[str, ...]]]:
        """A value of spec with every secret field set in plain text, and the paths of those fields."""
        ref = spec.get("$ref", "").removeprefix("#/types/")
        if ref not in types or depth > 3:
            return None, []
        value: dict[str, Any] = {}
        secrets: list[tuple[str, ...]] = []
        for name, field in types[ref].get("properties", {}).items():
            if field.get("secret"):
                value[name] = "plain-" + name
                secrets.append((name,))
            else:
                inner, paths = example(field, depth + 1)
                if paths:
                    value[name] = inner
                    secrets.extend((name, *p) for p in paths)
        return value, secrets

    checked = 0
    for token, resource in doc["resources"].items():
        for prop, spec in resource["inputProperties"].items():
            value, secrets = example(spec)
            if not secrets:
                continue
            out = secret_fields({prop: value}, token)[prop]
            for path in secrets:
                field = out
                for step in path:
                    field = field[step]
                assert isinstance(field, Secret), (token, prop, path)
                checked += 1
    # connection and buildHost (with their proxies), binaryCache, install, secretFiles; NixProfile's connection
    assert checked >= 21, checked


@pytest.mark.parametrize(("stderr", "expected"), [
    # Nix 2.8 and 2.26: the builder's log, then one line per failure, the failed builder first.
    ("these 2 derivations will be built:\n  /nix/store/a-fails-1.drv\nbuilding '/nix/store/a-fails-1.drv'...\n"
     "first line\nthis package does not build\n"
     "error: builder for '/nix/store/a-fails-1.drv' failed with exit code 3\n"
     "error: 1 dependencies of derivation '/nix/store/b-top.drv' failed to build\n",
     "error: builder for '/nix/store/a-fails-1.drv' failed with exit code 3\n> first line\n"
     "> this package does not build"),
    # Nix 2.34: the same log, then a block per failure.
    ("building '/nix/store/a-fails-1.drv'...\nfirst line\nthis package does not build\n"
     "error: Cannot build '/nix/store/a-fails-1.drv'.\n       Reason: builder failed with exit code 3.\n"
     "       Output paths:\n         /nix/store/c-fails-1\n"
     "error: Cannot build '/nix/store/b-top.drv'.\n       Reason: 1 dependency failed.\n",
     "error: Cannot build '/nix/store/a-fails-1.drv'.\n       Reason: builder failed with exit code 3.\n"
     "       Output paths:\n         /nix/store/c-fails-1\n> first line\n> this package does not build"),
])
def test_a_build_failure_names_the_failed_builder_and_its_last_lines(stderr: str, expected: str) -> None:
    from nixos_provider.engine.nix.versions import build_failure
    assert build_failure(stderr) == expected


def test_the_provider_configuration_is_checked_and_parsed_once() -> None:
    from nixos_provider.pulumi_layer import provider_config
    from nixos_provider.pulumi_layer.properties import Secret
    # From `pulumi config set` everything is text: JSON lists, numbers.
    text = {"nixCommand": '["nix", "--option", "cores", "1"]', "maxParallelSsh": "4", "defaultUser": "deploy",
            "defaultPrivateKey": Secret("KEY"), "binaryCache": '{"url": "file:///c", "publicKey": "c:' + "A" * 43 + '="}'}
    assert not provider_config.check(text)
    config = provider_config.parse(text)
    assert config.nix_command == ("nix", "--option", "cores", "1") and config.max_parallel_ssh == 4
    assert (config.default_user, config.default_private_key) == ("deploy", "KEY")
    assert config.binary_cache is not None and config.binary_cache.url == "file:///c"
    assert provider_config.parse({}) == FleetSettings()
    bad = provider_config.check({"nixCommand": "nix --option x", "nixosAnywhereCommand": [], "maxParallelTransfers": 0,
                                 "binaryCache": {"url": "ftp://x"}})
    assert [p for p, _ in bad.items] == ["maxParallelTransfers", "nixCommand", "nixosAnywhereCommand", "binaryCache.url",
                                       "binaryCache.publicKey"]


def test_the_build_hosts_ssh_settings_for_a_target_behind_a_jump_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from nixos_provider.engine.closures.build_host import _agent_of, _logins, _ssh_config
    key, agent = Credentials(private_key="KEY"), Credentials(agent_socket_path="/run/agent")
    jump = Remote("bastion.example.org", 2200, "hop", key)
    target = Remote("10.0.0.5", 22, "root", key, proxy=jump, connect_timeout=7)
    config = _ssh_config(target, "/tmp/pulumi-nixos-copy.X")
    assert config.splitlines()[:3] == ["Host 10.0.0.5", "    Port 22", "    ProxyJump hop@bastion.example.org:2200"]
    assert "    UserKnownHostsFile /tmp/pulumi-nixos-copy.X/known_hosts" in config and "ConnectTimeout 7" in config
    assert config.rstrip().endswith("Include ~/.ssh/config /etc/ssh/ssh_config")  # after ours: ours win
    assert "ProxyJump hop@[fd00::1]:22" in _ssh_config(Remote("t", 22, "root", key, proxy=Remote("fd00::1", 22, "hop", key)), "/d")
    # One agent can be forwarded: the same for both logins, or the deployer's when neither has credentials.
    monkeypatch.setenv("SSH_AUTH_SOCK", "/run/mine")
    assert _agent_of(_logins(Remote("t", 22, "root", agent, proxy=Remote("j", 22, "hop", agent)))) == "/run/agent"
    assert _agent_of(_logins(Remote("t", 22, "root", Credentials(), proxy=Remote("j", 22, "hop", Credentials())))) == "/run/mine"
    assert _agent_of(_logins(Remote("t", 22, "root", agent, proxy=Remote("j", 22, "hop", Credentials())))) is None
    assert _agent_of(_logins(target)) is None  # keys: the provider's own agent holds them


def test_upstream_tracebacks_are_told_from_the_providers_by_their_frames() -> None:
    """The Python SDK's teardown after a failed Check prints one traceback or another depending on timing; each
    of its frames is the SDK's, gRPC's, the language host's or the standard library's (forms seen here)."""
    from conftest import has_provider_traceback
    teardown = ('    Traceback (most recent call last):\n'
                '      File "/w/.venv/lib/python3.11/site-packages/pulumi/log.py", line 155, in _log\n'
                '      File "/root/.cache/pulumi-nixos/pulumi/bin/pulumi-language-python-exec", line 235, in <module>\n'
                '      File "src/python/grpcio/grpc/_cython/_cygrpc/channel.pyx.pxi", line 391, in next_event\n'
                '      File "/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py", line 271, in __enter__\n'
                '      File "<frozen codecs>", line 319, in decode\n    KeyboardInterrupt\n')
    assert not has_provider_traceback("error: property flake value has a problem") and not has_provider_traceback(teardown)
    ours = teardown + '      File "/w/provider/nixos_provider/pulumi_layer/server.py", line 3, in Check\n'
    program = 'Traceback (most recent call last):\n  File "/tmp/p/__main__.py", line 5, in <module>\nValueError\n'
    assert has_provider_traceback(ours) and has_provider_traceback(program)
    assert has_provider_traceback("Traceback (most recent call last):\nno frames\n")


def test_a_file_missing_from_a_git_flakes_copy_is_named_as_untracked_and_nothing_else_is(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "sub" / "modules").mkdir(parents=True)
    (repo / "sub" / "modules" / "web.nix").write_text("{ }")
    gone = "/nix/store/00000000000000000000000000000000-source"
    said = f"getting status of '{gone}/sub/modules': No such file or directory"
    # The copy of a flake in a Git repository is the work tree's: the path is the repository's, not the flake's.
    assert untracked_hint(said, f"{repo}/sub") == (
        f"{said}. `sub/modules` is in {repo}, but Git does not track it, and Nix sees only the files Git tracks. "
        f"Run `git -C {repo} add sub/modules` to make it visible to Nix")
    assert untracked_hint(said, f"git+file://{repo}?dir=sub").endswith(f"`git -C {repo} add sub/modules` to make it "
                                                                        "visible to Nix")
    # A path: flake's copy has every file; a file missing from the work tree too is really missing.
    assert untracked_hint(said, f"path:{repo}/sub") == said
    assert untracked_hint(said.replace("/modules", "/nowhere"), f"{repo}/sub") == said.replace("/modules", "/nowhere")
    # Nix 2.34 names the file itself; the command it prints after is cut with its trace.
    told = "Path 'a b.nix' in the repository \"/r\" is not tracked by Git. (at /r/flake.nix:1:2)"
    assert untracked_hint(told, "/r") == f"{told}. Run `git -C /r add 'a b.nix'` to make it visible to Nix"
