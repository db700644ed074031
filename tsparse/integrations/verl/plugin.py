"""The ``verl.plugins`` entry point: loaded by ``import verl`` in every verl process (driver,
TaskRunner, Ray workers) unless ``VERL_USE_EXTERNAL_PLUGINS=none`` (or a list without
``tsparse``).

:func:`register` adds, through verl's own registries:

* policy losses ``tsparse`` and ``tsparse_dualstream`` (``register_policy_loss``);
* the advantage estimator ``tsparse_dualstream`` (``register_adv_est``);
* the dispatcher of the ``impl_backend=tsparse`` flag on ``FSDPEngine._build_module``
  (:func:`~.patches.install_dispatcher`; verl has no hook for a third-party fused-kernel
  backend). It returns verl's model untouched unless the engine's model config carries the
  flag, so registration alone changes no verl behaviour. It is installed when verl's FSDP
  engine module is first imported (an import hook), so processes that never build an engine
  (driver, rollout, reward workers) do not pay for importing it.

verl's loader calls ``entry_point.load()`` - it imports this module and does not call
anything - so importing this module registers (:func:`register` at the bottom).

The reward function needs no registration: verl loads it by path,
``reward.custom_reward_function.path=pkg://tsparse.dualstream.reward_fn`` (or the file
``tsparse/dualstream/reward_fn.py``), ``name=compute_score``: :data:`REWARD_FUNCTION`.

verl swallows a failing plugin (it logs at DEBUG and carries on); :func:`register` therefore
logs a WARNING with the reason before re-raising, so a broken install is visible.
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


def registered() -> bool:
    return _STATE["registered"]


def register() -> None:
    """Registers tsparse's losses and estimator with verl and installs the flag's dispatcher.
    Idempotent."""
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
        _install_dispatcher_when_engine_loads()
        _STATE["registered"] = True
    except Exception as exc:
        logger.warning("tsparse verl plugin failed to register: %s: %s", type(exc).__name__, exc)
        raise


# --------------------------------------------------------------------------------------
_ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"


class _EngineImportHook(importlib.abc.MetaPathFinder):
    """Installs the dispatcher right after verl's FSDP engine module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _ENGINE_MODULE:
            return None
        sys.meta_path.remove(self)  # find the real spec once, without us
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_install(module):
            exec_module(module)
            _remove_hook()
            from .patches import install_dispatcher

            install_dispatcher()

        loader.exec_module = exec_and_install
        return spec


_HOOK: list = []


def _remove_hook() -> None:
    while _HOOK:
        hook = _HOOK.pop()
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)


def _install_dispatcher_when_engine_loads() -> None:
    if _ENGINE_MODULE in sys.modules:
        from .patches import install_dispatcher

        install_dispatcher()
        return
    if not _HOOK:
        hook = _EngineImportHook()
        _HOOK.append(hook)
        sys.meta_path.insert(0, hook)


register()
