"""The pure science of adaptrun: numpy and scipy only, never torch.

``gns`` (gradient noise scale), ``efficiency`` (gain and statistical efficiency), ``scaling``
(LR rules), ``throughput`` (step-time model and its fit), ``policy`` (goodput-maximising
decisions) and ``report`` (what a running job measures). The live controller and the
simulator run the very same functions.
"""
