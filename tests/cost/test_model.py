"""The phone cost model against DESIGN.md §4's figures and the measured rows it must reproduce."""

from pathlib import Path

import pytest

from autosquash.compress.plan import Plan, deployed_tensors
from autosquash.compress.recipes import llama_cpp_mixture
from autosquash.cost import estimate, format_report, kv_cache_bytes_per_token, load_phone
from autosquash.cost.fit import fit_profile, predict
from autosquash.cost.model import CostReport
from autosquash.errors import AutosquashError
from autosquash.models.arch import Arch
from scripts.fit_phone_profile import ROWS as S25_ROWS
from scripts.fit_phone_profile import decode_rows

CONFIGS = Path(__file__).parent / "configs"
MIB = 2**20
GIB = 2**30


def arch(name: str) -> Arch:
    return Arch.from_json(CONFIGS / name)


def report(name: str, plan_of, phone: str, **kw) -> CostReport:
    a = arch(name)
    return estimate(a, deployed_tensors(a, plan_of(a)), load_phone(phone), **kw)


def f16(a: Arch) -> Plan:
    return Plan.uniform(a, "F16")


def q4_k_m(a: Arch) -> Plan:
    """llama.cpp's Q4_K_M recipe as a plan."""
    return llama_cpp_mixture(a, "Q4_K_M")


def test_llama_8b_f16_on_iphone_16() -> None:
    r = report("Llama-3.1-8B", f16, "iphone-16")
    # 8.03 B parameters at 2 bytes are 14.96 GiB; the band allows for norms and counting slips.
    assert 14 * GIB <= r.weights_bytes <= 16 * GIB
    assert not r.fits and r.peak_memory_bytes > r.app_memory_limit_bytes
    # DESIGN.md §4: about 15-16 GB read per token at about 6 pJ/bit is about 0.8 J; the band is
    # wide enough for the embedding table (read one row at a time) and the KV cache.
    assert 0.6 <= r.dram_energy_j_per_token <= 1.0
    assert r.energy_j_per_token > r.dram_energy_j_per_token
    assert r.energy_j_per_token == pytest.approx(
        r.dram_energy_j_per_token + r.compute_energy_j_per_token + r.static_energy_j_per_token, rel=1e-12
    )  # exact sum up to float rounding
    assert r.bits_per_weight == 16.0  # every matrix is F16: exact


def test_q8_0_is_about_0_53_of_f16() -> None:
    a = arch("Llama-3.1-8B")
    phone = load_phone("iphone-16")
    f16_bytes = estimate(a, deployed_tensors(a, f16(a)), phone).weights_bytes
    q8 = estimate(a, deployed_tensors(a, Plan.uniform(a, "Q8_0")), phone)
    # 8.5 / 16 = 0.531 bits ratio; ±0.01 for the F32 norms, which stay unquantized.
    assert q8.weights_bytes / f16_bytes == pytest.approx(8.5 / 16, abs=0.01)
    assert q8.bits_per_weight == 8.5  # every row of this model is a whole number of Q8_0 blocks: exact
    # F16 embedding and output tables raise the whole model's average but not the blocks'.
    mixed = estimate(a, deployed_tensors(a, Plan.uniform(a, "Q4_0", embed_quant="F16")), phone)
    assert mixed.block_bits_per_weight == 4.5 < mixed.bits_per_weight


def test_kv_cache_llama_8b() -> None:
    a = arch("Llama-3.1-8B")
    # 2 (K and V) * 32 layers * 8 KV heads * 128 dims * 2 bytes: exactly 128 KiB per token.
    assert kv_cache_bytes_per_token(a, "F16") == 128 * 1024
    r = report("Llama-3.1-8B", f16, "iphone-16", context_tokens=512, prompt_tokens=128)
    assert r.kv_cache_bytes == 64 * MIB  # DESIGN.md §4: a measured 64 MB at 512 tokens
    # Q8_0 stores 32 values in 34 bytes: exact.
    assert kv_cache_bytes_per_token(a, "Q8_0") == 128 * 1024 * 34 // 64


