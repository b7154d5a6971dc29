"""Modules imported on first use, so the provider starts fast.

The Pulumi engine starts the provider for every `pulumi preview` and `up`,
and its first calls (schema, configuration, Check) need neither SSH nor the
deployment code. asyncssh (with `cryptography`) takes longer to import than
the rest of the provider together; it loads when the first connection is made.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """Module `name`, executed when one of its attributes is first used (importlib's LazyLoader)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
