"""First-party samplers: ``ode-euler``, ``dpm-solver`` and ``flow-sde``."""
