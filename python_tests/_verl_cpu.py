"""Test harness: verl 0.9.1's FSDP engine on the CPU (gloo, world size 1) around the tiny random
Qwen2.5-VL, and verl-layout batches built from the synthetic scans.

What verl needs to run here, and how this harness provides it (test-only; nothing of it is
part of tsparse):

* a device platform: verl's only platforms are CUDA / NPU / ROCm and it falls back to CUDA
  without a GPU. :class:`CpuPlatform` is a ``PlatformBase`` answering ``cpu``/``gloo``,
  installed with verl's own ``set_platform`` (and restored afterwards);
* varlen attention: with ``use_remove_padding`` verl replaces Qwen2.5-VL's attention with
  ``qwen2_vl_attn_forward``, which calls flash-attn's ``flash_attn_varlen_func`` (absent on
  CPU). :func:`sdpa_varlen_attention` replaces verl's ``_custom_flash_attention_forward``
  with PyTorch SDPA per packed segment (segments start at text position 0, as verl derives
  ``cu_seqlens``); both the flag-on and flag-off engines run with it.
"""

from __future__ import annotations

import contextlib
import socket
import types
from typing import Optional

import torch

TORCH_CPU = types.SimpleNamespace(
    mem_get_info=lambda *a, **k: (0, 0),
    memory_allocated=lambda *a, **k: 0,
    memory_reserved=lambda *a, **k: 0,
    max_memory_allocated=lambda *a, **k: 0,
    max_memory_reserved=lambda *a, **k: 0,
    reset_peak_memory_stats=lambda *a, **k: None,
    empty_cache=lambda: None,
    synchronize=lambda *a, **k: None,
    is_available=lambda: True,
    current_device=lambda: "cpu",
    device_count=lambda: 1,
    set_device=lambda *a, **k: None,
    manual_seed=torch.manual_seed,
    manual_seed_all=torch.manual_seed,
)


def _platform_cls():
    import contextlib as _cl

    from verl.plugin.platform.platform_base import PlatformBase

    class CpuPlatform(PlatformBase):
        """A verl platform for the CPU (tests only)."""

        device_name = "cpu"
        vendor_name = "cpu"
        device_module = TORCH_CPU

        def is_available(self):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def communication_backend_name(self):
            return "gloo"

        def empty_cache(self):
            pass

        def cudart(self):
            return None

        def get_device_capability(self, device_index=0):
            return (None, None)

        def is_ipc_supported(self):
            return False

        def nvtx_range(self, msg):
            return _cl.nullcontext()

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_noset_envvars(self):
            return []

        def ray_resource_name(self):
            return "CPU"

        def set_allocator_settings(self, settings):
            pass

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

    return CpuPlatform


