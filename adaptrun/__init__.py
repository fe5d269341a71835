"""adaptrun: elastic, adaptive-batch training for PyTorch.

The pure science (``gns``, ``efficiency``, ``scaling``, ``throughput``, ``policy``) imports
no torch, so the simulator and the controller start fast. The worker API that a training
script uses is loaded lazily on first touch (see ``_LAZY``).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; filled as the worker library grows.
_LAZY: dict[str, str] = {
    "init": "distributed",
    "WorldInfo": "distributed",
    "AdaptiveDataParallel": "parallel",
    "AdaptiveDataLoader": "data",
    "remaining_epochs": "epochs",
    "register_state": "job",
    "restored_step": "job",
    "Directive": "directive",
    "write_directive": "directive",
    "read_directive": "directive",
    "PLANNED_EXIT_CODE": "directive",
    "add_report_sink": "reporting",
    "AdaptrunError": "errors",
    "NotInitializedError": "errors",
    "BatchConfigError": "errors",
    "SnapshotMismatchError": "errors",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'adaptrun' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
