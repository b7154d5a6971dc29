"""What NixosMachine and NixProfile share: the resource base, diffing, failures."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from ..engine.declaration.checks import Failures
from ..engine.declaration.conversion import nix_options, to_remote
from ..engine.declaration.typed_inputs import SOURCE_KEYS, Closure, DeploySettings
from ..engine.errors import EngineError
from ..engine.lifecycle.models import ConvergeFailed
from ..engine.models import Remote
from ..engine.nix.cli import Nix
from .context import Context
from .error_text import describe
from .properties import UNKNOWN, contains_unknown, is_secret, reveal
from .state import R, State


class DeployedResource:
    """What both resource kinds need: the provider context, nix with the resource's options, the Remote."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _nix(self, props: dict[str, Any]) -> Nix:
        return self.ctx.nix(nix_options(reveal(props.get("nixOptions"))))

    def _deploy_nix(self, settings: DeploySettings) -> Nix:
        return self.ctx.nix(list(settings.nix_options))

    def _remote(self, props: dict[str, Any], host_key: str | None = None) -> Remote:
        return self._remote_of(props["connection"], host_key)

    def _remote_of(self, connection: dict[str, Any], host_key: str | None = None) -> Remote:
        return to_remote(reveal(connection), host_key=host_key, default_private_key=self.ctx.default_private_key,
                         default_user=self.ctx.default_user)

    async def _resolve_source(self, urn: str, news: dict[str, Any], *, nixos: bool) -> Any:
        """Check: the source's output path, or UNKNOWN while the source (or its options) is not known yet."""
        given = [k for k in SOURCE_KEYS if news.get(k) is not None]
        if any(contains_unknown(news.get(k)) for k in (*given, "nixOptions")):
            return UNKNOWN
        # A source or option that is a secret is never written down to be evaluated ahead.
        remember = not any(is_secret(news.get(k)) for k in (*given, "nixOptions"))
        ref = Closure.parse(reveal(news), "").ref(self.ctx.project_dir, nixos=nixos)
        assert ref is not None, "Check resolves only an evaluated source"
        try:
            evaluation = await self.ctx.evaluate(ref, self._nix(news), urn=urn, remember=remember)
            return evaluation.out_path
        except (EngineError, ValueError) as e:
            f = Failures()
            # The message goes to the property that names the system: `flake`, `configuration` or `expression`.
            f.add(next((k for k in ("flake", "configuration", "expression") if k in given), "flake"), describe(e))
            raise CheckFailed(f) from e


    async def _recorded(self, urn: str, ident: str, state: type[State[R]], converging: Awaitable[R],
                        recorded: R | None, news: dict[str, Any], olds: dict[str, Any], lives_at: str) -> dict[str, Any]:
        """A converge's record as properties, or its failure as a PartialFailure with what runs now (paired with the
        inputs that describe it). A resource reached for the first time is remembered where it lives (lives_at: its
        profile's path), for a replacement's delete."""
        try:
            record = await converging
        except ConvergeFailed as e:
            assert isinstance(e.record, state.RECORD)
            self._created(urn, recorded, e.record, lives_at)
            inputs = news if e.with_new_inputs else state.inputs_of(olds)
            raise PartialFailure(str(e), ident, state(inputs, e.record).to_properties(), news) from e
        self._created(urn, recorded, record, lives_at)
        return state(news, record).to_properties()

    def _created(self, urn: str, recorded: R | None, record: R, lives_at: str) -> None:
        if recorded is None and record.host_key:
            self.ctx.created_on[urn] = (record.host_key, lives_at)


class CheckFailed(Exception):
    def __init__(self, failures: Failures) -> None:
        super().__init__("; ".join(f"{p}: {r}" for p, r in failures.items))
        self.failures = failures


class PartialFailure(Exception):
    """The operation failed, but this is what the machine is now (ErrorResourceInitFailed)."""

    def __init__(self, message: str, resource_id: str, outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
        super().__init__(message)
        self.resource_id = resource_id
        self.outputs = outputs
        self.inputs = inputs


@dataclass
class DiffResult:
    replaces: list[str] = field(default_factory=list)
    detailed: dict[str, str] = field(default_factory=dict)  # property path -> kind (UPDATE, ADD, ...)
    delete_before_replace: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.detailed)


def same(a: Any, b: Any) -> bool:
    return bool(reveal(a) == reveal(b))


def diff_inputs(olds: dict[str, Any], news: dict[str, Any], keys: list[str], replace_paths: list[tuple[str, ...]],
                deploy_keys: list[str]) -> DiffResult:
    """Compare inputs key by key; keys whose nested path is in replace_paths force replacement.

    A setting that appears where the old state had none (e.g. credentials or
    `flake` after `pulumi import`, which only knows host and system) is not a
    change unless it changes what is deployed: the engine records the new
    inputs anyway, and nothing on the machine would differ.
    """
    result = DiffResult()
    for key in keys:
        old, new = olds.get(key), news.get(key)
        if contains_unknown(new) and new is not None:
            result.detailed[key] = "UPDATE"
        elif old is None and new is not None:
            if key in deploy_keys:
                result.detailed[key] = "ADD"
        elif old is not None and new is None:
            result.detailed[key] = "DELETE"
        elif not same(old, new):
            if isinstance(old, dict) and isinstance(new, dict):
                for sub in sorted(set(old) | set(new)):
                    if old.get(sub) is None and new.get(sub) is not None:
                        continue
                    if not same(old.get(sub), new.get(sub)):
                        result.detailed[f"{key}.{sub}"] = "UPDATE"
            else:
                result.detailed[key] = "UPDATE"
    for path in replace_paths:
        old, new = _get(olds, path), _get(news, path)
        if new is UNKNOWN or (not same(old, new) and not (old is None and new is None)):
            name = ".".join(path)
            result.replaces.append(name)
            result.detailed[name] = "UPDATE_REPLACE"
    result.delete_before_replace = bool(result.replaces) and same_machine(olds, news)
    return result


def build_host_key(olds: dict[str, Any], build_host: Any) -> str | None:
    """The build host key the last deployment pinned, while buildHost still names that host."""
    old, new = reveal(olds.get("buildHost")), reveal(build_host)
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None
    same_host = (old.get("host"), old.get("port")) == (new.get("host"), new.get("port"))
    return olds.get("buildHostKey") if same_host else None


def same_machine(olds: dict[str, Any], news: dict[str, Any]) -> bool:
    """Whether a replacement stays at the address and port of the old resource. Only then must the old one go first:
    Pulumi otherwise creates the replacement before deleting, so a move that cannot reach its new host, or meets
    another host key there, leaves the old host as it was. (One machine under two names is `replaced_in_place`.)"""
    old, new = reveal(olds.get("connection")), reveal(news.get("connection"))
    if not isinstance(old, dict) or not isinstance(new, dict) or contains_unknown(new):
        return False
    return (old.get("host"), old.get("port", 22)) == (new.get("host"), new.get("port", 22))


def _get(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d
