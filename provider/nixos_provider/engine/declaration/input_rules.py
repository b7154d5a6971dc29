"""A machine's or profile's declaration held to all its rules, those that combine settings included.

The single-setting rules are in checks.py and machine_checks.py. A front end that knows each setting's type (the
Pulumi layer, from schema.json) adds those failures first: one reason per setting, the first.
"""

from __future__ import annotations

import posixpath
from typing import Any

from . import checks, machine_checks

# The settings each declares.
MACHINE_INPUTS = [
    "connection", "flake", "configuration", "expression", "attribute", "nixpkgs", "systemPath", "buildOn",
    "substituteOnDestination", "compress", "nixOptions", "action", "magicRollback", "confirmTimeout",
    "activationTimeout", "autoRollback", "healthChecks", "install", "onDestroy", "triggers", "buildOnPreview",
    "dryActivate", "secretFiles", "binaryCache", "keepGenerations", "collectGarbage", "reboot", "rebootTimeout",
    "buildHost",
]
PROFILE_INPUTS = [
    "connection", "profile", "profilePath", "user", "flake", "storePath", "activate", "substituteOnDestination",
    "compress", "nixOptions", "magicRollback", "confirmTimeout", "activationTimeout", "autoRollback", "healthChecks",
    "onDestroy", "triggers", "keepGenerations", "collectGarbage", "buildOn", "buildHost",
]


def machine_failures(news: dict[str, Any], project_dir: str | None,
                     f: checks.Failures | None = None) -> checks.Failures:
    """What is wrong with a NixosMachine's declaration (relative paths resolve against project_dir), added to f."""
    f = f if f is not None else checks.Failures()
    checks.check_connection(f, news.get("connection"))
    flake, path = news.get("flake"), news.get("systemPath")
    machine_checks.check_system_source(f, news, project_dir)
    checks.check_flake(f, "flake", flake)
    checks.check_store_path(f, "systemPath", path)
    _check_build_on(f, news, "systemPath")
    checks.check_choice(f, "action", news.get("action"), ("switch", "boot", "test"))
    checks.check_choice(f, "reboot", news.get("reboot"), ("never", "ifNeeded", "always"))
    checks.check_seconds(f, "rebootTimeout", news.get("rebootTimeout"), 10, 86400)
    if news.get("reboot") not in (None, "never") and news.get("action") == "test":
        f.add("reboot", "`test` activates without a boot entry, so there is nothing to reboot into; use `switch` "
                        "or `boot` with a reboot")
    checks.check_choice(f, "onDestroy", news.get("onDestroy"), ("rollback", "retain"))
    checks.check_deploy_settings(f, news, ("substituteOnDestination", "magicRollback", "autoRollback",
                                           "buildOnPreview", "dryActivate", "collectGarbage"))
    machine_checks.check_install(f, news)
    machine_checks.check_secret_files(f, news.get("secretFiles"))
    machine_checks.check_binary_cache(f, news.get("binaryCache"))
    return f


def profile_failures(news: dict[str, Any], f: checks.Failures | None = None) -> checks.Failures:
    """What is wrong with a NixProfile's declaration, added to f."""
    f = f if f is not None else checks.Failures()
    checks.check_connection(f, news.get("connection"))
    name, path = news.get("profile"), news.get("profilePath")
    if (name is None) == (path is None):
        f.add("profile", "set exactly one of `profile` (a name) and `profilePath` (an absolute path)")
    if isinstance(name, str) and ("/" in name or name in ("", ".", "..")):
        f.add("profile", f"{name!r} is a profile name, not a path; use `profilePath` for a path")
    if isinstance(path, str) and (not posixpath.isabs(path) or ".." in path.split("/")):
        f.add("profilePath", f"{path!r} must be an absolute path without `..`")
    user = news.get("user")
    if isinstance(user, str) and not checks.USER_RE.match(user):
        f.add("user", f"{user!r} is not a valid user name")
    flake, store = news.get("flake"), news.get("storePath")
    if (flake is None) == (store is None):
        f.add("flake", "set exactly one of `flake` and `storePath`")
    checks.check_flake(f, "flake", flake)
    checks.check_store_path(f, "storePath", store)
    _check_build_on(f, news, "storePath")
    checks.check_choice(f, "onDestroy", news.get("onDestroy"), ("rollback", "remove", "retain"))
    checks.check_command(f, "activate", news.get("activate"))
    checks.check_deploy_settings(f, news, ("substituteOnDestination", "magicRollback", "autoRollback", "collectGarbage"))
    return f


def _check_build_on(f: checks.Failures, news: dict[str, Any], path_key: str) -> None:
    """buildOn and buildHost: where what the inputs evaluate is built, when not here; a prebuilt path (`systemPath`,
    `storePath`) has nothing to build."""
    checks.check_choice(f, "buildOn", news.get("buildOn"), ("local", "remote"))
    prebuilt = news.get(path_key) is not None
    if news.get("buildOn") == "remote" and prebuilt:
        where = "target" if path_key == "systemPath" else "host"
        f.add("buildOn", f"`remote` builds a `flake` on the {where}; a prebuilt `{path_key}` has nothing to build")
    build_host = news.get("buildHost")
    if build_host is None:
        return
    checks.check_connection(f, build_host, "buildHost")
    if isinstance(build_host, dict) and build_host.get("sudoPassword") is not None:
        f.add("buildHost.sudoPassword", "the build host's SSH user builds and imports derivations itself, without "
                                        "sudo: it must be root or one of the build host's trusted-users")
    if news.get("buildOn") == "remote":
        f.add("buildHost", "`buildOn: remote` builds on the target itself; set either, not both")
    elif prebuilt:
        sources = "a `flake`, `configuration` or `expression`" if path_key == "systemPath" else "a `flake`"
        f.add("buildHost", f"a prebuilt `{path_key}` has nothing to build; a build host builds {sources}")
