"""The trace-driven simulator (``simulator``), its traces (``traces``, bundled under
``traces/pollux``) and the timeline plots (``plotting``, also used by ``adaptrun run``)."""
