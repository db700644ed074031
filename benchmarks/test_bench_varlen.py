"""pytest-benchmark entries for varlen packing and the verl-style baseline (`make bench`)."""

from __future__ import annotations

import pytest

from tsparse import reference as ref
from tsparse.ops import pack_batch, pack_varlen, unpack_varlen

from .bench_varlen import _verl_style_pack, make_batch
from .common import BENCH_DEVICE as DEVICE
from .common import synced as _run


@pytest.fixture(scope="module")
def batch():
    mask, keep, ids, pos, x = make_batch(DEVICE, batch=4, seqlen=1024, hidden=3584, image=512)
    kept = mask.bool() & keep
    return dict(mask=mask, keep=keep, ids=ids, pos=pos, x=x, total=int(kept.sum()), longest=int(kept.sum(1).max()))


@pytest.mark.benchmark(group="pack hidden")
def test_pack_tsparse(benchmark, batch):
    benchmark(_run(lambda: pack_varlen(batch["x"], batch["mask"], keep=batch["keep"], total=batch["total"],
                                       max_seqlen=batch["longest"])))


@pytest.mark.benchmark(group="pack hidden")
def test_pack_reference(benchmark, batch):
    benchmark(_run(lambda: ref.pack_varlen_ref(batch["x"], batch["mask"], batch["keep"])))


@pytest.mark.benchmark(group="unpack hidden")
def test_unpack_tsparse(benchmark, batch):
    p = pack_varlen(batch["x"], batch["mask"], keep=batch["keep"])
    b, l = batch["mask"].shape
    benchmark(_run(lambda: unpack_varlen(p.values, p.indices, b, l)))


@pytest.mark.benchmark(group="unpack hidden")
def test_unpack_reference(benchmark, batch):
    p = pack_varlen(batch["x"], batch["mask"], keep=batch["keep"])
    b, l = batch["mask"].shape
    benchmark(_run(lambda: ref.unpack_varlen_ref(p.values, p.indices, b, l)))


@pytest.mark.benchmark(group="micro-batch pack")
def test_pack_batch_tsparse(benchmark, batch):
    benchmark(_run(lambda: pack_batch(batch["ids"], batch["mask"], batch["pos"], keep=batch["keep"],
                                      total=batch["total"], max_seqlen=batch["longest"], inputs_embeds=batch["x"])))


@pytest.mark.benchmark(group="micro-batch pack")
def test_pack_batch_verl_style(benchmark, batch):
    benchmark(_run(lambda: _verl_style_pack(batch["ids"], batch["mask"], batch["pos"], batch["x"], batch["keep"])))
