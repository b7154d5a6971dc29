"""A checked declaration, known in full, parsed once into frozen models: what a machine or profile is deployed
from (`Closure`), how (`DeploySettings`, and the `DeployRequest` it makes), and each resource's own settings.

A preview's declaration may hold values not known yet, which cannot be parsed: the Pulumi layer reads those as they
are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..models import (
    ACTIVATION_TIMEOUT,
    COMPRESSIONS,
    CONFIRM_TIMEOUT,
    REBOOT_TIMEOUT,
    Action,
    BinaryCache,
    Compression,
    DeployRequest,
    HealthCheck,
    Profile,
    RebootMode,
    Remote,
    Retention,
    SubstitutePolicy,
)
from ..nix.cli import FileRef, SourceRef, parse_flake_ref, resolve_path
from ..target.secret_files import SecretFile
from .conversion import nix_options, to_binary_cache, to_health_checks, to_secret_files


@dataclass(frozen=True)
class DeploySettings:
    """How every deployment runs, as both resources declare it."""

    magic_rollback: bool = True
    confirm_timeout: float = CONFIRM_TIMEOUT
    activation_timeout: float = ACTIVATION_TIMEOUT
    auto_rollback: bool = True
    health_checks: tuple[HealthCheck, ...] = ()
    substitute_on_destination: SubstitutePolicy = "auto"
    compress: Compression = "auto"
    nix_options: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # may carry access tokens
    keep_generations: int | None = None
    collect_garbage: bool = False
    reboot: RebootMode = "never"
    reboot_timeout: float = REBOOT_TIMEOUT

    @classmethod
    def parse(cls, props: Mapping[str, Any]) -> DeploySettings:
        """From a checked, known declaration: unset settings take the engine's defaults."""
        compress = props.get("compress")
        return cls(
            magic_rollback=props.get("magicRollback", True) is not False,
            confirm_timeout=float(props.get("confirmTimeout") or CONFIRM_TIMEOUT),
            activation_timeout=float(props.get("activationTimeout") or ACTIVATION_TIMEOUT),
            auto_rollback=props.get("autoRollback", True) is not False,
            health_checks=to_health_checks(props.get("healthChecks")),
            substitute_on_destination=_SUBSTITUTE.get(props.get("substituteOnDestination"), "auto"),
            compress=compress if compress in COMPRESSIONS else "auto",
            nix_options=tuple(nix_options(props.get("nixOptions"))),
            keep_generations=int(props["keepGenerations"]) if props.get("keepGenerations") is not None else None,
            collect_garbage=props.get("collectGarbage") is True,
            reboot=_REBOOTS.get(str(props.get("reboot")), "never"),
            reboot_timeout=float(props.get("rebootTimeout") or REBOOT_TIMEOUT),
        )

    def request(self, remote: Remote, profile: Profile, *, action: Action = "switch",
                activate_command: str | None = None, binary_cache: BinaryCache | None = None) -> DeployRequest:
        """The deployment these settings describe; the engine decides its store path, derivation, build host and the
        baseline generation that keepGenerations never deletes."""
        return DeployRequest(
            remote=remote, store_path="", profile=profile, action=action, magic_rollback=self.magic_rollback,
            confirm_timeout=self.confirm_timeout, activation_timeout=self.activation_timeout,
            auto_rollback=self.auto_rollback, health_checks=self.health_checks, activate_command=activate_command,
            substitute_on_destination=self.substitute_on_destination, compress=self.compress,
            binary_cache=binary_cache, retention=Retention(keep=self.keep_generations, collect_garbage=self.collect_garbage),
            reboot=self.reboot, reboot_timeout=self.reboot_timeout)


_REBOOTS: dict[str, RebootMode] = {"never": "never", "ifNeeded": "ifNeeded", "always": "always"}
# substituteOnDestination: unset asks the host's caches with short timeouts.
_SUBSTITUTE: dict[Any, SubstitutePolicy] = {True: "always", False: "never"}


# The inputs that name a system to evaluate (NixProfile has only `flake`).
SOURCE_KEYS = ("flake", "configuration", "expression", "attribute", "nixpkgs")


