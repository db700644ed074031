"""The trainer's configuration: a YAML file in ``configs/`` plus ``key=value`` overrides.

``python -m tsparse.train --config configs/demo.yaml stages.localization.steps=3 device=cpu``

Sections (every key is checked; an unknown one is an error naming it and the allowed keys):

* top level - ``output_dir``, ``seed``, ``device`` (``auto``: CUDA when usable, else CPU),
  ``dtype`` (``auto``: bfloat16 on CUDA, float32 on CPU), ``threads`` (torch CPU threads;
  ``null``: torch's default), ``stages`` (which of ``warmup``, ``localization``, ``sparse``
  to run, in that order), ``progress`` (progress bars), ``plot`` (PNG of the curves).
* ``model`` - ``path`` (``tiny`` or a local Qwen2.5-VL-family checkpoint; ``--model``),
  ``gradient_checkpointing``, ``freeze_vision``, ``attn_implementation``.
* ``data`` - ``train`` / ``val`` (``synthetic`` or a ViTAR-16K-format JSON path),
  ``synthetic`` (the generator's config name), ``synthetic_splits``, ``synthetic_root``,
  ``max_train`` / ``max_val``, ``invalid_boxes``.
* ``method_config`` + ``method`` - the dual-stream method's config
  (``configs/dualstream.yaml``: prompts, format, rewards, pruning, GRPO grouping) and
  overrides deep-merged over it (e.g. short prompts, group sizes).
* ``rollout`` - sampling: ``temperature``, ``top_p``, ``top_k``, ``max_new_tokens``
  per stream.
* ``loss`` - :class:`tsparse.dualstream.policy.LossSettings` (clipping, KL, entropy,
  aggregation, stream weights, fused linear).
* ``optim`` - AdamW: ``lr``, ``weight_decay``, ``betas``, ``eps``, ``max_grad_norm``,
  ``warmup_steps``, ``master_weights`` (fp32 master copy for low-precision models; ``cpu`` or
  ``device``, ``none``).
* ``stages.warmup`` / ``stages.localization`` / ``stages.sparse`` - steps and batch sizes of
  each stage (``lr`` overrides ``optim.lr`` for that stage).
* ``eval`` - the greedy before/after evaluation on validation samples.
* ``checkpoint`` - ``every`` (steps; 0: only at the end of each stage), ``keep_last``.

Override values are parsed as YAML (``stages=[sparse]``, ``loss.kl_coef=0.01``,
``model.path=/models/Lingshu-7B``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

from ..dualstream.config import MethodConfig, load_yaml, yaml_loader
from ..dualstream.policy import LossSettings

__all__ = [
    "STAGES",
    "ConfigError",
    "ModelSection",
    "DataSection",
    "RolloutSection",
    "OptimSection",
    "WarmupStage",
    "RLStage",
    "StagesSection",
    "EvalSection",
    "CheckpointSection",
    "TrainConfig",
    "parse_overrides",
    "apply_overrides",
    "load_train_config",
]

#: Stage names in training order: supervised format warm-up, localization GRPO, sparse GRPO.
STAGES = ("warmup", "localization", "sparse")


class ConfigError(ValueError):
    """A bad trainer config key or value (the message names the key)."""


# --------------------------------------------------------------------------------------
# Generic checked construction of (nested) frozen dataclasses from mappings.
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"`{where}`: got {value!r}, expected "
                          + " or ".join(_type_name(a) for a in inner) + (" or null" if type(None) in args else ""))
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else _build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{where}` must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{where}` must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"`{where}` must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{where}` must be a string, got {value!r}")
        return value
    if origin in (tuple, Sequence, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{where}` must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{k}]") for k, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{where}` must be a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    return value  # Any


def _build(cls, data, where: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"`{where}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        pre = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {[pre + k for k in unknown]}; allowed under "
                          f"`{where or '<top level>'}`: {names}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        msg = str(e)
        raise ConfigError(msg if "`" in msg else f"`{where}`: {msg}") from None


def _positive(value: int, where: str) -> None:
    if value < 1:
        raise ConfigError(f"`{where}` must be >= 1, got {value}")


def _non_negative(value, where: str) -> None:
    if value < 0:
        raise ConfigError(f"`{where}` must be >= 0, got {value}")


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSection:
    """``path``: ``tiny`` (the embedded random model) or a local Qwen2.5-VL-family checkpoint
    folder (``--model``); ``tiny_config``: the tiny model's config name;
    ``gradient_checkpointing``: recompute activations in backward (large models);
    ``freeze_vision``: keep the vision tower fixed; ``attn_implementation``: transformers'
    attention backend (``sdpa``, ``flash_attention_2``, ``eager``; null: the default);
    ``min_pixels``/``max_pixels``: images are resized so their area lies in this range
    (Qwen's smart_resize; a 28 x 28 cell per visual token; null: the processor's own)."""

    path: Optional[str] = "tiny"
    tiny_config: str = "models/tiny_qwen2_5_vl"
    gradient_checkpointing: bool = False
    freeze_vision: bool = False
    attn_implementation: Optional[str] = None
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            if v is not None and v < 28 * 28:
                raise ConfigError(f"`model.{name}` must be >= 784 (one 28 x 28 cell), got {v}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"`model.min_pixels` ({self.min_pixels}) must be <= model.max_pixels ({self.max_pixels})")
        if self.attn_implementation not in (None, "sdpa", "flash_attention_2", "eager"):
            raise ConfigError(f"`model.attn_implementation` must be sdpa, flash_attention_2, eager or null, "
                              f"got {self.attn_implementation!r}")


@dataclass(frozen=True)
class DataSection:
    """``train``/``val``: ``synthetic`` or a ViTAR-16K-format JSON (``.jsonl`` too);
    ``synthetic``: the synthetic generator's config name; ``synthetic_splits``: samples per
    split (overrides the generator config); ``synthetic_root``: where generated scans go
    (relative paths are relative to the working directory); ``max_train``/``max_val``: use
    at most this many records; ``invalid_boxes``: ``drop`` or ``raise`` for a bad
    ground-truth box; ``prompt_cache_mb``: render, tokenize and preprocess each training
    sample's prompts once and keep up to this many MB of pixel values
    (:class:`~tsparse.train.encode_cache.CachedEncoder`; 0: off, every step re-encodes)."""

    train: Optional[str] = "synthetic"
    val: Optional[str] = "synthetic"
    synthetic: str = "data/synthetic_scans"
    synthetic_splits: Optional[Mapping[str, int]] = None
    synthetic_root: str = "runs/data/synthetic_scans"
    max_train: Optional[int] = None
    max_val: Optional[int] = None
    invalid_boxes: str = "drop"
    prompt_cache_mb: int = 0

    def __post_init__(self):
        if self.invalid_boxes not in ("drop", "raise"):
            raise ConfigError(f"`data.invalid_boxes` must be drop or raise, got {self.invalid_boxes!r}")
        for name in ("max_train", "max_val"):
            v = getattr(self, name)
            if v is not None:
                _positive(v, f"data.{name}")
        _non_negative(self.prompt_cache_mb, "data.prompt_cache_mb")


@dataclass(frozen=True)
class MaxNewTokens:
    localization: int = 128
    sparse: int = 96

    def __post_init__(self):
        _positive(self.localization, "rollout.max_new_tokens.localization")
        _positive(self.sparse, "rollout.max_new_tokens.sparse")


@dataclass(frozen=True)
class RolloutSection:
    """Sampling of the RL rollouts (the training log-probs use the same ``temperature``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: MaxNewTokens = field(default_factory=MaxNewTokens)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ConfigError(f"`rollout.temperature` must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"`rollout.top_p` must be in (0, 1], got {self.top_p}")
        _non_negative(self.top_k, "rollout.top_k")


@dataclass(frozen=True)
class OptimSection:
    """AdamW. ``lr`` (per-stage ``lr`` overrides it), ``weight_decay``, ``betas``, ``eps``;
    ``max_grad_norm`` (0: no clipping); ``warmup_steps``: linear learning-rate warm-up of
    each stage; ``schedule``: ``constant`` or ``cosine`` (decay over each stage's optimizer
    steps to ``min_lr_ratio`` of the stage's lr); ``master_weights``: ``none`` (the optimizer
    updates the parameters in their own dtype), ``device`` (an fp32 master copy and fp32
    Adam states on the model's device) or ``cpu`` (on the CPU: a 7B model's fp32 states do
    not fit one GPU) - needed for bf16 models, where small updates round away."""

    lr: float = 1e-6
    weight_decay: float = 0.01
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0
    master_weights: str = "none"

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"`optim.schedule` must be constant or cosine, got {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"`optim.min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr <= 0:
            raise ConfigError(f"`optim.lr` must be > 0, got {self.lr}")
        _non_negative(self.weight_decay, "optim.weight_decay")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"`optim.betas` must be two numbers in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            raise ConfigError(f"`optim.eps` must be > 0, got {self.eps}")
        _non_negative(self.max_grad_norm, "optim.max_grad_norm")
        _non_negative(self.warmup_steps, "optim.warmup_steps")
        if self.master_weights not in ("none", "device", "cpu"):
            raise ConfigError(f"`optim.master_weights` must be none, device or cpu, got {self.master_weights!r}")


@dataclass(frozen=True)
class WarmupStage:
    """Stage 0, supervised format warm-up (ViTAR's cold start): ``steps`` optimizer steps on
    ``batch_size`` samples, targets from :func:`~tsparse.dualstream.data.warmup_response` in
    each of ``streams`` (the sparse target is trained on the prompt pruned to the
    ground-truth boxes); ``reasoning``: the ``<think>`` text for records without a
    ``rationale`` field (null: such records are an error); ``micro_batch_size``: samples per
    forward; ``context_curriculum``: a fraction of the steps (0: off) during which the
    localization target is trained on its prompt pruned to the ground-truth box grown by a
    margin that rises linearly to the whole image - the model first learns to read where the
    kept visual tokens are, then to find them among more and more tokens (dense afterwards);
    ``sparse_context_jitter``: the fraction of the sparse stream's rows whose ground-truth box
    is grown by a random number of token cells up to the whole image (0: every row sees exactly
    its box), so that stream also answers from imperfect boxes and from all visual tokens;
    ``sparse_first``: the first this many steps train the sparse stream alone (reading the
    lesion from its own tokens comes before finding it among all of them)."""

    steps: int = 0
    batch_size: int = 8
    micro_batch_size: Optional[int] = None
    lr: Optional[float] = None
    streams: tuple[str, ...] = ("localization", "sparse")
    reasoning: Optional[str] = None
    context_curriculum: float = 0.0
    sparse_context_jitter: float = 0.0
    sparse_first: int = 0

    def __post_init__(self):
        _non_negative(self.steps, "stages.warmup.steps")
        _positive(self.batch_size, "stages.warmup.batch_size")
        if self.micro_batch_size is not None:
            _positive(self.micro_batch_size, "stages.warmup.micro_batch_size")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"`stages.warmup.lr` must be > 0, got {self.lr}")
        if not 0.0 <= self.context_curriculum <= 1.0:
            raise ConfigError(f"`stages.warmup.context_curriculum` must be in [0, 1], got {self.context_curriculum}")
        _non_negative(self.sparse_first, "stages.warmup.sparse_first")
        if self.sparse_first > self.steps:
            raise ConfigError(f"`stages.warmup.sparse_first` ({self.sparse_first}) must be <= stages.warmup.steps ({self.steps})")
        if not 0.0 <= self.sparse_context_jitter <= 1.0:
            raise ConfigError(f"`stages.warmup.sparse_context_jitter` must be in [0, 1], got {self.sparse_context_jitter}")
        bad = [s for s in self.streams if s not in ("localization", "sparse")]
        if bad or not self.streams or len(set(self.streams)) != len(self.streams):
            raise ConfigError(f"`stages.warmup.streams` must be distinct names from [localization, sparse], "
                              f"got {list(self.streams)}")


@dataclass(frozen=True)
class RLStage:
    """A GRPO stage: ``steps`` rollout batches of ``questions_per_step`` questions (G
    localization rollouts each, and in the sparse stage G' sparse rollouts per localization
    rollout: ``method.advantages``); each batch is split into ``mini_batches`` optimizer
    steps, repeated for ``ppo_epochs`` epochs; ``micro_batch_size``: response rows per
    forward (per stream); ``lr`` overrides ``optim.lr``."""

    steps: int = 0
    questions_per_step: int = 2
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: Optional[int] = None
    lr: Optional[float] = None

    def check(self, name: str) -> None:
        _non_negative(self.steps, f"stages.{name}.steps")
        _positive(self.questions_per_step, f"stages.{name}.questions_per_step")
        _positive(self.ppo_epochs, f"stages.{name}.ppo_epochs")
        _positive(self.mini_batches, f"stages.{name}.mini_batches")
        if self.mini_batches > self.questions_per_step:
            raise ConfigError(f"`stages.{name}.mini_batches` ({self.mini_batches}) must be <= "
                              f"questions_per_step ({self.questions_per_step})")
        if self.micro_batch_size is not None:
            _positive(self.micro_batch_size, f"stages.{name}.micro_batch_size")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"`stages.{name}.lr` must be > 0, got {self.lr}")


@dataclass(frozen=True)
class StagesSection:
    warmup: WarmupStage = field(default_factory=WarmupStage)
    localization: RLStage = field(default_factory=RLStage)
    sparse: RLStage = field(default_factory=RLStage)

    def __post_init__(self):
        self.localization.check("localization")
        self.sparse.check("sparse")


@dataclass(frozen=True)
class EvalSection:
    """Greedy evaluation of both streams on the first ``samples`` validation records, ``at``
    ``start`` (the untrained model) and/or ``stage_end`` (after each stage); 0 samples: off.
    ``dense``: also answer the sparse stream's prompt from every visual token (dense accuracy
    of the same checkpoint)."""

    samples: int = 16
    batch_size: int = 16
    at: tuple[str, ...] = ("start", "stage_end")
    dense: bool = True

    def __post_init__(self):
        _non_negative(self.samples, "eval.samples")
        _positive(self.batch_size, "eval.batch_size")
        bad = [a for a in self.at if a not in ("start", "stage_end")]
        if bad:
            raise ConfigError(f"`eval.at` must name start and/or stage_end, got {list(self.at)}")


@dataclass(frozen=True)
class CheckpointSection:
    """``every``: save every this many steps within a stage (0: only at each stage's end,
    which is always saved); ``keep_last``: step checkpoints kept per stage (stage-end ones
    are kept); ``save_optimizer``: include the optimizer state (needed to resume mid-stage)."""

    every: int = 0
    keep_last: int = 2
    save_optimizer: bool = True

    def __post_init__(self):
        _non_negative(self.every, "checkpoint.every")
        _positive(self.keep_last, "checkpoint.keep_last")


@dataclass(frozen=True)
class TrainConfig:
    """The whole trainer config (see the module docstring)."""

    output_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    threads: Optional[int] = None
    stages: tuple[str, ...] = STAGES
    progress: bool = True
    plot: bool = True
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    method_config: str = "dualstream"
    method: Mapping[str, Any] = field(default_factory=dict)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimSection = field(default_factory=OptimSection)
    stages_config: StagesSection = field(default_factory=StagesSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def __post_init__(self):
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"`dtype` must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"`device` must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.threads is not None:
            _positive(self.threads, "threads")
        bad = [s for s in self.stages if s not in STAGES]
        if bad or len(set(self.stages)) != len(self.stages):
            raise ConfigError(f"`stages` must be distinct names from {list(STAGES)}, got {list(self.stages)}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order):
            raise ConfigError(f"`stages` must keep the order {list(STAGES)}, got {list(self.stages)}")
        if self.seed < 0:
            raise ConfigError(f"`seed` must be >= 0, got {self.seed}")

    # ---------------------------------------------------------------------------------
    def method_config_obj(self) -> MethodConfig:
        """The method config: ``method_config`` (a name in ``configs/`` or a path) with
        ``method`` deep-merged over it."""
        base = load_yaml(self.method_config)
        merged = _deep_merge(base, dict(self.method))
        try:
            return MethodConfig.from_dict(merged)
        except ValueError as e:
            msg = str(e).replace("`<method config>`", "`method`")
            raise ConfigError(f"method config ({self.method_config} + `method` overrides): {msg}") from None

    def to_dict(self) -> dict:
        """The config as plain data in the YAML layout (:func:`config_to_yaml_dict`)."""
        return config_to_yaml_dict(self)


def _deep_merge(base: Mapping, over: Mapping) -> dict:
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _to_plain(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _to_plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def config_to_yaml_dict(cfg: TrainConfig) -> dict:
    """The config as the YAML mapping it was read from (``stages`` holds the stage sections
    and the list of stages to run under ``stages.run``)."""
    d = _to_plain(cfg)
    sections = d.pop("stages_config")
    d["stages"] = {"run": d["stages"], **sections}
    return d


# --------------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["a.b=1", "c=[x, y]"]`` -> ``[(["a", "b"], 1), (["c"], ["x", "y"])]``; values are
    parsed as YAML (a bare word stays a string; ``1e-6`` is a float). ``ConfigError`` for an item without ``=``
    or an empty key."""
    import yaml

    out = []
    for item in items:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must be key=value (e.g. stages.localization.steps=3)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not key.strip() or any(not p for p in parts):
            raise ConfigError(f"override {item!r}: bad key {key!r}")
        try:
            value = yaml.load(raw, Loader=yaml_loader()) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value does not parse as YAML ({e.__class__.__name__})") from None
        out.append((parts, value))
    return out


def apply_overrides(data: dict, overrides: Sequence[tuple[list[str], Any]]) -> dict:
    """Sets each dotted key in a copy of ``data`` (creating mappings on the way). A key
    through a non-mapping value is an error naming it; unknown keys are caught when the
    config is built. ``stages=[...]`` sets the list of stages to run (``stages.run``)."""
    out = copy.deepcopy(data)
    for parts, value in overrides:
        if parts == ["stages"] and not isinstance(value, Mapping):
            parts = ["stages", "run"]
        node = out
        for k, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {'.'.join(parts)}: `{'.'.join(parts[:k + 1])}` is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _from_yaml_dict(data: Mapping) -> TrainConfig:
    data = dict(data)
    stages = data.pop("stages", None)
    if stages is None:
        stages = {}
    if isinstance(stages, (list, tuple)):
        stages = {"run": list(stages)}
    if not isinstance(stages, Mapping):
        raise ConfigError(f"`stages` must be a mapping (run, warmup, localization, sparse), got {stages!r}")
    stages = dict(stages)
    if "stages_config" in data:
        raise ConfigError("unknown config key(s) ['stages_config']; stage settings go under `stages`")
    run = stages.pop("run", None)
    if run is not None:
        data["stages"] = run
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown config key(s) {['stages.' + k for k in unknown]}; allowed under `stages`: "
                          f"{['run', *STAGES]}")
    data["stages_config"] = _build(StagesSection, stages, "stages")
    return _build(TrainConfig, data, "")


def load_train_config(
    path: Union[str, os.PathLike, None] = None,
    overrides: Sequence[str] = (),
    *,
    base: Optional[Mapping] = None,
) -> TrainConfig:
    """Reads a trainer config (a path, or a name in ``configs/``), applies ``key=value``
    overrides and validates everything. Errors (:class:`ConfigError`, a ``ValueError``)
    name the bad key. ``base``: a mapping used instead of a file."""
    if path is None and base is None:
        raise ConfigError("no config: pass --config FILE")
    data = dict(base) if base is not None else load_yaml(path)
    data = apply_overrides(data, parse_overrides(list(overrides)))
    cfg = _from_yaml_dict(data)
    cfg.method_config_obj()  # validate the merged method config now, not mid-run
    return cfg


def resolve_path(path: str, relative_to: Optional[Path] = None) -> Path:
    """``~`` expanded; a relative path is taken relative to ``relative_to`` (default: cwd)."""
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and relative_to is not None:
        p = relative_to / p
    return p
