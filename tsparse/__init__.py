"""tsparse: Hopper kernels for token-sparse multimodal RL training.

The ops live in :mod:`tsparse.ops` (one module per op family); each is a ``torch.ops.tsparse``
op with CPU and CUDA kernels, a fake kernel (torch.compile) and autograd where values flow.
Pure-PyTorch references of every op are in :mod:`tsparse.reference`.
"""

from ._library import build_info, cuda_kernels_available
from . import ops

__version__ = build_info()["version"]

__all__ = ["build_info", "cuda_kernels_available", "ops", "__version__"]
