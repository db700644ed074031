"""The dual-stream token-sparse method (ViToS, ICML 2026) as a library.

One policy, two streams (``shared/notes/method.md``): the localization stream sees every
visual token and writes reasoning, evidence boxes and an answer; the sparse-reasoning stream
answers again from only the visual tokens inside those boxes (the others fused into them).

Modules, by what they do:

* :mod:`.format` - output formats: strict checker (format reward), tolerant box parser
  (pruning), answer extraction, writers.
* :mod:`.rewards` - reward terms (format, IoU, accuracy, cross-feedback), composites, and
  verl's ``compute_score`` (by file path: :mod:`.reward_fn`).
* :mod:`.pruning` - Qwen2.5-VL pruning to the boxes (:func:`sparse_stream_inputs`), with the
  original M-RoPE positions, plus response extension and generation on the sparse inputs.
* :mod:`.advantages` - two-level GRPO advantages and the stream ids of the decoupled loss.
* :mod:`.rollout` - both streams' rollouts with HF ``generate`` (G per question, G' per
  localization response), responses cut at the first stop token.
* :mod:`.policy` - the training forward of both streams, the decoupled GRPO loss and the
  warm-up loss on tsparse's fused GRPO ops.
* :mod:`.data` - ViTAR-16K-format JSON, the synthetic scan dataset, chat messages.
* :mod:`.models` - the tiny offline Qwen2.5-VL + tokenizer, the processor, checkpoint loading.
* :mod:`.config` - ``configs/dualstream.yaml`` (prompts, format, rewards, pruning, grouping).

transformers is imported only when a model or processor is built.
"""

from . import advantages, config, data, format, models, policy, pruning, rewards, rollout
from .advantages import (
    LOCALIZATION,
    SPARSE,
    DualStreamAdvantages,
    dual_stream_advantages,
    expand_to_packed,
    expand_to_tokens,
    grpo_advantages,
)
from .config import (
    AdvantageConfig,
    FormatConfig,
    MethodConfig,
    PromptConfig,
    PruningConfig,
    RewardWeights,
    StreamPrompt,
    load_method_config,
)
from .data import (
    SyntheticScanConfig,
    VQASample,
    build_messages,
    ensure_synthetic_scans,
    generate_synthetic_scans,
    load_images,
    load_vitar_json,
    parse_options,
)
from .format import (
    STREAMS,
    BoxParse,
    FormatCheck,
    check_format,
    check_localization_format,
    check_sparse_format,
    extract_answer,
    format_localization_response,
    format_sparse_response,
    parse_boxes,
)
from .models import VLProcessor, build_tiny, load_model_and_processor
from .pruning import SparseInputs, extend_sparse_inputs, repeat_samples, sparse_generate, sparse_stream_inputs
from .rewards import (
    GroundTruth,
    RewardBreakdown,
    accuracy_reward,
    compute_score,
    cross_feedback_accuracy,
    format_reward,
    iou_reward,
    localization_reward,
    score_dual_stream,
    sparse_reward,
)

__all__ = [
    "advantages", "config", "data", "format", "models", "policy", "pruning", "rewards", "rollout",
    "LOCALIZATION", "SPARSE", "STREAMS",
    "DualStreamAdvantages", "dual_stream_advantages", "grpo_advantages", "expand_to_tokens", "expand_to_packed",
    "AdvantageConfig", "FormatConfig", "MethodConfig", "PromptConfig", "PruningConfig", "RewardWeights",
    "StreamPrompt", "load_method_config",
    "SyntheticScanConfig", "VQASample", "build_messages", "ensure_synthetic_scans", "generate_synthetic_scans",
    "load_images", "load_vitar_json", "parse_options",
    "BoxParse", "FormatCheck", "check_format", "check_localization_format", "check_sparse_format",
    "extract_answer", "format_localization_response", "format_sparse_response", "parse_boxes",
    "VLProcessor", "build_tiny", "load_model_and_processor",
    "SparseInputs", "extend_sparse_inputs", "repeat_samples", "sparse_generate", "sparse_stream_inputs",
    "GroundTruth", "RewardBreakdown", "accuracy_reward", "compute_score", "cross_feedback_accuracy",
    "format_reward", "iou_reward", "localization_reward", "score_dual_stream", "sparse_reward",
]
