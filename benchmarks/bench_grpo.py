"""Benchmarks of the fused GRPO ops against the PyTorch path (and Liger-Kernel where installed).

Sizes: "full" (the default on a GPU) is the issue's reference shape, T = 16,384 tokens,
V = 152,064 (Qwen2.5-VL-7B's vocabulary), H = 3,584, bf16: 4.98 GB of logits. "cpu" (the default
on the CPU) uses T = 256 for the logits ops and a small LM head (T = 512, H = 256, V = 32,768,
fp32: the CPU has no fast bf16 matmul) for the fused linear path, so a run takes seconds.

Baselines (measured in the same run):
  * "torch": what eager GRPO code does - ``logits.float()``, ``log_softmax``, ``gather``, then
    verl 0.9.1's loss in torch ops (``tsparse.reference.grpo_loss_ref`` in fp32);
  * "liger": Liger-Kernel's Triton cross entropy / ``triton_grpo_loss`` when ``liger_kernel``
    imports (a row says "not installed" otherwise).

Byte model (what the kernels must move; GB/s and %copy come from it), bf16 logits, E = T * V:
  logprobs fwd        read 2 B/elem                             -> 2 E bytes
  logprobs fwd + bwd  fwd read 2 B + bwd read 2 B + write 2 B   -> 6 E bytes
  grpo_loss fwd + bwd the same 6 E bytes ([T]-sized traffic is negligible)
  grpo_loss single_read  read 2 B + write 2 B (one pass; the upstream scale of 1 costs no pass)
                      -> 4 E bytes; its ratio is against grpo_loss two_pass timed in the same run
The "eff TB/s" note is the issue's effective rate against the single-read floor (4 E bytes: read
the logits once, write the gradient once), the figure the H100 target (>= 2.5 TB/s) is stated in.
FLOP model of the fused linear path: 6 * T * H * V (forward matmul, two gradient matmuls).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tsparse import _C
from tsparse import reference as ref
from tsparse.ops import fused_linear_grpo_loss, grpo_loss, logprobs

from .common import Row, Timer

SIZES = {
    "full": dict(t=16384, v=152064, lin_t=16384, lin_h=3584, lin_v=152064, lin_dtype=torch.bfloat16, chunk=None),
    "cpu": dict(t=256, v=152064, lin_t=512, lin_h=256, lin_v=32768, lin_dtype=torch.float32, chunk=128),
    "tiny": dict(t=64, v=4096, lin_t=64, lin_h=32, lin_v=1024, lin_dtype=torch.float32, chunk=16),
}


def make_inputs(device, t: int, v: int, dtype=torch.bfloat16, seed: int = 0) -> dict:
    """Random logits (generated on the device, in row blocks: no fp32 [T, V] buffer) and a GRPO
    batch around them: old / reference log-probs near the current ones, advantages of both
    signs, 90% of tokens in the loss, a localization stream (first third) and a reasoning one."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.empty(t, v, device=device, dtype=dtype)
    for r0 in range(0, t, 1024):
        r1 = min(t, r0 + 1024)
        logits[r0:r1] = torch.randn(r1 - r0, v, device=device, generator=g) * 2
    targets = torch.randint(0, v, (t,), device=device, generator=g)
    logp, _ = logprobs(logits, targets)
    old = logp + 0.2 * torch.randn(t, device=device, generator=g)
    refl = logp + 0.2 * torch.randn(t, device=device, generator=g)
    adv = torch.randn(t, device=device, generator=g)
    mask = torch.rand(t, device=device, generator=g) < 0.9
    stream = (torch.arange(t, device=device) >= t // 3).to(torch.int64)
    return dict(logits=logits, targets=targets, old=old, ref=refl, adv=adv, mask=mask, stream=stream)


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy  # noqa: F401
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: F401
    except Exception:  # not installed (the CPU machine) or no Triton backend
        return None
    return dict(ce=liger_cross_entropy, grpo=triton_grpo_loss)


def _single_read_plan(v: int, device: torch.device) -> str:
    """Which path grpo_loss(impl="single_read") takes for bf16 rows of V logits here."""
    if device.type != "cuda":
        return "CPU: two-pass math per row"
    lay = _C.grpo_row_layout(v, 2, 0, 512, 0)
    if not lay["cluster_ok"]:
        return "two-pass fallback (row too wide)"
    return f"cluster {lay['ctas']} CTA x {lay['smem_bytes'] / 1024:.1f} KB, {lay['threads']} thr"


def _eff(elems: int, ms: float) -> str:
    """Effective rate against the single-read floor (4 bytes per bf16 element)."""
    rate = 4 * elems / (ms * 1e-3)
    return f"{rate / 1e12:.2f} TB/s" if rate >= 1e11 else f"{rate / 1e9:.2f} GB/s"


def _first_scalar(out) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out if out.dim() == 0 else out.float().sum()


def _oom_safe(fn: Callable[[], dict]) -> Optional[dict]:
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def run(device: torch.device, size: str, timer: Timer, log: Callable[[str], None] = print) -> list[Row]:
    cfg = SIZES[size]
    device = torch.device(device)
    rows: list[Row] = []
    t, v = cfg["t"], cfg["v"]
    d = make_inputs(device, t, v)
    e = t * v
    shape = f"T={t} V={v}"
    dt = "bfloat16"
    mb = lambda b: None if b is None else b / 2**20  # noqa: E731
    slow = Timer(device, warmup=1, iters=max(3, timer.iters // 3))

    # ---- logprobs forward ------------------------------------------------------------
    x = d["logits"]
    t_ours = timer(lambda: logprobs(x, d["targets"]))
    t_ent = timer(lambda: logprobs(x, d["targets"], return_entropy=True))
    t_torch = _oom_safe(lambda: slow(lambda: ref.logprobs_ref(x, d["targets"], dtype=torch.float32)))
    t_torch_ent = _oom_safe(lambda: slow(lambda: ref.logprobs_ref(x, d["targets"], return_entropy=True,
                                                                   dtype=torch.float32)))
    rows.append(Row("logprobs fwd", shape, dt, t_ours["median_ms"], "torch fp32 log_softmax+gather",
                    t_torch and t_torch["median_ms"], gbytes=2 * e / 1e9,
                    peak_mb=mb(timer.peak_bytes(lambda: logprobs(x, d["targets"])))))
    rows.append(Row("logprobs fwd +entropy", shape, dt, t_ent["median_ms"], "torch fp32 (+ entropy)",
                    t_torch_ent and t_torch_ent["median_ms"], gbytes=2 * e / 1e9))
    log(f"  logprobs fwd: {t_ours['median_ms']:.3f} ms (+entropy {t_ent['median_ms']:.3f} ms)")

    # ---- logprobs forward + backward (in-place: no [T, V] allocation in backward) ----------
    base = d["logits"].detach().requires_grad_()
    state = {}

    def fresh_nonleaf():
        state["x"] = base.detach().clone().requires_grad_()  # untimed: a graph-owned copy to overwrite
        state["y"] = state["x"] * 1

    def ours_fb(entropy: bool):
        def fn():
            lp, en = logprobs(state["y"], d["targets"], return_entropy=entropy, inplace_backward=True)
            loss = lp.sum() + (en.sum() if entropy else 0)
            torch.autograd.grad(loss, state["y"])
        return fn

    def torch_fb(entropy: bool):
        def fn():
            lp, en = ref.logprobs_ref(state["y"], d["targets"], return_entropy=entropy, dtype=torch.float32)
            loss = lp.sum() + (en.sum() if entropy else 0)
            torch.autograd.grad(loss, state["y"])
        return fn

    fb_ms = {}
    for entropy in (False, True):
        t_o = timer(ours_fb(entropy), setup=fresh_nonleaf)
        fb_ms[entropy] = t_o["median_ms"]
        fresh_nonleaf()
        peak = timer.peak_bytes(ours_fb(entropy))
        t_b = _oom_safe(lambda: slow(torch_fb(entropy), setup=fresh_nonleaf))
        name = "logprobs fwd+bwd" + (" +entropy" if entropy else "")
        rows.append(Row(name, shape, dt, t_o["median_ms"], "torch fp32 autograd", t_b and t_b["median_ms"],
                        gbytes=6 * e / 1e9, peak_mb=mb(peak),
                        note=f"eff {_eff(e, t_o['median_ms'])} (4 B/elem floor)"))
        log(f"  {name}: {t_o['median_ms']:.3f} ms")

    # ---- grpo_loss forward + backward (two streams, KL, entropy bonus) --------------------
    kw = dict(ref_logp=d["ref"], kl_type="low_var_kl", kl_coef=0.01, entropy_coef=0.001, stream=d["stream"],
              stream_weights=[1.0, 1.0], clip_high=0.28)

    def ours_grpo():
        r = grpo_loss(state["y"], d["targets"], d["old"], d["adv"], d["mask"], inplace_backward=True, **kw)
        torch.autograd.grad(r.loss, state["y"])

    def torch_grpo():
        r = ref.grpo_loss_ref(state["y"], d["targets"], d["old"], d["adv"], d["mask"], dtype=torch.float32, **kw)
        torch.autograd.grad(r["loss"], state["y"])

    t_o = timer(ours_grpo, setup=fresh_nonleaf)
    fresh_nonleaf()
    peak = timer.peak_bytes(ours_grpo)
    t_b = _oom_safe(lambda: slow(torch_grpo, setup=fresh_nonleaf))
    fresh_nonleaf()
    peak_b = _oom_safe(lambda: {"b": timer.peak_bytes(torch_grpo)})
    torch_peak = "-" if not peak_b or peak_b["b"] is None else f"{mb(peak_b['b']):.0f} MB"
    rows.append(Row("grpo_loss fwd+bwd", shape + " 2 streams", dt, t_o["median_ms"], "torch fp32 verl-style",
                    t_b and t_b["median_ms"], gbytes=6 * e / 1e9, peak_mb=mb(peak),
                    note=f"eff {_eff(e, t_o['median_ms'])}; torch peak {torch_peak}"))
    log(f"  grpo_loss fwd+bwd: {t_o['median_ms']:.3f} ms")

    # ---- grpo_loss single read (impl="single_read"): 4 B/elem, against two_pass of this run ---
    plan = _single_read_plan(v, device)

    def ours_single(inplace: bool):
        def fn():
            r = grpo_loss(state["y"], d["targets"], d["old"], d["adv"], d["mask"], impl="single_read",
                          inplace_backward=inplace, **kw)
            torch.autograd.grad(r.loss, state["y"])
        return fn

    for inplace in (True, False):
        t_s = timer(ours_single(inplace), setup=fresh_nonleaf)
        fresh_nonleaf()
        peak_s = timer.peak_bytes(ours_single(inplace))
        name = "grpo_loss fwd+bwd single_read" + (" (in-place)" if inplace else " (grad buffer)")
        rows.append(Row(name, shape + " 2 streams", dt, t_s["median_ms"], "grpo_loss two_pass (in-place)",
                        t_o["median_ms"], gbytes=4 * e / 1e9, peak_mb=mb(peak_s),
                        note=f"{plan}; eff {_eff(e, t_s['median_ms'])}"))
        log(f"  {name}: {t_s['median_ms']:.3f} ms ({plan})")

    # ---- Liger-Kernel (only where installed) --------------------------------------------
    lg = _liger()
    if lg is None:
        rows.append(Row("logprobs / grpo_loss fwd+bwd", shape, dt, fb_ms[False], "liger", None,
                        note="liger_kernel not installed"))
    else:
        def liger_ce():
            loss = lg["ce"](state["y"], d["targets"], reduction="sum")
            torch.autograd.grad(loss, state["y"])

        def liger_grpo():
            x3 = torch.cat([state["y"], state["y"][-1:]]).unsqueeze(0)  # Liger wants [B, L + 1, V]
            out = lg["grpo"](x3, d["old"][None], d["ref"][None], d["targets"][None], d["adv"][None],
                             d["mask"][None].to(torch.int64), temperature=1.0, beta=0.01, eps_low=0.2, eps_high=0.28)
            torch.autograd.grad(_first_scalar(out), state["y"])

        for name, fn, ours_ms in (("logprobs fwd+bwd", liger_ce, fb_ms[False]),
                                  ("grpo_loss fwd+bwd", liger_grpo, t_o["median_ms"])):
            try:
                t_l = slow(fn, setup=fresh_nonleaf)["median_ms"]
                note = ""
            except Exception as exc:  # an API of another Liger version
                t_l, note = None, f"liger failed: {type(exc).__name__}"
            rows.append(Row(name, shape, dt, ours_ms, "liger", t_l, gbytes=6 * e / 1e9, note=note))
    del state, base, x
    d.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---- fused linear path ------------------------------------------------------------
    lt, lh, lv, ldt = cfg["lin_t"], cfg["lin_h"], cfg["lin_v"], cfg["lin_dtype"]
    g = torch.Generator(device=device).manual_seed(1)
    hidden = (torch.randn(lt, lh, device=device, generator=g) * 0.5).to(ldt).requires_grad_()
    weight = (torch.randn(lv, lh, device=device, generator=g) * 0.05).to(ldt).requires_grad_()
    li = make_inputs(device, lt, 8, seed=2)  # per-token inputs only (the logits come from the matmul)
    targets = torch.randint(0, lv, (lt,), device=device, generator=g)
    lkw = dict(stream=li["stream"], stream_weights=[1.0, 1.0], entropy_coef=0.001)
    largs = (targets, li["old"] - 10, li["adv"], li["mask"])

    def fused():
        r = fused_linear_grpo_loss(hidden, weight, *largs, chunk_size=cfg["chunk"], **lkw)
        torch.autograd.grad(r.loss, (hidden, weight))

    def unfused():
        r = grpo_loss(hidden @ weight.t(), *largs, inplace_backward=True, **lkw)
        torch.autograd.grad(r.loss, (hidden, weight))

    dl = torch.empty(lt, lv, device=device, dtype=ldt)

    def matmuls():  # the three matmuls both paths must do: logits, grad_hidden, grad_weight
        torch.mm(hidden.detach(), weight.detach().t(), out=dl)
        torch.mm(dl, weight.detach())
        torch.mm(dl.t(), hidden.detach())

    t_f = slow(fused)
    t_mm = slow(matmuls)
    del dl
    t_u = _oom_safe(lambda: slow(unfused))
    peak_f = timer.peak_bytes(fused)
    peak_u = _oom_safe(lambda: {"b": timer.peak_bytes(unfused)})
    lshape = f"T={lt} H={lh} V={lv}"
    ldts = str(ldt).replace("torch.", "")
    flop = 6 * lt * lh * lv / 1e12
    unfused_peak = "-" if not peak_u or peak_u["b"] is None else f"{mb(peak_u['b']):.0f} MB"
    rows.append(Row("fused_linear_grpo_loss fwd+bwd", lshape, ldts, t_f["median_ms"], "matmul + grpo_loss",
                    t_u and t_u["median_ms"], tflop=flop, peak_mb=mb(peak_f),
                    note=f"3 matmuls alone {t_mm['median_ms']:.2f} ms = {t_f['median_ms'] / t_mm['median_ms']:.2f}x "
                         f"of them; unfused peak {unfused_peak}"))
    log(f"  fused linear: {t_f['median_ms']:.2f} ms (matmuls {t_mm['median_ms']:.2f} ms)")
    return rows
