"""The variant store: compressed layers on disk that another worker, a resumed search or an export reads
back instead of making them again, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import collect_stats
from autosquash.compress.plan import Plan
from autosquash.compress.store import VariantStore, scope_digest
from autosquash.formats.codecs import QuantizedTensor
from tests.conftest import every_form_plan


def _same(a, b) -> bool:
    if isinstance(a, QuantizedTensor):
        return a.type == b.type and a.shape == b.shape and np.array_equal(a.data, b.data)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if a is None:
        return b is None
    return a.form == b.form and _same(a.parts, b.parts)


@pytest.fixture
def made(tiny_model, tiny_arch, tiny_batch, tmp_path):
    """A plan with every form and both prunings, built once through a store."""
    stats = collect_stats(tiny_model, tiny_batch)
    store = VariantStore(tmp_path / "variants", 1 << 30)
    cache = VariantCache(max_bytes=1 << 30, store=store)
    logits = compress(tiny_model, tiny_arch, every_form_plan(), stats, cache)(tiny_batch).logits
    return stats, cache, logits


def test_a_second_worker_reads_every_variant_back_instead_of_making_it(
    made, tiny_model, tiny_arch, tiny_batch, tmp_path
):
    stats, first, logits = made
    assert first.misses > 0 and first.stored_hits == 0
    second = VariantCache(max_bytes=1 << 30, store=VariantStore(tmp_path / "variants", 1 << 30))
    again = compress(tiny_model, tiny_arch, every_form_plan(), stats, second)(tiny_batch).logits
    assert second.misses == 0 and second.stored_hits == first.misses
    assert torch.equal(again, logits)
    for key, value in first._items.items():  # selections (index tuples with None), every form's parts
        assert _same(value, second._items[key]), key


def test_a_full_store_keeps_nothing_more_and_the_trial_still_builds(tiny_model, tiny_arch, tiny_batch, tmp_path):
    stats = collect_stats(tiny_model, tiny_batch)
    store = VariantStore(tmp_path / "variants", 1000)  # smaller than any quantized matrix here
    cache = VariantCache(max_bytes=1 << 30, store=store)
    compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q8_0"), stats, cache)
    assert store.nbytes <= 1000
    assert len(list((tmp_path / "variants").glob("*.npz"))) < cache.misses


def test_an_unreadable_file_is_made_again(made, tiny_model, tiny_arch, tiny_batch, tmp_path):
    stats, first, logits = made
    files = sorted((tmp_path / "variants").glob("*.npz"))
    files[0].write_bytes(b"not an archive")
    cache = VariantCache(max_bytes=1 << 30, store=VariantStore(tmp_path / "variants", 1 << 30))
    again = compress(tiny_model, tiny_arch, every_form_plan(), stats, cache)(tiny_batch).logits
    assert cache.misses == 1 and torch.equal(again, logits)
    assert not list((tmp_path / "variants").glob("*.tmp"))  # written whole, then renamed


def test_the_scope_tells_apart_weights_dtypes_and_statistics(tiny_batch):
    stats = {"a": torch.ones(4)}
    base = scope_digest("m", 0, "float32", stats)
    assert base == scope_digest("m", 0, "float32", {"a": torch.ones(4)})
    assert (
        len(
            {
                base,
                scope_digest("m", 1, "float32", stats),
                scope_digest("m", 0, "bfloat16", stats),
                scope_digest("m", 0, "float32", {"a": torch.full((4,), 2.0)}),
            }
        )
        == 4
    )