@dataclass(frozen=True)
class Closure:
    """What to deploy: a source to evaluate and build (a flake reference, or a system without a flake: a
    `configuration` module, or an `attribute` of an `expression` file, with `nixpkgs`), or a store path (Check
    resolved a source's to it)."""

    flake: str | None
    store_path: str | None
    configuration: str | None = None
    expression: str | None = None
    attribute: str | None = None
    nixpkgs: str | None = None

    @classmethod
    def parse(cls, props: Mapping[str, Any], path_key: str) -> Closure:
        def text(key: str) -> str | None:
            value = props.get(key)
            return str(value) if value is not None else None

        path = props.get(path_key)
        return cls(text("flake"), str(path) if isinstance(path, str) else None, configuration=text("configuration"),
                   expression=text("expression"), attribute=text("attribute"), nixpkgs=text("nixpkgs"))

    @property
    def evaluated(self) -> bool:
        """Whether the store path comes from evaluating a source (not given as is)."""
        return self.flake is not None or self.configuration is not None or self.expression is not None

    def ref(self, project_dir: str | None, *, nixos: bool) -> SourceRef | None:
        """The source to evaluate, relative paths resolved against the project's folder; None for a store path."""
        nixpkgs = resolve_path(self.nixpkgs, project_dir) if self.nixpkgs is not None else None
        if self.flake is not None:
            return parse_flake_ref(self.flake, project_dir, nixos=nixos)
        if self.configuration is not None:
            return FileRef(resolve_path(self.configuration, project_dir), "", nixpkgs)
        if self.expression is not None:
            return FileRef(resolve_path(self.expression, project_dir), self.attribute or "", nixpkgs)
        return None


# The actions a machine's `action` names (Check allows no other).
_ACTIONS: dict[str, Action] = {"switch": "switch", "boot": "boot", "test": "test"}


def _plain_dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


@dataclass(frozen=True)
class DeployInputs:
    """What both resources' declarations have: the connection, the closure, the settings."""

    connection: dict[str, Any] = field(repr=False)  # plain: credentials included
    closure: Closure
    settings: DeploySettings

    @staticmethod
    def _common(news: dict[str, Any], path_key: str) -> dict[str, Any]:
        return {"connection": _plain_dict(news.get("connection")),
                "closure": Closure.parse(news, path_key), "settings": DeploySettings.parse(news)}


@dataclass(frozen=True)
class MachineInputs(DeployInputs):
    """A NixosMachine's checked, known declaration."""

    build_on_target: bool = False
    build_host: dict[str, Any] | None = field(default=None, repr=False)  # plain: credentials included
    action: Action = "switch"
    install: dict[str, Any] | None = field(default=None, repr=False)  # plain: file contents and disk keys included
    secret_files: tuple[SecretFile, ...] = field(default=(), repr=False)
    binary_cache: BinaryCache | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, news: dict[str, Any]) -> MachineInputs:
        return cls(
            **cls._common(news, "systemPath"),
            build_on_target=news.get("buildOn") == "remote",
            build_host=_plain_dict(news["buildHost"]) if news.get("buildHost") is not None else None,
            action=_ACTIONS[news.get("action") or "switch"],
            install=_plain_dict(news["install"]) if news.get("install") is not None else None,
            secret_files=to_secret_files(news.get("secretFiles")),
            binary_cache=to_binary_cache(news.get("binaryCache")),
        )


@dataclass(frozen=True)
class ProfileInputs(DeployInputs):
    """A NixProfile's checked, known declaration."""

    activate: str | None = None
    build_on_target: bool = False
    build_host: dict[str, Any] | None = field(default=None, repr=False)  # plain: credentials included

    @classmethod
    def parse(cls, news: dict[str, Any]) -> ProfileInputs:
        activate = news.get("activate")
        return cls(**cls._common(news, "storePath"), activate=str(activate) if activate is not None else None,
                   build_on_target=news.get("buildOn") == "remote",
                   build_host=_plain_dict(news["buildHost"]) if news.get("buildHost") is not None else None)
