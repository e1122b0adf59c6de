"""Error compensation inside the GGUF grids (autosquash.compress.gptq) and the covariances it weighs by."""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import gguf.quants
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from autosquash.compress import gptq
from autosquash.compress.calibrate import (
    HEAD,
    HEAD_COVARIANCE,
    Compensation,
    cached_covariances,
    collect_covariances,
    collect_inputs,
    collect_stats,
    compensation_of,
)
from autosquash.compress.gptq import quantize_compensated, quantize_compensated_no_worse
from autosquash.compress.quantize import quantize, quantize_no_worse
from autosquash.errors import AutosquashError
from autosquash.formats.codecs import dequantize
from tests.compress.quantize.test_kernels import compiled_and_torch

# Every type with a grid (the block types and the K-quants; the ternary types ride along).
TYPES = ("Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "Q4_0", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "TQ2_0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROWS, COLS, TOKENS = 32, 512, 1024


def _weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(seed))


def _inputs(correlated: bool, seed: int = 1) -> torch.Tensor:
    """(tokens, in) activations with per-channel scales spread like a model's; mixed channels if `correlated`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, COLS, generator=g)
    if correlated:
        x = x @ (torch.randn(COLS, COLS, generator=g) / COLS**0.5) + 0.3 * torch.randn(TOKENS, COLS, generator=g)
    return x * torch.exp(0.5 * torch.randn(COLS, generator=g))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def _output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ|| / ||X Wᵀ||."""
    return float((x @ (w - wq).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("type_name", TYPES)
def test_bytes_decode_like_gguf(type_name: str) -> None:
    w, h = _weight(), _hessian(_inputs(correlated=True))
    q = quantize_compensated(w, type_name, h)
    assert q.type == type_name and q.shape == (ROWS, COLS) and q.data.dtype == np.uint8
    assert q.data.shape == gguf.quants.quant_shape_to_byte_shape(q.shape, GGMLQuantizationType[type_name])
    theirs = gguf.quants.dequantize(q.data, GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(dequantize(q).numpy().view(np.uint32), theirs.view(np.uint32))


def _plain_and_compensated(type_name: str, correlated: bool) -> tuple[float, float]:
    """Output errors of the importance-weighted and the compensated quantization on the test inputs."""
    w, x = _weight(), _inputs(correlated=correlated)
    h = _hessian(x)
    plain = _output_error(w, dequantize(quantize(w, type_name, h.diagonal())), x)
    return plain, _output_error(w, dequantize(quantize_compensated(w, type_name, h)), x)


@pytest.mark.parametrize("type_name", TYPES)
def test_correlated_inputs_lower_the_output_error(type_name: str) -> None:
    plain, compensated = _plain_and_compensated(type_name, correlated=True)
    assert compensated < 0.9 * plain, (plain, compensated)


@pytest.mark.parametrize("type_name", TYPES)
def test_uncorrelated_inputs_are_no_worse(type_name: str) -> None:
    plain, compensated = _plain_and_compensated(type_name, correlated=False)
    assert compensated <= 1.01 * plain, (plain, compensated)


@pytest.mark.parametrize("type_name", TYPES)
def test_a_diagonal_hessian_gives_the_plain_bytes(type_name: str) -> None:
    """Nothing to spread: the scale search and the codes are exactly `quantize`'s with importance diag(H)."""
    w, d = _weight(), _hessian(_inputs(correlated=True)).diagonal()
    plain = quantize(w, type_name, d)
    np.testing.assert_array_equal(quantize_compensated(w, type_name, torch.diag(d)).data, plain.data)


def _row_errors(w: torch.Tensor, q, h: torch.Tensor) -> torch.Tensor:
    e = dequantize(q) - w
    return ((e @ h) * e).sum(-1)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_1", "Q4_0", "IQ4_NL", "Q4_K"])
@pytest.mark.parametrize("unseen_input", [False, True])
def test_no_worse_compensation_takes_the_better_row(type_name: str, unseen_input: bool, monkeypatch) -> None:
    # Each row is compensated or not, whichever has the lower output error by H; on correlated inputs most
    # rows gain. Compared in slices of 5 rows (as a 1B model's table is, in bigger ones), across their ends.
    # The compensated rows' errors come from the sweep (w - ŵ = e U) and the plain ones' from the Cholesky
    # factor of the damped H, each less the damping; an input calibration never fed counts nothing, as by H.
    monkeypatch.setattr("autosquash.compress.quantize._CHUNK_VALUES", 5 * COLS)
    monkeypatch.setattr("autosquash.compress.gptq._SWEEP_VALUES", 5 * COLS)
    monkeypatch.setattr("autosquash.compress.gptq._MIN_SLICE_ROWS", 1)
    x = _inputs(correlated=True)
    if unseen_input:
        x[:, 40] = 0
    w, h = _weight(), _hessian(x)
    imp = h.diagonal()
    best = quantize_compensated_no_worse(w, type_name, h, imp)
    plain, comp = quantize_no_worse(w, type_name, imp), quantize_compensated(w, type_name, h, imp)
    got, e_plain, e_comp = (_row_errors(w, q, h) for q in (best, plain, comp))
    torch.testing.assert_close(got, torch.minimum(e_plain, e_comp), rtol=0, atol=0)
    assert float(got.sum()) < 0.9 * float(e_plain.sum())


@pytest.mark.parametrize("type_name", TYPES)
def test_the_compiled_sweep_errs_as_the_torch_sweep(type_name: str) -> None:
    """A CPU's sweep (compiled, a run of columns at a time over tiles of rows) against the torch ops a GPU
    runs: the output error by H agrees within 2 % and most rows' bytes are the same. Measured over seeds 0-3:
    ratios 0.993-1.010 (Q6_K and Q5_K the widest; the scale searches sum in another order, and a near-tied
    code that flips changes every later column's update), 81-100 % of rows identical but for Q8_0, whose 255
    levels tie most often: at least 50 % on the machine this was written on, 44-53 % on an AMD EPYC (the
    compiled sums' order follows the CPU's vectors), so its bound is half that."""
    w, h = _weight(2), _hessian(_inputs(correlated=True, seed=3))
    compiled, plain = compiled_and_torch(quantize_compensated, w, type_name, h)
    errors = [float(_row_errors(w, q, h).sum()) for q in (compiled, plain)]
    assert errors[0] == pytest.approx(errors[1], rel=0.02)
    least = 0.25 if type_name == "Q8_0" else 0.5
    assert float(np.all(compiled.data == plain.data, axis=-1).mean()) >= least


def _slices_of_8_rows(monkeypatch) -> None:
    for name in ("_SWEEP_VALUES", "_SWEEP_VALUES_COMPILED"):
        monkeypatch.setattr(f"autosquash.compress.gptq.{name}", 8 * COLS)
    monkeypatch.setattr("autosquash.compress.gptq._MIN_SLICE_ROWS", 1)


def test_slices_that_err_little_by_the_weighted_encoding_keep_it(monkeypatch) -> None:
    """`min_error`: a slice whose weighted encoding errs less than that share of its energy, by diag(H), is not
    compensated (a Q8_0 table errs about 1e-5; compensation would save little); the others are."""
    _slices_of_8_rows(monkeypatch)
    w, h = _weight(), _hessian(_inputs(correlated=True))
    w[8:16] = dequantize(quantize(w[8:16], "Q4_0"))  # one slice of 8 rows already on the grid: it errs 0
    imp = h.diagonal()
    plain, comp = quantize_no_worse(w, "Q4_0", imp), quantize_compensated_no_worse(w, "Q4_0", h, imp)
    swept = []
    sweep = gptq._sweep
    monkeypatch.setattr(gptq, "_sweep", lambda g, x, *a: swept.append(x[:, 0].clone()) or sweep(g, x, *a))
    got = quantize_compensated_no_worse(w, "Q4_0", h, imp, min_error=1e-12)
    assert torch.equal(torch.cat(swept), torch.cat([w[:8, 0], w[16:, 0]]))  # all slices but the one on the grid
    np.testing.assert_array_equal(got.data, comp.data)
    np.testing.assert_array_equal(got.data[8:16], plain.data[8:16])
    np.testing.assert_array_equal(quantize_compensated_no_worse(w, "Q4_0", h, imp, min_error=1.0).data, plain.data)


def test_slices_on_two_threads_give_the_bytes_of_one(monkeypatch) -> None:
    """A table's slices run one per torch thread (for_each_slice); rows are independent, so the bytes
    are those of one thread taking the same slices in turn."""
    _slices_of_8_rows(monkeypatch)
    w, h = _weight(), _hessian(_inputs(correlated=True))
    one = quantize_compensated_no_worse(w, "IQ4_NL", h, h.diagonal())
    torch.set_num_threads(2)
    try:
        two = quantize_compensated_no_worse(w, "IQ4_NL", h, h.diagonal())
    finally:
        torch.set_num_threads(1)
    np.testing.assert_array_equal(one.data, two.data)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q5_1", "Q4_0"])
def test_no_worse_compensation_keeps_a_weight_on_the_grid(type_name: str) -> None:
    """A table already in the type (SmolLM2's Q8_0 token table) comes back exactly, whatever H says."""
    w = dequantize(quantize(_weight(), type_name))
    h = _hessian(_inputs(correlated=True))
    q = quantize_compensated_no_worse(w, type_name, h, h.diagonal())
    torch.testing.assert_close(dequantize(q), w, rtol=0, atol=0)


def test_deterministic_and_importance_is_separate_from_the_hessian() -> None:
    w, h = _weight(), _hessian(_inputs(correlated=True))
    a, b = quantize_compensated(w, "Q4_K", h), quantize_compensated(w, "Q4_K", h)
    np.testing.assert_array_equal(a.data, b.data)
    # Default importance is diag(H); a given one changes the scale search only.
    np.testing.assert_array_equal(quantize_compensated(w, "Q4_K", h, h.diagonal().clone()).data, a.data)
    other = quantize_compensated(w, "Q4_K", h, torch.ones(COLS))
    assert not np.array_equal(other.data, a.data)


def test_inputs_never_seen_take_and_give_no_error() -> None:
    """A zero row and column of H (a channel calibration never fed): that column is coded as plain, finite."""
    w, x = _weight(), _inputs(correlated=True)
    x[:, 40] = 0
    h = _hessian(x)
    q = dequantize(quantize_compensated(w, "Q4_0", h))
    assert torch.isfinite(q).all()
    plain = dequantize(quantize(w, "Q4_0", h.diagonal()))
    assert _output_error(w, q, x) < _output_error(w, plain, x)
    assert (q[:, 40] - w[:, 40]).abs().max() < 0.5 * w.abs().max()


def test_float_types_are_written_as_quantize_writes_them() -> None:
    w, h = _weight(), _hessian(_inputs(correlated=True))
    for t in ("F16", "F32"):
        np.testing.assert_array_equal(quantize_compensated(w, t, h).data, quantize(w, t).data)


def test_lattice_types_are_written_as_quantize_writes_them_with_the_importance() -> None:
    """IQ3_S .. IQ2_XXS code groups of 4 or 8 columns jointly: no column-by-column compensation, but the
    importance (by default diag(H)) still weighs their search."""
    w, h = _weight(), _hessian(_inputs(correlated=True))
    for t in ("IQ3_S", "IQ2_XXS"):
        np.testing.assert_array_equal(quantize_compensated(w, t, h).data, quantize(w, t, h.diagonal()).data)
        imp = torch.rand(COLS)
        np.testing.assert_array_equal(quantize_compensated(w, t, h, imp).data, quantize(w, t, imp).data)


def test_bad_hessians_are_refused() -> None:
    w = _weight()
    with pytest.raises(AutosquashError, match="shape"):
        quantize_compensated(w, "Q4_0", torch.eye(COLS - 32))
    bad = torch.eye(COLS)
    bad[3, 3] = float("nan")
    with pytest.raises(AutosquashError, match="finite"):
        quantize_compensated(w, "Q4_0", bad)
    with pytest.raises(AutosquashError, match="multiple of 256"):
        quantize_compensated(torch.randn(4, 288), "Q4_K", torch.eye(288))


def test_covariances_are_shared_by_linears_fed_the_same_input(tiny_model, tiny_batch) -> None:
    h = collect_covariances(tiny_model, tiny_batch)
    stats = collect_stats(tiny_model, tiny_batch)
    assert set(h) == set(stats) - {HEAD, HEAD_COVARIANCE}  # the block linears' (the head's input: calibrate's)
    blk = "model.layers.1"
    assert h[f"{blk}.self_attn.q_proj"] is h[f"{blk}.self_attn.k_proj"] is h[f"{blk}.self_attn.v_proj"]
    assert h[f"{blk}.mlp.gate_proj"] is h[f"{blk}.mlp.up_proj"]
    assert h[f"{blk}.self_attn.o_proj"] is not h[f"{blk}.self_attn.q_proj"]
    paths = [f"{blk}.self_attn.k_proj", f"{blk}.mlp.down_proj"]
    seen = collect_inputs(tiny_model, tiny_batch, paths)
    for p in paths:
        torch.testing.assert_close(h[p], seen[p].T @ seen[p] / seen[p].shape[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[p].diagonal(), stats[p], rtol=1e-5, atol=1e-7)


def test_covariance_files_hold_each_matrix_once_and_ship_whole(tiny_model, tiny_batch, tmp_path) -> None:
    one_pass = collect_covariances(tiny_model, tiny_batch)
    # A budget of one byte: a pass per block, each ending after its block; the matrices come out the same.
    cov = cached_covariances(tiny_model, tiny_batch, "tiny", tmp_path, pass_bytes=1)
    assert len(list(cov.folder.glob("shard-*.safetensors"))) == tiny_model.config.num_hidden_layers
    assert set(one_pass) == set(cov.index)
    for path, h in one_pass.items():
        assert torch.equal(cov.get(path), h), path
    blk = "model.layers.0"
    assert cov.index[f"{blk}.self_attn.q_proj"] == cov.index[f"{blk}.self_attn.v_proj"]
    assert cov.index[f"{blk}.mlp.gate_proj"] == cov.index[f"{blk}.mlp.up_proj"]
    assert cached_covariances(tiny_model, tiny_batch, "tiny", tmp_path).folder == cov.folder  # read back
    shipped = pickle.loads(pickle.dumps(cov))  # as Ray ships it: the arrays travel, not the folder's name alone
    assert shipped.arrays is not None and shipped.digest == cov.digest
    for path, h in one_pass.items():
        assert torch.equal(shipped.get(path), h), path
    assert cov.get("model.layers.9.mlp.down_proj") is None


def test_stats_carry_their_compensation_through_pickling(tiny_model, tiny_batch, tmp_path) -> None:
    stats = collect_stats(tiny_model, tiny_batch)
    assert compensation_of(stats) is None and compensation_of({}) is None
    stats.compensation = Compensation(cached_covariances(tiny_model, tiny_batch, "tiny", tmp_path), 0.1)
    back = pickle.loads(pickle.dumps(stats))
    assert set(back) == set(stats) and compensation_of(back).key == stats.compensation.key
    cols = torch.tensor([0, 5, 9])
    path = "model.layers.1.mlp.down_proj"
    assert torch.equal(compensation_of(back).hessian(path, cols), stats.compensation.hessian(path)[cols][:, cols])


def test_token_normalized_covariances_weigh_every_token_alike(tiny_model, tiny_batch) -> None:
    path = "model.layers.1.mlp.down_proj"
    x = collect_inputs(tiny_model, tiny_batch, [path])[path]
    h = collect_covariances(tiny_model, tiny_batch, [path], token_normalized=True)[path]
    xn = x / x.square().mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(h, xn.T @ xn / x.shape[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.diagonal().mean(), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_lower_product_norms_stop_a_row_only_past_its_limit() -> None:
    """|e L|² per row: a row under its limit gets its whole sum (as e @ L gives it); a row past it stops early
    with a partial sum that is past it too, so comparing either with the limit decides as the whole sum would."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 300, generator=g)
    low = torch.linalg.cholesky(a @ a.T / 300 + torch.eye(300))
    e = torch.randn(64, 300, generator=g)
    whole = (e @ low).square().sum(-1)
    limit = whole * torch.where(torch.arange(64) % 2 == 0, 1.01, 0.2)  # even rows stay under, odd ones pass
    got = gptq._lower_product_norms(e, low, limit)
    assert torch.allclose(got[::2], whole[::2], rtol=1e-5)
    assert bool((got[1::2] > limit[1::2]).all())
    assert bool((got[1::2] < whole[1::2] * 0.999).any())  # some stopped before their last block
