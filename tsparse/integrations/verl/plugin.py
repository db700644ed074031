"""The ``verl.plugins`` entry point: loaded by ``import verl`` in every verl process (driver,
TaskRunner, Ray workers) unless ``VERL_USE_EXTERNAL_PLUGINS=none`` (or a list without
``tsparse``).

:func:`register` adds, through verl's own registries, each when the verl module it goes
into is first imported (import hooks; ``import verl`` itself imports none of them):

* policy losses ``tsparse`` and ``tsparse_dualstream`` (``register_policy_loss``);
* the advantage estimator ``tsparse_dualstream`` (``register_adv_est``);
* the trainer mode ``tsparse_dualstream`` (``register_trainer``; :mod:`.trainer`, stage 2's
  sparse stream between sampling and ``compute_log_prob``) when verl's v1 trainer package is
  imported (it needs TransferQueue);
* the dispatcher of the ``impl_backend=tsparse`` flag on ``FSDPEngine._build_module``
  (:func:`~.patches.install_dispatcher`; verl has no hook for a third-party fused-kernel
  backend). It returns verl's model untouched unless the engine's model config carries the
  flag, so registration alone changes no verl behaviour. Processes that never build an
  engine (driver, rollout, reward workers) never import it.

verl's loader calls ``entry_point.load()`` - it imports this module and does not call
anything - so importing this module registers (:func:`register` at the bottom).

The reward function needs no registration: verl loads it by path,
``reward.custom_reward_function.path=pkg://tsparse.dualstream.reward_fn`` (or the file
``tsparse/dualstream/reward_fn.py``), ``name=compute_score``: :data:`REWARD_FUNCTION`.

verl swallows a failing plugin (it logs at DEBUG and carries on); tsparse logs a WARNING with
the reason when a registration fails, so a broken install is visible (and never breaks verl's
own imports).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

__all__ = ["register", "REWARD_FUNCTION", "registered"]

logger = logging.getLogger(__name__)

from . import REWARD_FUNCTION  # noqa: E402  (re-exported)

_STATE = {"registered": False}
_CORE_ALGOS = "verl.trainer.ppo.core_algos"


def registered() -> bool:
    """True once :func:`register` ran (the registrations happen as verl's modules load)."""
    return _STATE["registered"]


def _register_algorithms() -> None:
    """Policy losses and the advantage estimator into verl's registries (idempotent)."""
    try:
        from verl.trainer.ppo import core_algos

        from .advantages import ESTIMATOR_NAME, compute_dualstream_advantage
        from .losses import (
            DUALSTREAM_LOSS_NAME,
            LOSS_NAME,
            compute_policy_loss_dualstream,
            compute_policy_loss_tsparse,
        )

        core_algos.register_policy_loss(LOSS_NAME)(compute_policy_loss_tsparse)
        core_algos.register_policy_loss(DUALSTREAM_LOSS_NAME)(compute_policy_loss_dualstream)
        if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is not compute_dualstream_advantage:
            core_algos.register_adv_est(ESTIMATOR_NAME)(compute_dualstream_advantage)
    except Exception as exc:  # never break verl's own import: say why, loudly
        logger.warning("tsparse verl plugin: losses / estimator not registered: %s: %s", type(exc).__name__, exc)


def register() -> None:
    """Arranges every registration (idempotent). Each happens when the verl module it goes
    into is imported - ``core_algos`` (losses, estimator), the FSDP engine (the dispatcher), the
    v1 trainer (the trainer mode) - so ``import verl`` itself stays as fast as without the
    plugin and a process that never builds an engine never imports it."""
    _after_import(_CORE_ALGOS, _register_algorithms)
    _after_import(_ENGINE_MODULE, _install_dispatcher)
    _after_import(_TRAINER_MODULE, _register_trainer_mode)
    _STATE["registered"] = True


# --------------------------------------------------------------------------------------
_ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"
_TRAINER_MODULE = "verl.trainer.ppo.v1"


def _install_dispatcher() -> None:
    try:
        from .patches import install_dispatcher

        install_dispatcher()
    except Exception as exc:
        logger.warning("tsparse verl plugin: impl_backend=tsparse dispatcher not installed: %s: %s",
                       type(exc).__name__, exc)


def _register_trainer_mode() -> None:
    """Registers ``trainer.v1.trainer_mode=tsparse_dualstream`` (:mod:`.trainer`). verl's v1
    trainer needs TransferQueue; without it there is nothing to register into."""
    try:
        from . import trainer  # noqa: F401  (register_trainer runs at import)
    except ImportError as exc:
        logger.warning("tsparse: trainer mode 'tsparse_dualstream' not registered: %s", exc)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a module finishes executing (then removes itself), so the
    plugin never imports verl's heavy modules itself."""

    def __init__(self, fullname: str, callback):
        self.fullname, self.callback = fullname, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.fullname:
            return None
        sys.meta_path.remove(self)  # find the real spec once, without us
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_callback(module):
            exec_module(module)
            self.callback()

        spec.loader.exec_module = exec_then_callback
        return spec


def _after_import(fullname: str, callback) -> None:
    if fullname in sys.modules:
        callback()
        return
    if not any(isinstance(h, _AfterImport) and h.fullname == fullname for h in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(fullname, callback))


register()
