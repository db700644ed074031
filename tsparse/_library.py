"""Loads the compiled extension `tsparse._C` (which registers the `torch.ops.tsparse` schemas
and kernels) and reports how it was built."""

from __future__ import annotations

import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.tsparse.*)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "tsparse: the compiled extension tsparse._C could not be loaded "
        f"({exc}). Build it with `make build` (or `pip install -e . --no-build-isolation`) "
        "against the torch in this environment."
    ) from exc


def build_info() -> dict:
    """How the extension was built.

    Returns a dict with at least ``version``, ``torch_version`` (the torch it was compiled
    against), ``cuda_kernels`` (bool), ``cuda_version`` (str or None) and
    ``cuda_arch_list`` (the ``TORCH_CUDA_ARCH_LIST`` used, e.g. ``"9.0a"``), plus
    ``torch_runtime_version`` (the torch imported now).
    """
    info = dict(_C.build_info())
    info["torch_runtime_version"] = torch.__version__
    return info


def cuda_kernels_available() -> bool:
    """True when the CUDA kernels were compiled in AND a CUDA device is usable now."""
    return bool(_C.build_info()["cuda_kernels"]) and torch.cuda.is_available()


def _check_torch_match() -> None:
    built = str(_C.build_info()["torch_version"]).split("+")[0]
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        warnings.warn(
            f"tsparse was compiled against torch {built} but torch {running} is imported; "
            "rebuild tsparse against this torch (`make build`)",
            RuntimeWarning,
            stacklevel=3,
        )


_check_torch_match()
