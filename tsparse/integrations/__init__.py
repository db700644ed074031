"""Integrations of tsparse into training frameworks (each imported only when used).

* :mod:`tsparse.integrations.verl` - verl 0.9.1: plugin registration (policy losses, advantage
  estimator, reward function), the ``impl_backend=tsparse`` fused-kernel backend, the
  dual-stream rollout on the actor, and the ViTAR-16K -> parquet converter.
"""
