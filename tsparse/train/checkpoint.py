"""Checkpoints that resume: model, processor, optimizer, progress and RNG states.

Layout under ``<output_dir>/checkpoints/``::

    <stage>-step<NNNNNN>/        # every `checkpoint.every` steps of a stage
    <stage>-final/               # at the end of each stage (stage 2 starts from stage 1's)
        model/                   # save_pretrained: loadable with --model (Qwen2.5-VL + processor)
        trainer_state.pt         # progress, optimizer, RNG states, evaluations so far
    latest                       # the name of the newest checkpoint

A checkpoint is written to a temporary folder and renamed into place, so an interrupted save
never leaves a half checkpoint behind ``latest``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "checkpoint_name",
    "save_checkpoint",
    "load_trainer_state",
    "find_latest",
    "rng_state",
    "set_rng_state",
    "prune_checkpoints",
]

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^(?P<stage>[a-z]+)-step(?P<step>\d+)$")


def checkpoint_name(stage: str, step: Optional[int]) -> str:
    """``<stage>-step<NNNNNN>``, or ``<stage>-final`` when ``step`` is ``None``."""
    return f"{stage}-final" if step is None else f"{stage}-step{step:06d}"


def rng_state() -> dict:
    """Every RNG the trainer draws from: Python, NumPy, torch CPU and (when used) CUDA."""
    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: Union[str, os.PathLike],
    name: str,
    *,
    model,
    processor,
    state: dict,
    optimizer=None,
    method=None,
) -> Path:
    """Writes checkpoint ``name`` under ``root`` (``<output_dir>/checkpoints``) and points
    ``latest`` at it. ``state``: the trainer's progress (plain data); ``optimizer``: a
    :class:`~tsparse.train.optim.TrainerOptimizer` or ``None``; ``method``: the
    :class:`~tsparse.dualstream.config.MethodConfig` trained with, saved next to the weights as
    ``model/tsparse_method.yaml`` (inference and evaluation pick it up). Returns the folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the trainer's own progress bar is the one to read
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        processor.save_pretrained(tmp / "model")
        if method is not None:
            from ..dualstream.config import save_method_config

            save_method_config(method, tmp / "model")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    payload = {"state": state, "rng": rng_state(),
               "optimizer": optimizer.state_dict() if optimizer is not None else None}
    torch.save(payload, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n", encoding="utf-8")
    latest_tmp.replace(root / "latest")
    return final


def load_trainer_state(path: Union[str, os.PathLike]) -> dict:
    """The ``trainer_state.pt`` of a checkpoint folder: ``{"state", "rng", "optimizer"}``.
    ``FileNotFoundError`` naming the folder when it is not a checkpoint."""
    path = Path(path)
    f = path / STATE_FILE
    if not f.is_file() or not (path / "model").is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a tsparse.train checkpoint (no {STATE_FILE} and model/)")
    return torch.load(f, map_location="cpu", weights_only=False)


def find_latest(output_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The checkpoint ``latest`` points at under ``<output_dir>/checkpoints``, or ``None``."""
    root = Path(output_dir) / "checkpoints"
    latest = root / "latest"
    if not latest.is_file():
        return None
    cand = root / latest.read_text(encoding="utf-8").strip()
    return cand if (cand / STATE_FILE).is_file() else None


def prune_checkpoints(root: Union[str, os.PathLike], stage: str, keep_last: int) -> list[Path]:
    """Deletes all but the newest ``keep_last`` step checkpoints of ``stage`` (stage-end
    checkpoints and the one ``latest`` names are kept). Returns what was deleted."""
    root = Path(root)
    if not root.is_dir():
        return []
    latest = (root / "latest").read_text(encoding="utf-8").strip() if (root / "latest").is_file() else None
    steps = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if d.is_dir() and m and m["stage"] == stage:
            steps.append((int(m["step"]), d))
    steps.sort()
    removed = []
    for _, d in steps[: max(len(steps) - keep_last, 0)]:
        if d.name != latest:
            shutil.rmtree(d)
            removed.append(d)
    return removed
