"""The trainer's optimizer: AdamW, optionally on fp32 master weights.

A bf16 model updated in bf16 loses every update smaller than ~1/256 of a weight: at the
learning rates RL fine-tuning uses (1e-6) nothing would change. ``master_weights`` keeps an
fp32 copy of each trainable parameter (and AdamW's fp32 states) next to it - on the model's
device (``"device"``) or on the CPU (``"cpu"``, for a 7B model whose fp32 copy and states,
~100 GB for 8.3 B parameters, do not fit one GPU; the gradients then stream to the host one
parameter at a time through one pinned buffer) - steps it with the gradients upcast to fp32, and
writes the result back into the model's parameters. ``"none"`` steps the parameters directly (the
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
        self._staging: Optional[Tensor] = None  # master_weights="cpu": one pinned fp32 gradient

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
            m.grad = None if p.grad is None else p.grad.detach().to(m.device, torch.float32)
        return self.master

    def _clip_and_step_cpu_master(self, max_grad_norm: float) -> float:
        """``master_weights="cpu"``: the global norm is taken where the gradients are (one
        device->host sync for the scalar), then each parameter's gradient goes to the host
        through ONE reused pinned fp32 buffer and AdamW steps that parameter alone. Host memory
        is the fp32 master copy and AdamW's two states (12 B per parameter) plus the largest
        parameter once, not a second fp32 copy of every gradient (another 4 B per parameter:
        ~33 GB for 8.3 B parameters). Same math as :meth:`clip_and_step`'s general path:
        AdamW's update of one parameter does not depend on the others."""
        pairs = [(p, m) for p, m in zip(self.params, self.master) if p.grad is not None]
        if not pairs:
            return 0.0
        norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p, _ in pairs]
        norm_f = float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))
        if not math.isfinite(norm_f):
            self.zero_grad()
            return norm_f
        # torch.nn.utils.clip_grad_norm_'s coefficient
        coef = min(max_grad_norm / (norm_f + 1e-6), 1.0) if max_grad_norm > 0 else 1.0
        numel = max(p.numel() for p, _ in pairs)
        if self._staging is None or self._staging.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32)
            self._staging = buf.pin_memory() if any(p.is_cuda for p in self.params) else buf
        for m in self.master:
            m.grad = None
        with torch.no_grad():
            for p, m in pairs:
                g = self._staging[: p.numel()].view_as(m)
                g.copy_(p.grad.detach(), non_blocking=p.grad.is_cuda)
                if p.grad.is_cuda:
                    torch.cuda.current_stream(p.grad.device).synchronize()  # g is read next, on the host
                if coef != 1.0:
                    g.mul_(coef)
                m.grad = g
                self.inner.step()
                m.grad = None
                # from pinned memory, asynchronous; m is not written again in this step
                p.copy_(m.to(p.device, non_blocking=True))
        return norm_f

    def clip_and_step(self, max_grad_norm: float) -> float:
        """Clips the gradients' global L2 norm to ``max_grad_norm`` (0: no clipping), steps,
        and returns the norm before clipping (inf/nan norms skip the step, as verl does)."""
        if self.master_weights == "cpu":
            return self._clip_and_step_cpu_master(max_grad_norm)
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
