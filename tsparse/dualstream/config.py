"""Configuration of the dual-stream method, read from YAML files in ``configs/``.

``configs/dualstream.yaml`` holds the prompts of both streams, the format limits, the reward
weights, the pruning options and the GRPO grouping; :func:`load_method_config` reads it into
a :class:`MethodConfig`. Every section is a frozen dataclass that rejects unknown keys and
bad values with an error naming the key (``rewards.localization.iou``).

Where configs are found: an existing file path is used as is; a bare name (``"dualstream"``,
``"models/tiny_qwen2_5_vl"``) is looked up in ``$TSPARSE_CONFIG_DIR`` when set, else in the
``configs/`` folder of the source tree this package lives in.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

__all__ = [
    "config_dir",
    "resolve_config_path",
    "load_yaml",
    "yaml_loader",
    "StreamPrompt",
    "PromptConfig",
    "FormatConfig",
    "RewardWeights",
    "PruningConfig",
    "AdvantageConfig",
    "MethodConfig",
    "load_method_config",
]

PathLike = Union[str, os.PathLike]


def config_dir() -> Path:
    """The folder bare config names resolve in: ``$TSPARSE_CONFIG_DIR``; else ``<repo>/configs``
    when this package runs from a source tree (editable install); else the copy of ``configs/``
    that a built wheel carries inside the package (``tsparse/_configs``, written by setup.py)."""
    env = os.environ.get("TSPARSE_CONFIG_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    repo = here.parents[2] / "configs"
    if repo.is_dir():
        return repo
    return here.parents[1] / "_configs"


def resolve_config_path(name_or_path: PathLike) -> Path:
    """An existing file path, or ``config_dir() / name`` (``.yaml`` added when missing).

    Raises ``FileNotFoundError`` naming both places tried.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"`name_or_path` must be a str or path, got {type(name_or_path).__name__}")
    p = Path(name_or_path)
    if p.is_file():
        return p
    base = config_dir()
    for cand in (base / p, base / (str(p) + ".yaml")):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"config {str(name_or_path)!r} not found as a file nor under {base}")