def test_q4_k_m_sizes_match_llama_cpp_files() -> None:
    # llama.cpp reports 4.58 GiB of tensors for Llama-3.1-8B Q4_K_M; ±1 % covers the recipe
    # approximation (llama.cpp has further per-architecture exceptions).
    assert report("Llama-3.1-8B", q4_k_m, "galaxy-s25-ultra").weights_bytes / GIB == pytest.approx(4.58, rel=0.01)


@pytest.mark.parametrize(("model", "pte_mib"), [("Llama-3.2-1B", 2358), ("Llama-3.2-3B", 6129)])
def test_bf16_sizes_match_executorch_files(model: str, pte_mib: int) -> None:
    # Llama 3.2 model card: the BF16 .pte files; ±1 % for the file's program and metadata.
    assert report(model, f16, "oneplus-12").weights_bytes / MIB == pytest.approx(pte_mib, rel=0.01)


def test_the_s25_profile_holds_the_fit_of_its_measured_rows() -> None:
    """scripts/fit_phone_profile.py fits the profile's four FITTED constants; the YAML holds them rounded."""
    phone = load_phone("galaxy-s25-ultra")
    fitted = fit_profile(decode_rows(), phone.peak_bandwidth_bytes_per_s, phone.mac_energy_j)
    for key, value in fitted.items():
        assert getattr(phone, key) == pytest.approx(value, rel=0.005), key  # rounded to 3 significant digits


@pytest.mark.parametrize("left_out", range(len(S25_ROWS)), ids=[m for m, _, _ in S25_ROWS])
def test_s25_rows_left_out_of_the_fit_are_predicted_within_the_stated_bounds(left_out: int) -> None:
    """Fitted on the other two rows, the third row's speed is within 25 % (measured: -9 %, +7 %, -21 %) and its
    energy within 75 % (measured: +19 %, -13 %, +69 %). Energy is that loose because two rows fit two constants
    exactly, and Qwen2-0.5B's J/token, extrapolated from the 3B and 8B rows, leans wholly on the static power
    they imply; with all three rows in the fit each row's energy is within 25 % (the profile's own test below)."""
    phone = load_phone("galaxy-s25-ultra")
    rows = decode_rows()
    rest = fit_profile(rows[:left_out] + rows[left_out + 1 :], phone.peak_bandwidth_bytes_per_s, phone.mac_energy_j)
    tps, joules = predict(rows[left_out], rest, phone.peak_bandwidth_bytes_per_s, phone.mac_energy_j)
    assert tps == pytest.approx(rows[left_out].tokens_per_s, rel=0.25)
    assert joules == pytest.approx(rows[left_out].j_per_token, rel=0.75)


@pytest.mark.parametrize(("model", "tokens_per_s", "j_per_token"), S25_ROWS)
def test_the_s25_profile_prices_its_own_rows(model: str, tokens_per_s: float, j_per_token: float) -> None:
    """In sample (the constants are fitted to these rows): the shape of the model (bytes, MACs, time) across a
    16x range of model size leaves each row within 25 %."""
    r = report(model, q4_k_m, "galaxy-s25-ultra")
    assert r.decode_tokens_per_s == pytest.approx(tokens_per_s, rel=0.25)
    assert r.energy_j_per_token == pytest.approx(j_per_token, rel=0.25)
    assert r.fits


# ExecuTorch BF16 on a OnePlus 12 (Llama 3.2 model card): model, decode tok/s, peak RSS in MB.
# The same table's .pte sizes match MiB (see above), so its MB are read as MiB.
ONEPLUS_ROWS = [("Llama-3.2-1B", 19.2, 3185), ("Llama-3.2-3B", 7.6, 7419)]


