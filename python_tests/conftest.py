"""Shared test fixtures: the devices to run on (CPU always, CUDA when a GPU is usable) and
fresh random seeds (a new base seed every session; reproduce with TSPARSE_TEST_SEED=<seed>)."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

import tsparse

HAS_CUDA = tsparse.cuda_kernels_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and tsparse's CUDA kernels")
BASE_SEED = int(os.environ.get("TSPARSE_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return [
        f"tsparse test seed: TSPARSE_TEST_SEED={BASE_SEED}",
        f"tsparse build: {tsparse.build_info()}; CUDA tests {'run' if HAS_CUDA else 'skipped (no GPU)'}",
    ]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize(
            "device",
            [pytest.param("cpu"), pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])],
        )


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    yield


# --------------------------------------------------------------------------------------
# Dual-stream fixtures: the tiny random Qwen2.5-VL and a few synthetic scans (built offline
# once per session; tests must not change the shared model - build a fresh one to train).
@pytest.fixture(scope="session")
def tiny_vl():
    pytest.importorskip("transformers")
    from tsparse.dualstream.models import build_tiny

    return build_tiny()


@pytest.fixture(scope="session")
def synthetic_samples(tmp_path_factory):
    """``{"one": [8 single-image 224-px samples], "two": [4 two-view 112-px samples]}``."""
    from tsparse.dualstream.data import SyntheticScanConfig, ensure_synthetic_scans, load_vitar_json

    root = tmp_path_factory.mktemp("synthetic_scans")
    one = ensure_synthetic_scans(root, SyntheticScanConfig(image_size=224, splits={"train": 8}))
    two = ensure_synthetic_scans(root, SyntheticScanConfig(image_size=112, images_per_sample=2, splits={"train": 4}))
    return {"one": load_vitar_json(one["train"]), "two": load_vitar_json(two["train"])}