def sdpa_varlen_attention(query_states, key_states, value_states, attention_mask, query_length, is_causal=True,
                          position_ids=None, **kwargs):
    """CPU stand-in for verl's ``_custom_flash_attention_forward`` (packed ``[1, nnz]`` input,
    heads already repeated): causal SDPA per segment, a segment starting where the text
    position is 0 (verl's ``prepare_fa2_from_position_ids`` rule)."""
    import torch.nn.functional as F

    b, t, _, _ = query_states.shape
    if b == 1 and position_ids is not None:
        pos = position_ids.reshape(-1)
        starts = torch.nonzero(pos == 0).reshape(-1).tolist()
        if not starts or starts[0] != 0:
            starts = [0] + starts
    else:  # padded batch without a mask: one segment per row
        starts = [0]
    bounds = starts + [t]
    outs = []
    for row in range(b):
        segs = []
        for s, e in zip(bounds[:-1], bounds[1:]):
            q = query_states[row, s:e].transpose(0, 1)
            k = key_states[row, s:e].transpose(0, 1)
            v = value_states[row, s:e].transpose(0, 1)
            segs.append(F.scaled_dot_product_attention(q, k, v, is_causal=is_causal).transpose(0, 1))
        outs.append(torch.cat(segs, 0))
    return torch.stack(outs, 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _transformers_targets():
    """What verl's ``apply_monkey_patch`` replaces in transformers for Qwen2-VL-family models
    (class-level, process-wide): restored when the harness exits so later test modules get
    transformers' own model."""
    import importlib

    from tsparse.integrations.verl.rollout import _GEN_TARGETS

    out = []
    for module, cls, name in _GEN_TARGETS:
        mod = importlib.import_module(module)
        owner = getattr(mod, cls) if cls else mod
        out.append((owner, name, owner.__dict__.get(name, _MISSING) if cls else getattr(owner, name, _MISSING)))
    return out


@contextlib.contextmanager
def verl_on_cpu():
    """A gloo process group (world size 1), verl's CPU platform and the CPU attention, for the
    duration of the block; everything is restored afterwards, including the transformers
    classes verl patches while building engines."""
    import torch.distributed as dist
    import verl.models.transformers.qwen2_vl as vq
    import verl.plugin.platform.platform_manager as pm

    hf_saved = _transformers_targets()

    own_pg = not dist.is_initialized()
    if own_pg:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    old_platform = pm._current_platform
    pm.set_platform(_platform_cls()())
    saved = {k: vq.__dict__.get(k, _MISSING) for k in ("_custom_flash_attention_forward", "_flash_use_top_left_mask")}
    vq._custom_flash_attention_forward = sdpa_varlen_attention
    vq._flash_use_top_left_mask = False
    try:
        yield
    finally:
        for owner, name, value in hf_saved:
            if value is _MISSING:
                if name in owner.__dict__:
                    delattr(owner, name)
            else:
                setattr(owner, name, value)
        for k, v in saved.items():
            if v is _MISSING:
                vq.__dict__.pop(k, None)
            else:
                setattr(vq, k, v)
        pm._current_platform = old_platform
        if own_pg:
            dist.destroy_process_group()


_MISSING = object()


def save_tiny_checkpoint(path) -> str:
    """The tiny model + processor saved as a local checkpoint verl can load (``model.path``)."""
    from tsparse.dualstream.models import build_tiny

    model, proc = build_tiny()
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


def build_engine(ckpt: str, *, fused_kernel_options: Optional[dict] = None, use_remove_padding: bool = True,
                 micro_batch_size: int = 4):
    """verl's ``FSDPEngineWithLMHead`` (FSDP2, fp32, no torch.compile) on ``ckpt``; the flag is
    on when ``fused_kernel_options`` is given."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    mc = HFModelConfig(
        path=ckpt,
        override_config={"attn_implementation": "sdpa"},
        use_remove_padding=use_remove_padding,
        enable_gradient_checkpointing=False,
        use_fused_kernels=fused_kernel_options is not None,
        fused_kernel_options=dict(fused_kernel_options or {}),
    )
    ec = FSDPEngineConfig(
        strategy="fsdp2",
        use_torch_compile=False,
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=micro_batch_size,
        infer_micro_batch_size_per_gpu=micro_batch_size,
        use_fused_kernels=fused_kernel_options is not None,
    )
    engine = FSDPEngineWithLMHead(
        model_config=mc, engine_config=ec, optimizer_config=FSDPOptimizerConfig(lr=1e-3), checkpoint_config=CheckpointConfig()
    )
    engine.initialize()
    return engine


def actor_config(loss_mode: str = "vanilla", **kw):
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    base = dict(strategy="fsdp2", rollout_n=1, ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                use_torch_compile=False, policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    base.update(kw)
    return ActorConfig(**base)


def engine_batch(td, *, fused: bool, micro_batch_size: int, calculate_entropy: bool = True):
    """A copy of ``td`` with the non-tensor fields verl's workers add before the engine."""
    from verl.utils import tensordict_utils as tu

    td = td.clone()
    tu.assign_non_tensor(
        td, temperature=1.0, use_remove_padding=True, use_fused_kernels=fused, calculate_entropy=calculate_entropy,
        use_dynamic_bsz=False, micro_batch_size_per_gpu=micro_batch_size, global_batch_size=len(td),
    )
    return td


def nested(rows):
    return torch.nested.as_nested_tensor(list(rows), layout=torch.jagged)


def grads(engine) -> dict:
    """Full (unsharded) parameter gradients of the engine's module, by name."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in engine.module.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        out[name] = g.detach().clone()
    return out
