"""Pulumi's gRPC protocol modules, without the Pulumi SDK around them.

The provider speaks the protocol through the modules Pulumi generates from
its .proto files (`pulumi.runtime.proto`). Importing them the usual way first
runs `pulumi/__init__.py` and `pulumi/runtime/__init__.py`, which import the
whole SDK (automation API, runtime, mocks, ...): most of the plugin's start-up
time, spent on every `pulumi preview` and `up`, for code it never calls.

The plugin's entry point calls `register_bare_parents()` first: `pulumi`,
`pulumi.runtime` and `pulumi.runtime.proto` become empty packages that only
know where their files are, so `from pulumi.runtime.proto import provider_pb2`
runs that module (and the modules it imports) alone, not the SDK nor the
other services' modules (analyzer, language, resource, ...). Only the plugin
process does this; a process that already imported the SDK keeps it.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def register_bare_parents() -> None:
    if "pulumi" in sys.modules:
        return
    for name in ("pulumi", "pulumi.runtime", "pulumi.runtime.proto"):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.submodule_search_locations is None:
            return  # no Pulumi SDK: the import that follows says so
        package = ModuleType(name)
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package