def yaml_loader():
    """PyYAML's ``SafeLoader`` reading numbers as YAML 1.2 does: ``1e-6`` (no dot) is a
    float, not the string PyYAML's YAML 1.1 rules make of it."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
                   r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."),
    )
    return Loader


def load_yaml(name_or_path: PathLike) -> dict:
    """Reads a YAML config (see :func:`resolve_config_path`) into a dict; ``ValueError`` naming
    the file when it is not UTF-8 text, not valid YAML, or its top level is not a mapping. Numbers such as ``1e-6`` are floats (:func:`yaml_loader`)."""
    import yaml

    path = resolve_config_path(name_or_path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = yaml.load(f, Loader=yaml_loader())
    except UnicodeDecodeError:
        raise ValueError(f"config {path}: not a UTF-8 text file (expected YAML)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
        raise ValueError(f"config {path}: not valid YAML ({what}{where})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path}: the top level must be a mapping, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------------------
# Validation helpers
def _check_keys(data: Any, cls, where: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ValueError(f"`{where}` must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"`{where}`: unknown key(s) {unknown}; allowed: {sorted(names)}")
    return data


def _number(value, where: str, *, lo: float = -math.inf, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{where}` must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo):
        raise ValueError(f"`{where}` must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    return float(value)


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{where}` must be a positive int, got {value!r}")
    return value


def _choice(value, options, where: str) -> str:
    if value not in options:
        raise ValueError(f"`{where}` must be one of {list(options)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamPrompt:
    """One stream's chat: ``system`` text (may be empty) and the ``user`` template, which
    must contain ``{question}``."""

    system: str = ""
    user: str = "{question}"

    def __post_init__(self):
        if not isinstance(self.system, str):
            raise ValueError(f"`system` must be a str, got {type(self.system).__name__}")
        if not isinstance(self.user, str) or "{question}" not in self.user:
            raise ValueError(f"`user` must be a str containing '{{question}}', got {self.user!r}")


@dataclass(frozen=True)
class PromptConfig:
    """The prompts of the localization and the sparse-reasoning stream."""

    localization: StreamPrompt
    sparse: StreamPrompt

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "prompts") -> "PromptConfig":
        _check_keys(data, cls, where)
        out = {}
        for name in ("localization", "sparse"):
            if name not in data:
                raise ValueError(f"`{where}.{name}` is missing")
            sub = _check_keys(data[name], StreamPrompt, f"{where}.{name}")
            try:
                out[name] = StreamPrompt(**sub)
            except ValueError as e:
                raise ValueError(f"`{where}.{name}`: {e}") from None
        return cls(**out)

    def for_stream(self, stream: str) -> StreamPrompt:
        """The prompt of ``stream`` (``"localization"`` or ``"sparse"``)."""
        if stream not in ("localization", "sparse"):
            raise ValueError(f"`stream` must be 'localization' or 'sparse', got {stream!r}")
        return getattr(self, stream)


@dataclass(frozen=True)
class FormatConfig:
    """Strict-format limits: ``max_boxes`` boxes at most; ``box_decimals`` in written targets."""

    max_boxes: int = 4
    box_decimals: int = 2

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "format") -> "FormatConfig":
        _check_keys(data, cls, where)
        d = {**dataclasses.asdict(cls()), **data}
        mb = _positive_int(d["max_boxes"], f"{where}.max_boxes")
        dec = _positive_int(d["box_decimals"], f"{where}.box_decimals")
        if dec > 6:
            raise ValueError(f"`{where}.box_decimals` must be at most 6, got {dec}")
        return cls(mb, dec)


_LOC_TERMS = ("format", "iou", "accuracy", "cross_accuracy", "sparsity")
_SPARSE_TERMS = ("format", "accuracy", "cross_accuracy")


@dataclass(frozen=True)
class RewardWeights:
    """Weights of each stream's reward terms (``reward = sum(weight * term)``).

    ``localization``: ``format``, ``iou``, ``accuracy``, ``cross_accuracy``, ``sparsity``;
    ``sparse``: ``format``, ``accuracy``, ``cross_accuracy``. Weights are finite and >= 0;
    a term missing from the mapping has weight 0.
    """

    localization: Mapping[str, float] = field(
        default_factory=lambda: {"format": 0.5, "iou": 1.0, "accuracy": 1.0, "cross_accuracy": 0.5}
    )
    sparse: Mapping[str, float] = field(
        default_factory=lambda: {"format": 0.5, "accuracy": 1.0, "cross_accuracy": 0.5}
    )

    def __post_init__(self):
        for stream, terms in (("localization", _LOC_TERMS), ("sparse", _SPARSE_TERMS)):
            w = getattr(self, stream)
            if not isinstance(w, Mapping):
                raise ValueError(f"`rewards.{stream}` must be a mapping, got {type(w).__name__}")
            unknown = sorted(set(w) - set(terms))
            if unknown:
                raise ValueError(f"`rewards.{stream}`: unknown term(s) {unknown}; allowed: {list(terms)}")
            full = {t: _number(w.get(t, 0.0), f"rewards.{stream}.{t}", lo=0.0) for t in terms}
            object.__setattr__(self, stream, full)

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "rewards") -> "RewardWeights":
        _check_keys(data, cls, where)
        return cls(**{k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()})

    def for_stream(self, stream: str) -> Mapping[str, float]:
        """The weights of ``stream`` (``"localization"`` or ``"sparse"``)."""
        if stream not in ("localization", "sparse"):
            raise ValueError(f"`stream` must be 'localization' or 'sparse', got {stream!r}")
        return getattr(self, stream)


@dataclass(frozen=True)
class PruningConfig:
    """How a localization response's boxes prune the sparse stream's visual tokens
    (see :func:`tsparse.dualstream.pruning.sparse_stream_inputs`).

    ``fuse``: the fusion method of the dropped tokens, one of
    :data:`tsparse.ops.FUSION_METHODS` (``none``, ``cosine_mean``, ``nearest_kept``,
    ``summary``); ``true`` / ``false`` (what the key used to hold) still mean ``cosine_mean`` /
    ``none`` and are stored as those names."""

    fuse: str = "cosine_mean"
    fallback: str = "full_image"
    box_scope: str = "sample"
    margin: float = 0.0
    min_coverage: float = 0.0
    padding_side: str = "left"

    def __post_init__(self):
        from ..ops.visual_tokens import fusion_method

        object.__setattr__(self, "fuse", fusion_method(self.fuse, "pruning.fuse"))
        _choice(self.fallback, ("full_image", "drop_image"), "pruning.fallback")
        _choice(self.box_scope, ("sample", "image"), "pruning.box_scope")
        _choice(self.padding_side, ("left", "right"), "pruning.padding_side")
        object.__setattr__(self, "margin", _number(self.margin, "pruning.margin", lo=0.0))
        mc = _number(self.min_coverage, "pruning.min_coverage", lo=0.0)
        if mc >= 1.0:
            raise ValueError(f"`pruning.min_coverage` must be < 1, got {mc}")
        object.__setattr__(self, "min_coverage", mc)

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "pruning") -> "PruningConfig":
        _check_keys(data, cls, where)
        return cls(**data)


@dataclass(frozen=True)
class AdvantageConfig:
    """Two-level GRPO grouping (see :mod:`tsparse.dualstream.advantages`)."""

    localization_group_size: int = 4
    sparse_group_size: int = 4
    sparse_group: str = "localization"
    epsilon: float = 1e-6
    norm_adv_by_std: bool = True

    def __post_init__(self):
        _positive_int(self.localization_group_size, "advantages.localization_group_size")
        _positive_int(self.sparse_group_size, "advantages.sparse_group_size")
        _choice(self.sparse_group, ("localization", "question"), "advantages.sparse_group")
        object.__setattr__(self, "epsilon", _number(self.epsilon, "advantages.epsilon", lo=0.0, lo_open=True))
        if not isinstance(self.norm_adv_by_std, bool):
            raise ValueError(f"`advantages.norm_adv_by_std` must be a bool, got {self.norm_adv_by_std!r}")

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "advantages") -> "AdvantageConfig":
        _check_keys(data, cls, where)
        return cls(**data)


@dataclass(frozen=True)
class MethodConfig:
    """Everything ``configs/dualstream.yaml`` holds."""

    prompts: PromptConfig
    format: FormatConfig = field(default_factory=FormatConfig)
    rewards: RewardWeights = field(default_factory=RewardWeights)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    advantages: AdvantageConfig = field(default_factory=AdvantageConfig)

    @classmethod
    def from_dict(cls, data: Mapping) -> "MethodConfig":
        """Builds the config from a mapping; ``prompts`` is required, other sections default."""
        _check_keys(data, cls, "<method config>")
        if "prompts" not in data:
            raise ValueError("`prompts` is missing (each stream's system and user prompt)")
        return cls(
            prompts=PromptConfig.from_dict(data["prompts"]),
            format=FormatConfig.from_dict(data.get("format", {})),
            rewards=RewardWeights.from_dict(data.get("rewards", {})),
            pruning=PruningConfig.from_dict(data.get("pruning", {})),
            advantages=AdvantageConfig.from_dict(data.get("advantages", {})),
        )


def load_method_config(name_or_path: Optional[PathLike] = None) -> MethodConfig:
    """Reads a method config (default: ``configs/dualstream.yaml``)."""
    return MethodConfig.from_dict(load_yaml("dualstream" if name_or_path is None else name_or_path))


#: the method config a trained checkpoint was trained with, next to its weights
CHECKPOINT_METHOD_FILE = "tsparse_method.yaml"


def save_method_config(method: MethodConfig, folder: PathLike) -> Path:
    """Writes ``method`` as ``<folder>/tsparse_method.yaml`` (the trainer does, into every
    checkpoint's ``model/``), so inference and evaluation use the prompts it was trained on."""
    import yaml

    path = Path(folder) / CHECKPOINT_METHOD_FILE
    path.write_text(yaml.safe_dump(dataclasses.asdict(method), sort_keys=False), encoding="utf-8")
    return path


def method_config_for_model(model_path: Optional[PathLike], name_or_path: Optional[PathLike] = None) -> MethodConfig:
    """The method config to run ``model_path`` with: ``name_or_path`` when given; else the
    ``tsparse_method.yaml`` a tsparse.train checkpoint carries (its training prompts - a model
    trained on one prompt wording does not follow another); else ``configs/dualstream.yaml``."""
    if name_or_path is None and model_path is not None:
        saved = Path(model_path) / CHECKPOINT_METHOD_FILE
        if saved.is_file():
            return load_method_config(saved)
    return load_method_config(name_or_path)
