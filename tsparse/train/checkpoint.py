"""Checkpoints that resume: model, processor, optimizer, progress and RNG states.

Layout under ``<output_dir>/checkpoints/``::

    <stage>-step<NNNNNN>/        # every `checkpoint.every` steps of a stage
    <stage>-final/               # at the end of each stage (stage 2 starts from stage 1's)
        model/                   # save_pretrained: loadable with --model (Qwen2.5-VL + processor)
        trainer_state.pt         # progress, optimizer, RNG states, evaluations so far
        checkpoint.json          # the run it belongs to, its global step, every file's size
    latest                       # the name of the newest checkpoint

A checkpoint is written to a temporary folder and renamed into place, so an interrupted save
never leaves a half checkpoint behind ``latest``. A checkpoint damaged afterwards (a truncated
``trainer_state.pt`` or ``model.safetensors``, a copy that stopped half-way) or a ``latest``
naming a folder that is gone is detected by :func:`checkpoint_problem` (sizes against
``checkpoint.json``, the zip directory of ``trainer_state.pt``, the safetensors headers), and
``--resume`` (:func:`load_latest`) falls back to the newest complete checkpoint with a
:class:`CheckpointWarning` naming what it skipped and why.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
import time
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

__all__ = [
    "checkpoint_name",
    "save_checkpoint",
    "load_trainer_state",
    "find_latest",
    "load_latest",
    "checkpoint_problem",
    "CheckpointWarning",
    "rng_state",
    "set_rng_state",
    "prune_checkpoints",
]

STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checkpoint.json"
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
    files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
    manifest = {"name": name, "run": state.get("run"), "global_step": state.get("global_step"),
                "stage": state.get("stage"), "step": state.get("step"), "saved": time.time(), "files": files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name + "\n", encoding="utf-8")
    latest_tmp.replace(root / "latest")
    return final


class CheckpointWarning(UserWarning):
    """A checkpoint skipped by ``--resume`` (damaged, incomplete, or ``latest`` names a missing folder)."""


def _safetensors_problem(f: Path) -> Optional[str]:
    """Why a ``.safetensors`` file is not whole (its header and the data it describes against the
    file size), or ``None``."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f.name} is truncated ({size} bytes)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{f.name} is truncated (its header alone needs {n + 8} bytes, the file has {size})"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        return f"{f.name} has an unreadable header ({type(e).__name__})"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{f.name} is truncated ({size} bytes, its header describes {8 + n + end})"
    return None


def checkpoint_problem(path: Union[str, os.PathLike]) -> Optional[str]:
    """Why the folder is not a complete, readable checkpoint (one short phrase naming the file),
    or ``None``. Reads headers and sizes only, never the tensors: every file against the sizes
    ``checkpoint.json`` recorded at save time, ``trainer_state.pt``'s zip directory (at its end,
    so a truncated file has none), every ``model/*.safetensors`` header against the file size."""
    path = Path(path)
    if not path.is_dir():
        return "the folder does not exist"
    state = path / STATE_FILE
    if not state.is_file():
        return f"no {STATE_FILE}"
    if not (path / "model").is_dir():
        return "no model/ folder"
    man = path / MANIFEST_FILE
    if man.is_file():
        try:
            files = json.loads(man.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST_FILE} is damaged"
        for rel, size in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return f"{rel} has {f.stat().st_size} bytes, {size} were written"
    try:
        with zipfile.ZipFile(state) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return f"{STATE_FILE} is truncated or damaged (no zip directory)"
    for f in sorted((path / "model").glob("*.safetensors")):
        problem = _safetensors_problem(f)
        if problem:
            return f"model/{problem}"
    if not (path / "model" / "config.json").is_file():
        return "no model/config.json"
    return None


