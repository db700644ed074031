"""tsparse: Hopper kernels for token-sparse multimodal RL training.

The ops live in :mod:`tsparse.ops` (one module per op family); each is a ``torch.ops.tsparse``
op with CPU and CUDA kernels, a fake kernel (torch.compile) and autograd where values flow.
Pure-PyTorch references of every op are in :mod:`tsparse.reference`.

Not imported here (they need transformers): :mod:`tsparse.dualstream` (the dual-stream method),
:mod:`tsparse.infer` (token-sparse inference), :mod:`tsparse.eval` (medical VQA evaluation) and
:mod:`tsparse.vtp` (grounded pruning and the visual-token pruning baselines).
"""

from ._library import build_info, cuda_kernels_available
from . import ops

__version__ = build_info()["version"]

__all__ = ["build_info", "cuda_kernels_available", "ops", "__version__"]
