"""What every resource of the provider is handed: the fleet (the engine's side: settings, evaluations, builds, the
engine) and where each resource's lines go in Pulumi's log."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..engine.declaration.error_text import describe
from ..engine.lifecycle.models import Report
from ..engine.resources.fleet import Fleet

LogFn = Callable[[str, str, str, bool], None]  # (severity, message, urn, ephemeral)


@dataclass
class Context:
    log: LogFn
    fleet: Fleet = field(default_factory=Fleet)
    _last_status: dict[str, str] = field(default_factory=dict, repr=False)  # by URN

    def report(self, urn: str) -> Report:
        """Where an operation on urn reports: its lines under the resource, errors naming the properties."""
        return Report(status=lambda s: self.status(urn, s), info=lambda s: self.info(urn, s),
                      warn=lambda s: self.warn(urn, s), describe=describe)

    def status(self, urn: str, message: str) -> None:
        """An ephemeral progress line; the same line twice in a row for a resource is shown once (a push reports
        100% on its last chunk, and again when the target has taken every path)."""
        if self._last_status.get(urn) == message:
            return
        self._last_status[urn] = message
        self.log("INFO", message, urn, True)

    def info(self, urn: str, message: str) -> None:
        self.log("INFO", message, urn, False)

    def warn(self, urn: str, message: str) -> None:
        self.log("WARNING", message, urn, False)


def stack_of(urn: str) -> str:
    """`urn:pulumi:<stack>::<project>::<type>::<name>` -> `<project>/<stack>`: the plan whose evaluations go ahead."""
    parts = urn.split("::")
    stack = parts[0].rsplit(":", 1)[-1] if parts else ""
    project = parts[1] if len(parts) > 1 else ""
    return f"{project}/{stack}"
