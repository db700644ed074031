"""The trainer's optimizer: AdamW, optionally on fp32 master weights.

A bf16 model updated in bf16 loses every update smaller than ~1/256 of a weight: at the
learning rates RL fine-tuning uses (1e-6) nothing would change. ``master_weights`` keeps an
fp32 copy of each trainable parameter (and AdamW's fp32 states) next to it - on the model's
device (``"device"``) or on the CPU (``"cpu"``, for a 7B model whose fp32 copy and states,
~84 GB, do not fit one GPU) - steps it with the gradients upcast to fp32, and writes the
result back into the model's parameters. ``"none"`` steps the parameters directly (the
right choice for fp32 models, e.g. the tiny CPU default).

:class:`TrainerOptimizer` also owns gradient clipping (on the fp32 gradients when there is a
master copy) and the learning rate (set each step by the trainer's schedule).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["TrainerOptimizer", "lr_at"]


def lr_at(step: int, base_lr: float, warmup_steps: int = 0, *, total_steps: int = 0,
          schedule: str = "constant", min_lr_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (from 0) of a stage: a linear warm-up
    over ``warmup_steps``, then ``constant`` or ``cosine`` decay to ``min_lr_ratio * base_lr``
    at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"`schedule` must be constant or cosine, got {schedule!r}")
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class TrainerOptimizer:
    """AdamW over ``params`` (those with ``requires_grad``).

    Args:
        params: the model's parameters.
        lr, betas, eps, weight_decay: AdamW's.
        master_weights: ``"none"``, ``"device"`` or ``"cpu"`` (see the module docstring).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        master_weights: str = "none",
    ):
        if master_weights not in ("none", "device", "cpu"):
            raise ValueError(f"`master_weights` must be none, device or cpu, got {master_weights!r}")
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameter")
        self.master_weights = master_weights
        kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        if master_weights == "none":
            self.master = None
            self.inner = torch.optim.AdamW(self.params, **kw)
        else:
            self.master = []
            for p in self.params:
                dev = torch.device("cpu") if master_weights == "cpu" else p.device
                m = p.detach().to(dev, torch.float32, copy=True)
                if dev.type == "cpu" and p.device.type == "cuda":
                    m = m.pin_memory()
                self.master.append(torch.nn.Parameter(m))
            self.inner = torch.optim.AdamW(self.master, **kw)

    @property
    def param_groups(self):
        return self.inner.param_groups

    def set_lr(self, lr: float) -> None:
        for g in self.inner.param_groups:
            g["lr"] = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.master is not None:
            for m in self.master:
                m.grad = None

    def _stepped(self) -> list[Tensor]:
        """The tensors the optimizer steps, with their (fp32 when mastered) gradients."""
        if self.master is None:
            return self.params
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.detach().to(m.device, torch.float32, non_blocking=True)
        return self.master

    def clip_and_step(self, max_grad_norm: float) -> float:
        """Clips the gradients' global L2 norm to ``max_grad_norm`` (0: no clipping), steps,
        and returns the norm before clipping (inf/nan norms skip the step, as verl does)."""
        tensors = self._stepped()
        grads = [t for t in tensors if t.grad is not None]
        if not grads:
            return 0.0
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(grads, max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.grad.float()) for g in grads]))
        norm_f = float(norm)
        if not math.isfinite(norm_f):
            self.zero_grad()
            return norm_f
        self.inner.step()
        if self.master is not None:
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m.to(p.device, non_blocking=True))
        return norm_f

    # -- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        out = {"master_weights": self.master_weights, "inner": self.inner.state_dict()}
        if self.master is not None:
            out["master"] = [m.detach().cpu() for m in self.master]
        return out

    def load_state_dict(self, state: dict) -> None:
        if state.get("master_weights") != self.master_weights:
            raise ValueError(f"optimizer state was saved with master_weights={state.get('master_weights')!r}, "
                             f"this run uses {self.master_weights!r}")
        if self.master is not None:
            saved = state["master"]
            if len(saved) != len(self.master):
                raise ValueError(f"optimizer state has {len(saved)} master tensors for {len(self.master)} parameters")
            with torch.no_grad():
                for m, s in zip(self.master, saved):
                    m.copy_(s)
        self.inner.load_state_dict(state["inner"])

    def master_parameters(self) -> Optional[list[Tensor]]:
        """The fp32 master copies (``None`` without master weights)."""
        return self.master
