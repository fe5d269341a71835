"""Actuators: what adds or removes a job's workers, one module per backend behind ``base``'s
abstract class (``local``: agent processes on this machine; ``kubernetes``: the scale
subresource of a StatefulSet or PyTorchJob; ``ray``: agents as Ray actors)."""
from .base import (Actuator, ActuatorError, UnknownActuatorError, actuator_names,
                   create_actuator, register_actuator)

__all__ = ["Actuator", "ActuatorError", "UnknownActuatorError", "register_actuator",
           "create_actuator", "actuator_names"]
