"""The torch worker library a training script imports (through ``adaptrun.init`` etc.).

``distributed`` forms one world's process group; ``job`` owns the job context (``init``,
state registry, the step boundary, snapshots); ``parallel`` (AdaptiveDataParallel), ``data``
and ``sampler`` (AdaptiveDataLoader, exactly-once slices), ``state`` and ``checkpoint``
(snapshots and their exchange), ``directive``, ``reporting``, ``epochs``, ``optim``
(LARS/LAMB), ``errors``. Dependencies point one way: ``job`` builds on ``distributed``.
"""