def load_trainer_state(path: Union[str, os.PathLike]) -> dict:
    """The ``trainer_state.pt`` of a checkpoint folder: ``{"state", "rng", "optimizer"}``.
    ``FileNotFoundError`` naming the folder when it is not a checkpoint, ``ValueError`` naming
    the damaged file when it is incomplete (:func:`checkpoint_problem`)."""
    path = Path(path)
    f = path / STATE_FILE
    if not f.is_file() or not (path / "model").is_dir():
        raise FileNotFoundError(f"{str(path)!r} is not a tsparse.train checkpoint (no {STATE_FILE} and model/)")
    problem = checkpoint_problem(path)
    if problem:
        raise ValueError(f"checkpoint {str(path)!r} is incomplete: {problem}")
    try:
        return torch.load(f, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise ValueError(f"checkpoint {str(path)!r}: {STATE_FILE} cannot be read ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from None


_ORDER = ("warmup", "localization", "sparse")


def _recency(d: Path) -> tuple:
    """Sort key, newest last: the run's start time and the global step from ``checkpoint.json``
    (checkpoints without one - written before it existed - come first), then the stage, the
    step, final after the steps."""
    run, gstep = "", -1
    try:
        man = json.loads((d / MANIFEST_FILE).read_text(encoding="utf-8"))
        run, gstep = str(man.get("run") or ""), int(man.get("global_step") or 0)
    except (OSError, ValueError, TypeError):
        pass
    m = _STEP_DIR.match(d.name)
    stage = m["stage"] if m else d.name.rsplit("-", 1)[0]
    step = int(m["step"]) if m else 1 << 62
    return (run, gstep, _ORDER.index(stage) if stage in _ORDER else -1, step)


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
            and (_STEP_DIR.match(d.name) or d.name.endswith("-final"))]


def find_latest(output_dir: Union[str, os.PathLike]) -> Optional[Path]:
    """The checkpoint ``latest`` points at under ``<output_dir>/checkpoints`` when it is
    complete, else the newest complete one (see :func:`load_latest`), or ``None``. Silent: use
    :func:`load_latest` to resume (it warns about what it skipped)."""
    found = _latest_candidates(Path(output_dir) / "checkpoints")
    return next((d for d, problem in found if problem is None), None)


def _latest_candidates(root: Path) -> list[tuple[Path, Optional[str]]]:
    """``(folder, problem or None)``: what ``latest`` names first, then every other checkpoint
    folder newest first."""
    latest = root / "latest"
    first = None
    out: list = []
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        first = root / name
        if not first.is_dir():
            out.append((first, f"`latest` names {name!r}, which does not exist"))
            first = None
    rest = sorted((d for d in _checkpoint_dirs(root) if d != first), key=_recency, reverse=True)
    for d in ([first] if first is not None else []) + rest:
        out.append((d, checkpoint_problem(d)))
    return out


def load_latest(output_dir: Union[str, os.PathLike]) -> Optional[tuple[Path, dict]]:
    """``(checkpoint folder, trainer state)`` to resume ``output_dir`` from: the checkpoint
    ``latest`` names, or - when it is missing, incomplete or unreadable - the newest complete
    one (by the run and global step recorded in ``checkpoint.json``), with a
    :class:`CheckpointWarning` naming each checkpoint skipped and why. ``None`` when there is
    no usable checkpoint (the warning then lists what was tried)."""
    root = Path(output_dir) / "checkpoints"
    skipped = []
    for d, problem in _latest_candidates(root):
        if problem is None:
            try:
                payload = load_trainer_state(d)
            except (ValueError, OSError) as e:
                problem = str(e)
            else:
                if skipped:
                    warnings.warn(CheckpointWarning(
                        f"--resume: skipped {'; '.join(skipped)}; resuming from {d.name}"), stacklevel=2)
                return d, payload
        skipped.append(f"{d.name} ({problem})" if not problem.startswith("`latest`") else problem)
    if skipped:
        warnings.warn(CheckpointWarning(f"--resume: no complete checkpoint under {root}: {'; '.join(skipped)}"),
                      stacklevel=2)
    return None


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