@pytest.mark.parametrize(("model", "tokens_per_s", "peak_mib"), ONEPLUS_ROWS)
def test_calibration_oneplus_12(model: str, tokens_per_s: float, peak_mib: float) -> None:
    r = report(model, f16, "oneplus-12")  # BF16 takes 2 bytes like F16
    # ±25 %: the profile keeps DESIGN.md's physical defaults (eta 0.6, no fitting), so these rows
    # are an out-of-sample check; runtime memory beside weights and KV cache is sized as llama.cpp sizes its
    # buffers, which ExecuTorch need not match.
    assert r.decode_tokens_per_s == pytest.approx(tokens_per_s, rel=0.25)
    assert r.peak_memory_bytes / MIB == pytest.approx(peak_mib, rel=0.25)


def test_decode_reads_one_embedding_row_but_a_whole_tied_head() -> None:
    phone = load_phone("iphone-16")
    untied = arch("Llama-3.1-8B")
    tensors = deployed_tensors(untied, f16(untied))
    embd = next(t for t in tensors if t.name == "token_embd.weight")
    r = estimate(untied, tensors, phone, context_tokens=1, prompt_tokens=1)
    # One 4096-wide F16 row (8 KiB) of the table, plus the KV cache of one position: exact.
    assert r.bytes_read_per_token == r.weights_bytes - embd.nbytes + 8192 + 128 * 1024
    tied = arch("Qwen2-0.5B")
    r = estimate(tied, deployed_tensors(tied, f16(tied)), phone, context_tokens=1, prompt_tokens=1)
    # The tied table is also the output head, so every token reads all of it: exact.
    assert r.bytes_read_per_token == r.weights_bytes + kv_cache_bytes_per_token(tied)


def test_prefill_never_beats_reading_the_weights_once() -> None:
    a = arch("Qwen2-0.5B")
    phone = load_phone("oneplus-12")
    tensors = deployed_tensors(a, f16(a))
    weights_read_s = sum(t.bytes_read_per_token for t in tensors) / (
        phone.bandwidth_efficiency * phone.peak_bandwidth_bytes_per_s
    )
    short = estimate(a, tensors, phone, context_tokens=64, prompt_tokens=1)
    assert short.prefill_s == pytest.approx(weights_read_s)  # one token: memory-bound, exact
    long = estimate(a, tensors, phone, context_tokens=4096, prompt_tokens=4096)
    # A long prompt is compute-bound: 4096 tokens of MACs take far longer than one weight read.
    assert long.prefill_s > 100 * weights_read_s


def test_longer_context_costs_memory_and_speed() -> None:
    short = report("Llama-3.2-1B", q4_k_m, "pixel-9-pro", context_tokens=1024)
    long = report("Llama-3.2-1B", q4_k_m, "pixel-9-pro", context_tokens=8192)
    assert long.kv_cache_bytes == 8 * short.kv_cache_bytes
    assert long.decode_tokens_per_s < short.decode_tokens_per_s
    assert long.macs_per_token > short.macs_per_token


def test_battery_figures_are_consistent() -> None:
    r = report("Llama-3.2-3B", q4_k_m, "iphone-16")
    # Exact identities up to float rounding.
    assert r.battery_pct_per_1000_tokens == pytest.approx(100 * 1000 * r.energy_j_per_token / r.battery_j)
    # continuous generation: tokens at the sustained (hot) rate
    hours_from_pct = 100 / r.battery_pct_per_1000_tokens * 1000 / r.sustained_decode_tokens_per_s / 3600
    assert r.hours_continuous_generation == pytest.approx(hours_from_pct)


def test_prompt_longer_than_context_is_refused() -> None:
    with pytest.raises(AutosquashError, match="prompt_tokens"):
        report("Qwen2-0.5B", f16, "iphone-16", context_tokens=128, prompt_tokens=256)


def test_to_dict_and_format_report() -> None:
    phone = load_phone("iphone-16")
    r = report("Llama-3.1-8B", f16, "iphone-16")
    d = r.to_dict()
    assert d["weights_bytes"] == r.weights_bytes and d["fits"] is False
    assert all(type(v) in (int, float, bool) for v in d.values())
    text = format_report(r, phone)
    assert "iphone-16" in text and "does NOT fit" in text and "J/token" in text and "tok/s" in text
    assert "fits:" in format_report(report("Qwen2-0.5B", q4_k_m, "iphone-16"), phone)
