"""Errors a user of the worker library can cause, each with one line saying what to do.

All derive from ``AdaptrunError`` so a script can catch the family; the subclasses name the
kind of mistake (like torch elastic's ``RendezvousError`` family).
"""
from __future__ import annotations

__all__ = [
    "AdaptrunError",
    "NotInitializedError",
    "BatchConfigError",
    "SnapshotMismatchError",
    "SnapshotCorruptError",
    "StateRegistryError",
    "MissingStateError",
    "DeviceConfigError",
    "StaleWorldError",
]


class AdaptrunError(RuntimeError):
    """Base class of the errors adaptrun raises for a misuse or a bad configuration."""


class NotInitializedError(AdaptrunError):
    """The worker API was used before ``adaptrun.init()``."""


class BatchConfigError(AdaptrunError, ValueError):
    """A batch size or bound that the world size or the dataset cannot satisfy."""


class SnapshotMismatchError(AdaptrunError):
    """A snapshot found on restore belongs to another model (names or shapes differ)."""


class SnapshotCorruptError(AdaptrunError):
    """A snapshot file cannot be read (truncated, overwritten, not a snapshot at all) and no
    older readable one is left to restore instead."""


class StateRegistryError(AdaptrunError, ValueError):
    """A state registered twice under one name, or an object without state_dict."""


class MissingStateError(AdaptrunError):
    """A world would start from nothing while its job has committed steps."""


class DeviceConfigError(AdaptrunError, ValueError):
    """A device this host cannot give the worker: a GPU asked for where none is visible, or
    more workers on a node than it has visible GPUs."""


class StaleWorldError(AdaptrunError):
    """A process group of a world that has since been re-formed was used: read
    ``adaptrun.world()`` where the rank or world size is used."""
