"""The single-process dual-stream trainer: stage 0 (supervised format warm-up), stage 1
(localization GRPO), stage 2 (sparse-reasoning GRPO with token selection and fusion).

One RL step (stage 1 stops after the localization stream)::

    rollout_localization   HF generate, G samples per question (dense prompt)
      -> parse boxes       tolerant parser, per response
    rollout_sparse         prune each response's prompt to its boxes (select + fuse, original
                           M-RoPE positions), G' samples per localization response
    reward                 score_dual_stream: format, IoU, accuracy, cross-feedback
    advantage              two-level GRPO groups (dual_stream_advantages)
    old_logp               the rollout policy's log-probs of every response token
                           (no-grad forward, tsparse fused log-probs)
    update                 forward both streams (sparse: pruning + fusion recomputed from the
                           current visual features), decoupled GRPO loss through
                           tsparse.ops.fused_linear_grpo_loss(..., stream=...), backward,
                           clip, AdamW step; x mini_batches x ppo_epochs

Each phase is timed (CUDA-synchronized) and wrapped in an NVTX range (``TSPARSE_NVTX=1``).
The method itself - rollouts, pruning, rewards, advantages, log-probs and the loss - lives
in :mod:`tsparse.dualstream`; this module schedules it, logs, evaluates and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._nvtx import nvtx_range
from ..dualstream.advantages import LOCALIZATION, SPARSE, dual_stream_advantages
from ..dualstream.config import PruningConfig
from ..dualstream.data import (
    SyntheticScanConfig,
    VQASample,
    ensure_synthetic_scans,
    load_vitar_json,
    warmup_response,
)
from ..dualstream.models import load_model_and_processor
from ..dualstream.policy import (
    lm_head_weight,
    micro_batch_stream_weights,
    policy_loss,
    question_features,
    response_hidden,
    sft_loss,
    stream_forward_inputs,
    token_logprobs,
)
from ..dualstream.rewards import score_dual_stream
from ..dualstream.rollout import (
    GenerationOptions,
    Responses,
    phase,
    rollout_localization,
    rollout_sparse,
    tokenize_targets,
)
from . import checkpoint as ckpt
from .config import STAGES, ConfigError, TrainConfig
from .encode_cache import CachedEncoder
from .evaluate import baselines, evaluate
from .metrics import TRAIN_KEYS, MetricsLogger, format_summary, plot_metrics, quarter_means, read_jsonl, stage_means
from .optim import TrainerOptimizer, lr_at

__all__ = ["Trainer", "StreamRows", "pick_device", "pick_dtype"]

_STREAM_NAMES = ("localization", "sparse")


def pick_device(name: str) -> torch.device:
    """``auto``: ``cuda`` when a GPU is usable, else ``cpu``; otherwise the named device
    (``ConfigError`` when CUDA is asked for and not usable)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device` is {name!r} but no CUDA device is usable here (use device=cpu or auto)")
    return dev


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# --------------------------------------------------------------------------------------
@dataclass
class StreamRows:
    """The response rows of one stream in a step, with what their training forward needs.

    ``prompt``: the processor batch of the step's questions in this stream's prompt;
    ``question_index``: the prompt row of each response row; ``boxes``: the boxes each
    row's prompt is pruned to (``None``: the dense stream); ``pruning``: how (``None``: the
    method's ``pruning``); ``advantages``: float32 ``[N]`` per row (``None`` for supervised
    targets); ``old_logp`` / ``ref_logp``: per-row token log-probs, filled before the update.
    """

    stream: int
    prompt: dict
    question_index: list
    responses: Responses
    boxes: Optional[list] = None
    advantages: Optional[Tensor] = None
    old_logp: Optional[list] = None
    ref_logp: Optional[list] = None
    pruning: Optional[PruningConfig] = None

    def __len__(self) -> int:
        return len(self.responses)

    def lengths(self, rows: Sequence[int]) -> list[int]:
        return self.responses.mask[list(rows)].sum(1).tolist() if len(rows) else []


def _split(rows: Sequence[int], parts: int) -> list[list[int]]:
    return [list(map(int, a)) for a in np.array_split(np.asarray(list(rows), dtype=np.int64), parts)]


def micro_batches(n_rows: Sequence[Sequence[int]], micro_batch_size: Optional[int]) -> list[list[list[int]]]:
    """Splits each stream's rows into the same number of consecutive chunks, at most
    ``micro_batch_size`` rows each (``None``: one chunk). Returns ``[chunk][stream] -> rows``."""
    if micro_batch_size is None:
        return [[list(r) for r in n_rows]]
    parts = max([math.ceil(len(r) / micro_batch_size) for r in n_rows] + [1])
    split = [_split(r, parts) for r in n_rows]
    return [[split[s][k] for s in range(len(n_rows))] for k in range(parts)]


class Trainer:
    """Runs the configured stages (see the module docstring).

    Args:
        config: a :class:`~tsparse.train.config.TrainConfig`.
        resume: ``None``/``False`` (fresh run: an existing ``output_dir`` is reused, its
            metrics overwritten), ``True`` (continue from ``<output_dir>/checkpoints/latest``)
            or a checkpoint folder.
        log: where progress lines go (default ``print``).
    """

    def __init__(self, config: TrainConfig, *, resume: Union[None, bool, str, Path] = None,
                 log: Callable[[str], None] = print):
        self.cfg = config
        self.log = log
        self.method = config.method_config_obj()
        self.out = Path(config.output_dir)
        for d in (self.out, *self.out.parents):
            if d.exists() and not d.is_dir():
                raise ConfigError(f"`output_dir` {str(self.out)!r}: {str(d)!r} is a file, not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_root = self.out / "checkpoints"
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self._seed_everything(config.seed)

        self.resume_from: Optional[Path] = None
        payload = None
        if resume is True:
            found = ckpt.load_latest(self.out)  # falls back past damaged checkpoints, with a warning
            if found is None:
                raise FileNotFoundError(f"--resume: no checkpoint to resume from under {self.ckpt_root}")
            self.resume_from, payload = found
        elif resume:
            self.resume_from = Path(resume)
            payload = ckpt.load_trainer_state(self.resume_from)  # the one asked for: an error if damaged

        # Data first: a bad data path fails before a large model is loaded.
        self.train_samples, self.val_samples = self._load_data()
        model_path = str(self.resume_from / "model") if self.resume_from else config.model.path
        if model_path is None:
            raise ConfigError("`model.path` is not set: pass --model PATH (a local Qwen2.5-VL-family checkpoint) "
                              "or model.path=tiny")
        if model_path != "tiny" and not Path(model_path).is_dir():
            raise ConfigError(f"`model.path` (--model): {model_path!r} is neither 'tiny' nor a checkpoint folder")
        self.model_path = model_path
        # The tiny random model's weights follow the run's seed (a second seed varies everything).
        self.model, self.processor = load_model_and_processor(
            model_path, dtype=self.dtype, device=self.device, tiny_config=config.model.tiny_config,
            seed=config.seed)
        self._set_image_size(config.model.min_pixels, config.model.max_pixels)
        # Prompts of the training samples: rendered and preprocessed once when cached.
        mb = config.data.prompt_cache_mb
        self.encoder = CachedEncoder(self.processor, max_bytes=mb << 20) if mb > 0 else self.processor
        if config.model.attn_implementation is not None:
            self.model.set_attn_implementation(config.model.attn_implementation)
        if config.model.freeze_vision:
            self.model.model.visual.requires_grad_(False)
        if config.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.eval()

        self.state = dict(payload["state"]) if payload else {
            "stage": None, "step": 0, "stage_done": False, "completed": [], "global_step": 0, "opt_steps": 0,
            "evals": []}
        # Names the run in each checkpoint.json: --resume falls back to the newest checkpoint OF
        # THE NEWEST RUN, not to one an earlier run left in the same folder (resumed runs keep it).
        self.state.setdefault("run", time.strftime("%Y%m%dT%H%M%S") + f".{time.time_ns() % 10**9:09d}")
        self._optimizer_state = payload["optimizer"] if payload else None
        if payload:
            ckpt.set_rng_state(payload["rng"])
        self.metrics = MetricsLogger(self.out / "metrics.jsonl", truncate=payload is None)
        if payload:
            self.metrics.keep_until(int(self.state["global_step"]))
        self._write_evals()
        (self.out / "config.json").write_text(json.dumps(config.to_dict(), indent=1), encoding="utf-8")
        self.optimizer: Optional[TrainerOptimizer] = None
        self._ref_model = None
        if payload is None and ckpt.find_latest(self.out) is not None:
            self.log(f"[tsparse.train] note: {self.out} holds checkpoints of an earlier run; this fresh run "
                     f"overwrites them (--resume continues it instead)")

    # ---------------------------------------------------------------------------------
    # Setup helpers
    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _set_image_size(self, min_pixels: Optional[int], max_pixels: Optional[int]) -> None:
        """Overrides the image processor's pixel range (Qwen's ``size`` = shortest/longest edge
        in pixels of area)."""
        ip = self.processor.image_processor
        for key, value in (("shortest_edge", min_pixels), ("longest_edge", max_pixels)):
            if value is None:
                continue
            size = {k: v for k, v in dict(ip.size or {}).items() if v is not None}
            size[key] = int(value)
            try:
                ip.size = type(ip.size)(**size)
            except TypeError:
                ip.size = size
            attr = "min_pixels" if key == "shortest_edge" else "max_pixels"
            if hasattr(ip, attr):
                setattr(ip, attr, int(value))

    def _load_split(self, spec: Optional[str], split: str, limit: Optional[int]) -> list[VQASample]:
        d = self.cfg.data
        if spec is None:
            hint = " (or eval.samples=0)" if split == "val" else ""
            raise ConfigError(f"`data.{split}` is not set: give a ViTAR-16K-format JSON path or `synthetic`{hint}")
        if spec == "synthetic":
            scfg = SyntheticScanConfig.load(d.synthetic)
            splits = dict(scfg.splits)
            if d.synthetic_splits:
                splits.update(d.synthetic_splits)
            if split not in splits:
                raise ConfigError(f"the synthetic dataset has no `{split}` split (data.synthetic_splits)")
            paths = ensure_synthetic_scans(Path(d.synthetic_root).expanduser(), scfg, splits=splits)
            path = paths[split]
        else:
            path = Path(spec).expanduser()
            if not path.is_file():
                raise ConfigError(f"`data.{split}`: no such file {str(path)!r}")
        return load_vitar_json(path, invalid_boxes=d.invalid_boxes, limit=limit)

    def _load_data(self) -> tuple[list, list]:
        needs_train = any(getattr(self.cfg.stages_config, s).steps > 0 for s in self.cfg.stages)
        train = self._load_split(self.cfg.data.train, "train", self.cfg.data.max_train) if needs_train else []
        if needs_train and not train:
            raise ConfigError("`data.train` holds no sample")
        val = []
        if self.cfg.eval.samples > 0:
            val = self._load_split(self.cfg.data.val, "val", self.cfg.data.max_val)[: self.cfg.eval.samples]
        return train, val

    def _batch(self, stage: str, step: int, n: int) -> list[VQASample]:
        """The samples of a step: a fresh permutation of the training set per epoch, seeded
        by (seed, stage, epoch), so the batch of any step is known without state (resume)."""
        total = len(self.train_samples)
        out = []
        for k in range(step * n, step * n + n):
            epoch, pos = divmod(k, total)
            perm = np.random.default_rng([self.cfg.seed, STAGES.index(stage), epoch]).permutation(total)
            out.append(self.train_samples[int(perm[pos])])
        return out

    def _make_optimizer(self, lr: float) -> TrainerOptimizer:
        o = self.cfg.optim
        return TrainerOptimizer(self.model.parameters(), lr=lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay, master_weights=o.master_weights)

    def _phase(self, name: str, timings: dict):
        return phase(name, timings, self.device)

    # ---------------------------------------------------------------------------------
    # Forward passes
    def _rows_forward(self, table: StreamRows, rows: Sequence[int], features=None) -> tuple[Tensor, Tensor, list[int]]:
        """Hidden states ``[T, H]``, targets ``[T]`` and per-row token counts of ``rows``."""
        rows = list(rows)
        mask = table.responses.mask[rows]
        width = int(mask.sum(1).max())
        resp = Responses(table.responses.ids[rows][:, :width], mask[:, :width],
                         [table.responses.texts[r] for r in rows])
        boxes = None if table.boxes is None else [table.boxes[r] for r in rows]
        inputs = stream_forward_inputs(self.model, table.prompt, [table.question_index[r] for r in rows], resp,
                                       boxes=boxes, pruning=table.pruning or self.method.pruning, features=features)
        hidden = response_hidden(self.model, inputs, resp.mask)
        targets = resp.ids[resp.mask.bool()].to(hidden.device)
        return hidden, targets, resp.mask.sum(1).tolist()

    def _forward_chunk(self, tables: Sequence[StreamRows], chunk: Sequence[Sequence[int]]) -> list:
        """One micro-batch: the visual features of its questions computed ONCE (both streams
        see the same images) and shared by the streams' forwards. Returns per table
        ``(hidden, targets, lengths)`` or ``None`` when the table has no row in the chunk."""
        qs = sorted({tables[i].question_index[r] for i, rows in enumerate(chunk) for r in rows})
        # The trainer encodes every stream's prompts from the same samples, so prompt row q
        # holds the same images in each table (checked on the grids).
        grids = [t.prompt.get("image_grid_thw") for t in tables]
        same = grids and all(g is not None and torch.equal(g, grids[0]) for g in grids)
        features = None
        if qs and same and sum(1 for rows in chunk if rows) > 1:
            features = (qs, question_features(self.model, tables[0].prompt, qs))
        return [self._rows_forward(t, rows, features) if rows else None for t, rows in zip(tables, chunk)]

    @torch.no_grad()
    def _score_tokens(self, tables: Sequence[StreamRows], micro_batch_size: Optional[int], model=None) -> list[list]:
        """Per table, per row: the token log-probs under ``model`` (default: the policy) at
        the rollout temperature - the old (rollout) policy's or the reference's."""
        was = self.model
        if model is not None:
            self.model = model
        try:
            self.model.eval()
            weight = lm_head_weight(self.model)
            out = [[None] * len(t) for t in tables]
            plan = micro_batches([list(range(len(t))) for t in tables], micro_batch_size)
            for chunk in plan:
                for ti, (table, rows, fwd) in enumerate(zip(tables, chunk, self._forward_chunk(tables, chunk))):
                    if fwd is None:
                        continue
                    hidden, targets, lens = fwd
                    logp = token_logprobs(hidden, weight, targets, temperature=self.cfg.rollout.temperature,
                                          fused_linear=self.cfg.loss.fused_linear, chunk_size=self.cfg.loss.chunk_size)
                    for r, piece in zip(rows, torch.split(logp, lens)):
                        out[ti][r] = piece.float()
            return out
        finally:
            self.model = was

    # ---------------------------------------------------------------------------------
    # Stage 1 / 2: GRPO
    def _update(self, tables: Sequence[StreamRows], scfg, timings: dict) -> dict:
        """Optimizer steps on the rollout batch: ``mini_batches`` x ``ppo_epochs``."""
        lcfg = self.cfg.loss
        weight_fn = lambda: lm_head_weight(self.model)  # noqa: E731
        q_all = sorted({q for t in tables for q in t.question_index})
        groups = _split(q_all, scfg.mini_batches)
        agg: dict = {}
        tok_w: dict = {}
        losses, norms = [], []
        self.model.train()
        for _epoch in range(scfg.ppo_epochs):
            for group in groups:
                gset = set(group)
                rows = [[r for r in range(len(t)) if t.question_index[r] in gset] for t in tables]
                tot_tok = [sum(t.lengths(r)) for t, r in zip(tables, rows)]
                tot_seq = [len(r) for r in rows]
                self.optimizer.zero_grad()
                self.optimizer.set_lr(self._lr())
                step_loss = 0.0
                for chunk in micro_batches(rows, scfg.micro_batch_size):
                    hs, tg, old, adv, st, seq, ref = [], [], [], [], [], [], []
                    m_tok, m_seq = [0, 0], [0, 0]
                    n_seq = 0
                    for table, crow, fwd in zip(tables, chunk, self._forward_chunk(tables, chunk)):
                        if fwd is None:
                            continue
                        h, t, lens = fwd
                        hs.append(h)
                        tg.append(t)
                        old.append(torch.cat([table.old_logp[r] for r in crow]))
                        if table.ref_logp is not None:
                            ref.append(torch.cat([table.ref_logp[r] for r in crow]))
                        lens_t = torch.tensor(lens, device=h.device)
                        adv.append(torch.repeat_interleave(table.advantages[crow].to(h.device), lens_t))
                        st.append(torch.full((h.shape[0],), table.stream, dtype=torch.int64, device=h.device))
                        seq_no = torch.arange(n_seq, n_seq + len(crow), device=h.device)
                        seq.append(torch.repeat_interleave(seq_no, lens_t))
                        n_seq += len(crow)
                        m_tok[table.stream] += int(sum(lens))
                        m_seq[table.stream] += len(crow)
                    if not hs:
                        continue
                    totals_tok, totals_seq = [0, 0], [0, 0]
                    for table, tt, ts in zip(tables, tot_tok, tot_seq):
                        totals_tok[table.stream] += tt
                        totals_seq[table.stream] += ts
                    weights = micro_batch_stream_weights(lcfg.weights(), lcfg.loss_agg, m_tok, m_seq,
                                                         totals_tok, totals_seq)
                    res = policy_loss(torch.cat(hs), weight_fn(), torch.cat(tg), torch.cat(old).to(hs[0].device),
                                      torch.cat(adv).float(), torch.cat(st), lcfg,
                                      temperature=self.cfg.rollout.temperature, stream_weights=weights,
                                      seq_ids=torch.cat(seq), ref_logp=torch.cat(ref).to(hs[0].device) if ref else None,
                                      return_entropy=True)
                    if not torch.isfinite(res.loss):
                        raise FloatingPointError(
                            f"non-finite loss {float(res.loss)} at {self.state['stage']} step {self.state['step'] + 1}")
                    res.loss.backward()
                    step_loss += float(res.loss.detach())
                    for k, v in res.verl_metrics(list(_STREAM_NAMES)).items():
                        if k.startswith("actor/tokens"):
                            continue
                        sid = LOCALIZATION if k.endswith("/localization") else SPARSE
                        w = m_tok[sid]
                        if w and v is not None and math.isfinite(v):
                            agg[k] = agg.get(k, 0.0) + v * w
                            tok_w[k] = tok_w.get(k, 0) + w
                norms.append(self.optimizer.clip_and_step(self.cfg.optim.max_grad_norm))
                self.state["opt_steps"] += 1
                losses.append(step_loss)
        self.model.eval()
        out = {k: agg[k] / tok_w[k] for k in agg}
        out["loss"] = sum(losses) / len(losses) if losses else float("nan")
        out["grad_norm"] = sum(norms) / len(norms) if norms else 0.0
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        out["optimizer_steps"] = len(norms)
        return out

    def _rl_step(self, stage: str, step: int) -> dict:
        scfg = getattr(self.cfg.stages_config, stage)
        adv_cfg = self.method.advantages
        g, gp = adv_cfg.localization_group_size, adv_cfg.sparse_group_size
        r = self.cfg.rollout
        timings: dict = {}
        t_step = time.perf_counter()
        samples = self._batch(stage, step, scfg.questions_per_step)
        with self._phase("rollout_localization", timings):
            loc = rollout_localization(
                self.model, self.encoder, samples, self.method.prompts.localization,
                GenerationOptions(r.max_new_tokens.localization, True, r.temperature, r.top_p, r.top_k),
                group_size=g, max_boxes=self.method.format.max_boxes, device=self.device)
        timings["parse"] = loc.timings.get("parse", 0.0)
        timings["generate_localization"] = loc.timings.get("generate", 0.0)
        sp = None
        if stage == "sparse":
            with self._phase("rollout_sparse", timings):
                sp = rollout_sparse(
                    self.model, self.encoder, samples, self.method.prompts.sparse, loc.boxes,
                    GenerationOptions(r.max_new_tokens.sparse, True, r.temperature, r.top_p, r.top_k),
                    parents_per_question=g, group_size=gp, pruning=self.method.pruning,
                    image_embeds=loc.image_embeds, device=self.device)
            timings["prune"] = sp.timings.get("prune", 0.0)
            timings["generate_sparse"] = sp.timings.get("generate", 0.0)
        with self._phase("reward", timings):
            loc_texts = [loc.responses.texts[q * g:(q + 1) * g] for q in range(len(samples))]
            sp_texts = None
            if sp is not None:
                sp_texts = [[sp.responses.texts[(q * g + i) * gp:(q * g + i + 1) * gp] for i in range(g)]
                            for q in range(len(samples))]
            scores = score_dual_stream(loc_texts, samples, sp_texts, weights=self.method.rewards,
                                       max_boxes=self.method.format.max_boxes)
        with self._phase("advantage", timings):
            adv = dual_stream_advantages(scores.localization_scores(),
                                         scores.sparse_scores() if sp is not None else None, config=adv_cfg)
        tables = [StreamRows(LOCALIZATION, loc.prompt, loc.question_index, loc.responses,
                             advantages=adv.localization.reshape(-1))]
        if sp is not None:
            parents = sp.parent_index
            tables.append(StreamRows(SPARSE, sp.prompt, sp.question_index, sp.responses,
                                     boxes=[loc.boxes[p] for p in parents], advantages=adv.sparse.reshape(-1)))
        with self._phase("old_logp", timings):
            olds = self._score_tokens(tables, scfg.micro_batch_size)
            for t, o in zip(tables, olds):
                t.old_logp = o
        if self.cfg.loss.kl_coef > 0:
            with self._phase("ref_logp", timings):
                refs = self._score_tokens(tables, scfg.micro_batch_size, model=self._reference())
                for t, o in zip(tables, refs):
                    t.ref_logp = o
        with self._phase("update", timings):
            upd = self._update(tables, scfg, timings)
        timings["step"] = time.perf_counter() - t_step

        gen_tokens = loc.responses.num_tokens + (sp.responses.num_tokens if sp is not None else 0)
        trained_tokens = sum(t.responses.num_tokens for t in tables) * scfg.ppo_epochs
        gen_time = timings.get("generate_localization", 0.0) + timings.get("generate_sparse", 0.0)
        rec = {}
        for k, v in scores.mean_terms("localization").items():
            rec[f"loc/{k}"] = v
        rec["loc/box_rate"] = loc.box_rate
        rec["loc/boxes_parsed"] = sum(len(b.boxes) for b in loc.boxes)
        rec["loc/response_len"] = float(loc.responses.lengths.float().mean())
        if sp is not None:
            for k, v in scores.mean_terms("sparse").items():
                if k != "iou":
                    rec[f"sparse/{k}"] = v
            rec["sparse/response_len"] = float(sp.responses.lengths.float().mean())
            rec["keep_ratio"] = sp.keep_ratio
            rec["fallback_rate"] = sp.fallback_rate
            rec["visual_tokens/kept"] = int(sp.inputs.kept_counts.sum())
            rec["visual_tokens/dense"] = int(sp.inputs.total_counts.sum())
        rec.update(upd)
        rec["tokens/generated"] = gen_tokens
        rec["tokens/trained"] = trained_tokens
        rec["gen_tokens_per_s"] = gen_tokens / gen_time if gen_time > 0 else None
        rec["tokens_per_s"] = (gen_tokens + trained_tokens) / timings["step"]
        rec.update({f"time/{k}": v for k, v in timings.items()})
        rec["samples"] = [s.id for s in samples]
        return rec

    def _reference(self):
        """The KL reference: the frozen policy this stage started from. A stage that starts
        in this process copies the model before its first step (:meth:`_run_stage`); a stage
        resumed mid-way reloads its starting weights from ``state["stage_start"]`` (the
        previous stage's final checkpoint, or ``model.path``)."""
        if self._ref_model is None:
            src = self.state.get("stage_start") or self.cfg.model.path
            self._ref_model, _ = load_model_and_processor(src, dtype=self.dtype, device=self.device,
                                                          tiny_config=self.cfg.model.tiny_config, seed=self.cfg.seed)
            self._ref_model.eval().requires_grad_(False)
        return self._ref_model

    # ---------------------------------------------------------------------------------
    # Stage 0: supervised warm-up
    def _context_margin(self, step: int, enc: dict) -> Optional[float]:
        """The localization stream's context curriculum (``stages.warmup.context_curriculum``):
        during the first ``fraction`` of the warm-up steps that train it (after
        ``sparse_first``) its prompt is pruned to the ground-truth box grown by ``margin`` token
        cells, ``margin`` rising linearly from 0 to the grid's longest side (the whole image);
        ``None`` (dense) afterwards or when off."""
        wcfg = self.cfg.stages_config.warmup
        frac = wcfg.context_curriculum
        step -= wcfg.sparse_first  # the curriculum spans the steps that train the localization stream
        total = wcfg.steps - wcfg.sparse_first
        if frac <= 0 or step < 0 or step >= frac * total or enc.get("image_grid_thw") is None:
            return None
        merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 2))
        side = int(enc["image_grid_thw"][:, 1:].max()) // merge
        return side * step / (frac * total)

    def _jitter_context(self, step: int, boxes: list, enc: dict) -> list:
        """``stages.warmup.sparse_context_jitter``: that fraction of the sparse stream's rows
        (drawn from (seed, step)) see their ground-truth box grown by a random number of token
        cells, from 0 to the grid's side (the whole image), so the sparse stream also learns to
        answer from imperfect boxes and from every visual token (the dense baseline)."""
        frac = self.cfg.stages_config.warmup.sparse_context_jitter
        grid = enc.get("image_grid_thw")
        if frac <= 0 or grid is None:
            return boxes
        merge = int(getattr(self.model.config.vision_config, "spatial_merge_size", 2))
        rng = np.random.default_rng([self.cfg.seed, 7, step])
        out = []
        counts = enc["image_grid_thw"].shape[0] // max(len(boxes), 1)  # images per sample (uniform here)
        for k, bx in enumerate(boxes):
            if bx is None or rng.random() >= frac:
                out.append(bx)
                continue
            g = grid[k * counts]
            h, w = int(g[1]) // merge, int(g[2]) // merge
            m = int(rng.integers(0, max(h, w) + 1))
            out.append([[max(b[0] - m / w, 0.0), max(b[1] - m / h, 0.0), min(b[2] + m / w, 1.0), min(b[3] + m / h, 1.0)]
                        for b in bx])
        return out

    def _warmup_step(self, step: int) -> dict:
        wcfg = self.cfg.stages_config.warmup
        timings: dict = {}
        t_step = time.perf_counter()
        samples = self._batch("warmup", step, wcfg.batch_size)
        tables = []
        with self._phase("encode", timings):
            # stages.warmup.sparse_first: the first steps train the sparse stream alone.
            streams = [s for s in wcfg.streams if s == "sparse"] if step < wcfg.sparse_first else wcfg.streams
            for stream in streams:
                sid = LOCALIZATION if stream == "localization" else SPARSE
                # Localization targets need a box; the sparse stream trains on every sample
                # (pruned to its ground-truth boxes, the full image when it has none).
                keep = [k for k, s in enumerate(samples) if stream == "sparse" or s.boxes]
                if not keep:
                    continue
                use = [samples[k] for k in keep]
                targets = []
                for s in use:
                    reasoning = None if s.meta.get("rationale") else wcfg.reasoning
                    try:
                        targets.append(warmup_response(s, stream, reasoning=reasoning,
                                                       decimals=self.method.format.box_decimals))
                    except ValueError as e:
                        raise ConfigError(f"{e} (set stages.warmup.reasoning for data without a rationale)") from None
                enc = self.encoder.encode_samples(samples, self.method.prompts.for_stream(stream),
                                                    device=self.device)
                resp = tokenize_targets(self.processor, targets, device=self.device)
                boxes = [list(s.boxes) or None for s in use] if stream == "sparse" else None
                if stream == "sparse":
                    boxes = self._jitter_context(step, boxes, enc)
                pruning = None
                margin = self._context_margin(step, enc)
                if stream == "localization" and margin is not None:
                    # Curriculum: the dense prompt pruned to the ground-truth box grown by `margin`
                    # cells, the other visual tokens dropped (not fused: the kept tokens are then
                    # exactly the dense tokens a focused look would read).
                    boxes = [list(s.boxes) for s in use]
                    pruning = dataclasses.replace(self.method.pruning, margin=margin, fuse=False,
                                                  fallback="full_image")
                tables.append(StreamRows(sid, enc, keep, resp, boxes=boxes, pruning=pruning))
        self.model.train()
        self.optimizer.zero_grad()
        self.optimizer.set_lr(self._lr())
        rows = [list(range(len(t))) for t in tables]
        tot_tok = [0, 0]
        for t, r in zip(tables, rows):
            tot_tok[t.stream] += sum(t.lengths(r))
        nll: dict = {}
        loss_total = 0.0
        with self._phase("update", timings):
            for chunk in micro_batches(rows, wcfg.micro_batch_size):
                hs, tg, st = [], [], []
                m_tok = [0, 0]
                for table, crow, fwd in zip(tables, chunk, self._forward_chunk(tables, chunk)):
                    if fwd is None:
                        continue
                    h, t, lens = fwd
                    hs.append(h)
                    tg.append(t)
                    st.append(torch.full((h.shape[0],), table.stream, dtype=torch.int64, device=h.device))
                    m_tok[table.stream] += int(sum(lens))
                if not hs:
                    continue
                weights = micro_batch_stream_weights([1.0, 1.0], "token-mean", m_tok, [0, 0], tot_tok, [0, 0])
                loss, per = sft_loss(torch.cat(hs), lm_head_weight(self.model), torch.cat(tg), torch.cat(st),
                                     stream_weights=weights, fused_linear=self.cfg.loss.fused_linear,
                                     chunk_size=self.cfg.loss.chunk_size)
                loss.backward()
                loss_total += float(loss.detach())
                for name, v in per.items():
                    sid = _STREAM_NAMES.index(name)
                    nll[name] = nll.get(name, 0.0) + v * m_tok[sid] / tot_tok[sid]
            grad_norm = self.optimizer.clip_and_step(self.cfg.optim.max_grad_norm)
            self.state["opt_steps"] += 1
        self.model.eval()
        timings["step"] = time.perf_counter() - t_step
        tokens = sum(tot_tok)
        rec = {"sft/loss": loss_total, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"],
               "tokens/trained": tokens, "tokens_per_s": tokens / timings["step"]}
        margin = self._context_margin(step, tables[0].prompt) if tables else None
        if margin is not None:
            rec["sft/context_margin"] = margin
        rec.update({f"sft/nll/{k}": v for k, v in nll.items()})
        rec.update({f"time/{k}": v for k, v in timings.items()})
        return rec

    # ---------------------------------------------------------------------------------
    # Evaluation, checkpoints, the run
    def _evaluate(self, label: str) -> Optional[dict]:
        if not self.val_samples:
            return None
        r = self.cfg.rollout
        with nvtx_range("eval"):
            res = evaluate(self.model, self.processor, self.val_samples, self.method,
                           max_new_tokens_localization=r.max_new_tokens.localization,
                           max_new_tokens_sparse=r.max_new_tokens.sparse, batch_size=self.cfg.eval.batch_size,
                           dense=self.cfg.eval.dense)
        rec = {"label": label, **res.as_dict()}
        self.state["evals"].append(rec)
        self._write_evals()
        dense = "" if res.dense_accuracy is None else f"dense acc {res.dense_accuracy:.3f}, "
        self.log(f"[tsparse.train] eval {label}: loc format {res.loc_format:.3f}, box rate {res.box_rate:.3f}, "
                 f"IoU {res.iou:.3f}, loc acc {res.loc_accuracy:.3f}, {dense}sparse format {res.sparse_format:.3f}, "
                 f"sparse acc {res.sparse_accuracy:.3f}, keep {res.keep_ratio:.3f} ({res.seconds:.1f} s)")
        return rec

    def _write_evals(self) -> None:
        (self.out / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.state["evals"]),
                                            encoding="utf-8")

    def _save(self, name: str) -> Path:
        state = dict(self.state)
        state["config"] = self.cfg.to_dict()
        path = ckpt.save_checkpoint(self.ckpt_root, name, model=self.model, processor=self.processor, state=state,
                                    optimizer=self.optimizer if self.cfg.checkpoint.save_optimizer else None,
                                    method=self.method)
        return path

    def _lr(self) -> float:
        o = self.cfg.optim
        return lr_at(self.state["opt_steps"], self._stage_lr, o.warmup_steps, total_steps=self._stage_opt_steps,
                     schedule=o.schedule, min_lr_ratio=o.min_lr_ratio)

    def _stage_lr_of(self, stage: str) -> float:
        lr = getattr(self.cfg.stages_config, stage).lr
        return self.cfg.optim.lr if lr is None else lr

    def _run_stage(self, stage: str) -> None:
        scfg = getattr(self.cfg.stages_config, stage)
        steps = scfg.steps
        idx = STAGES.index(stage)
        resuming = self.state["stage"] == stage and not self.state["stage_done"]
        start = int(self.state["step"]) if resuming else 0
        if not resuming:
            # Where this stage's starting weights can be reloaded from (the KL reference of a run
            # resumed mid-stage): the previous stage's final checkpoint, else what was loaded.
            prev = [s for s in STAGES[:idx] if s in self.state["completed"]]
            prev_ckpt = self.ckpt_root / ckpt.checkpoint_name(prev[-1], None) / "model" if prev else None
            start_from = str(prev_ckpt) if prev_ckpt is not None and prev_ckpt.is_dir() else self.model_path
            self.state.update(stage=stage, step=0, stage_done=False, opt_steps=0, stage_start=start_from)
        self._ref_model = None
        if stage != "warmup" and self.cfg.loss.kl_coef > 0 and not resuming:
            import copy

            self._ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self._stage_lr = self._stage_lr_of(stage)
        self._stage_opt_steps = steps if stage == "warmup" else steps * scfg.mini_batches * scfg.ppo_epochs
        self.optimizer = self._make_optimizer(self._stage_lr)
        if resuming and self._optimizer_state is not None:
            self.optimizer.load_state_dict(self._optimizer_state)
        self._optimizer_state = None
        self.log(f"[tsparse.train] stage {idx} ({stage}): steps {start + 1}..{steps}, lr {self._stage_lr:g}"
                 + (f", resumed from {self.resume_from}" if resuming else ""))
        bar = None
        if self.cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=start, desc=f"stage {idx} {stage}", unit="step", file=sys.stderr,
                       dynamic_ncols=True, leave=True)
        try:
            for step in range(start, steps):
                with nvtx_range(f"{stage}_step"):
                    rec = self._warmup_step(step) if stage == "warmup" else self._rl_step(stage, step)
                self.state["step"] = step + 1
                self.state["global_step"] += 1
                rec = {"stage": stage, "step": step + 1, "global_step": self.state["global_step"], **rec}
                self.metrics.log(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(self._postfix(rec), refresh=False)
                every = self.cfg.checkpoint.every
                if every and (step + 1) % every == 0 and step + 1 < steps:
                    self._save(ckpt.checkpoint_name(stage, step + 1))
                    ckpt.prune_checkpoints(self.ckpt_root, stage, self.cfg.checkpoint.keep_last)
        finally:
            if bar is not None:
                bar.close()
        if "stage_end" in self.cfg.eval.at:
            self._evaluate(f"after {stage}")
        self.state["stage_done"] = True
        self.state["completed"] = list(self.state["completed"]) + [stage]
        path = self._save(ckpt.checkpoint_name(stage, None))
        self.log(f"[tsparse.train] stage {idx} ({stage}) done: checkpoint {path}")

    @staticmethod
    def _postfix(rec: dict) -> dict:
        keys = (("sft/loss", "loss"), ("loc/score", "R"), ("loc/format", "fmt"), ("loc/iou", "iou"),
                ("sparse/score", "R'"), ("keep_ratio", "keep"), ("time/step", "s"))
        return {short: f"{rec[k]:.3g}" for k, short in keys if isinstance(rec.get(k), (int, float))}

    def run(self) -> dict:
        """Runs the configured stages (skipping those a resumed run completed), then writes
        ``summary.json`` and the plot and returns the summary."""
        t0 = time.perf_counter()
        n_params = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.log(f"[tsparse.train] model {self.model_path} ({n_params / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M "
                 f"trainable) on {self.device} ({str(self.dtype).replace('torch.', '')}); {len(self.train_samples)} "
                 f"train / {len(self.val_samples)} eval samples; output {self.out}")
        if "start" in self.cfg.eval.at and not self.state["evals"] and self.state["stage"] is None:
            label = "random init (untrained)" if self.cfg.model.path == "tiny" else "start (checkpoint)"
            self._evaluate(label)
        for stage in self.cfg.stages:
            if stage in self.state["completed"]:
                continue
            if getattr(self.cfg.stages_config, stage).steps == 0:
                self.log(f"[tsparse.train] stage {STAGES.index(stage)} ({stage}): 0 steps configured, skipped")
                continue
            self._run_stage(stage)
        records = read_jsonl(self.out / "metrics.jsonl")
        ran = [s for s in STAGES if any(r.get("stage") == s for r in records)]
        summary = {
            "output_dir": str(self.out),
            "seconds": time.perf_counter() - t0,
            "device": str(self.device),
            "stages": {s: stage_means(records, s, TRAIN_KEYS) for s in ran},
            "rl_progress": {s: quarter_means(records, s, ("loc/score", "sparse/score", "loc/iou", "loc/accuracy",
                                                          "sparse/accuracy", "keep_ratio"))
                            for s in ran if s != "warmup"},
            "evals": self.state["evals"],
            "baselines": baselines(self.val_samples) if self.val_samples else {},
            "checkpoint": str(ckpt.find_latest(self.out)) if ckpt.find_latest(self.out) else None,
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        if self.cfg.plot and records:
            summary["plot"] = str(plot_metrics(records, self.out / "metrics.png",
                                               title=f"tsparse.train: {self.out.name}"))
        return summary


def summary_text(summary: dict) -> str:
    return format_summary(summary)
