"""adaptrun: elastic, adaptive-batch training for PyTorch.

One subpackage per role (DESIGN.md's map):
- ``adaptrun.science``: the pure science, numpy only: noise scale (``gns``), statistical
  efficiency, LR rules (``scaling``), the throughput model, the goodput ``policy``, the
  ``report`` dataclass. The controller and the simulator import it without torch.
- ``adaptrun.worker``: the torch worker library a training script uses (``init``, the adaptive
  DDP wrapper, loader and sampler, state and snapshots, directives, reporting, epochs,
  LARS/LAMB).
- ``adaptrun.simulation``: the trace-driven simulator, its bundled traces and the plots.
- ``adaptrun.generated``: code generated from ``proto/`` by grpcio-tools (never edited).

The worker API is loaded lazily on first touch (``_LAZY``), so ``adaptrun simulate`` and the
controller start without torch. The modules' former flat names (``adaptrun.scaling``,
``adaptrun.optim``, ...) stay importable: ``_FlatNames`` maps each to the one module object of
its subpackage.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> module (under adaptrun) that defines it
_LAZY: dict[str, str] = {
    "init": "worker.job",
    "WorldInfo": "worker.distributed",
    "world": "worker.contract",
    "World": "worker.contract",
    "on_reform": "worker.contract",
    "StaleWorldError": "worker.errors",
    "AdaptiveDataParallel": "worker.parallel",
    "AdaptiveDataLoader": "worker.data",
    "remaining_epochs": "worker.epochs",
    "register_state": "worker.job",
    "restored_step": "worker.job",
    "Directive": "worker.directive",
    "write_directive": "worker.directive",
    "read_directive": "worker.directive",
    "PLANNED_EXIT_CODE": "worker.directive",
    "add_report_sink": "worker.reporting",
    "record_metric": "worker.reporting",
    "AdaptrunError": "worker.errors",
    "NotInitializedError": "worker.errors",
    "BatchConfigError": "worker.errors",
    "SnapshotMismatchError": "worker.errors",
    "SnapshotCorruptError": "worker.errors",
    "DeviceConfigError": "worker.errors",
}

# former flat module name -> its subpackage
_MOVED: dict[str, str] = {
    **dict.fromkeys(("gns", "efficiency", "scaling", "throughput", "policy", "report"),
                    "science"),
    **dict.fromkeys(("distributed", "job", "parallel", "data", "sampler", "state", "checkpoint",
                     "directive", "reporting", "epochs", "optim", "errors"), "worker"),
    **dict.fromkeys(("simulator", "traces", "plotting"), "simulation"),
    **dict.fromkeys(("control_plane_pb2", "control_plane_pb2_grpc"), "generated"),
}


class _FlatNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import adaptrun.scaling`` gives the module ``adaptrun.science.scaling`` itself."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, name = fullname.partition(".")
        if head != __name__ or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        name = spec.name.partition(".")[2]
        return importlib.import_module(f"{__name__}.{_MOVED[name]}.{name}")

    def exec_module(self, module):
        pass   # already executed under its own name


if not any(isinstance(f, _FlatNames) for f in sys.meta_path):
    sys.meta_path.insert(0, _FlatNames())


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        if name in _MOVED:
            module_obj = importlib.import_module(f"{__name__}.{_MOVED[name]}.{name}")
            globals()[name] = module_obj
            return module_obj
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'adaptrun' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
