"""What a deployed model costs on a phone: memory, decode speed, energy and battery (DESIGN.md §4).

Decoding is memory-bound: every token reads the weights once plus the KV cache so far, so
time = bytes read / (eta * peak bandwidth) + fixed overhead (burst: a cool phone), and
energy = bytes read * e_dram + MACs * e_mac + static power * sustained time (continuous generation: a hot
phone decodes at sustained_speed_factor of its burst speed, and the battery pays for that time).
Memory = weights + KV cache + llama.cpp's compute and output buffers + a fixed part, each sized as llama.cpp
sizes it (measured with llama-cpp-python 0.3.36: KV cells rounded up to 256, buffers by the formulas below).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from autosquash.compress.plan import TensorSpec
from autosquash.cost.phone import PhoneProfile
from autosquash.errors import AutosquashError
from autosquash.formats.gguf_types import tensor_type
from autosquash.models.arch import Arch

GIB = 2**30


@dataclass(frozen=True)
class CostReport:
    """The phone cost of one deployed model at one context length; units in the names."""

    context_tokens: int
    prompt_tokens: int
    weights_bytes: int
    model_buffer_bytes: int  # the weights as the runtime holds them (a tied table twice when read, not mapped)
    kv_cache_bytes: int
    runtime_overhead_bytes: int  # compute + output buffers + the profile's fixed part
    compute_buffer_bytes: int
    output_buffer_bytes: int
    peak_memory_bytes: int
    app_memory_limit_bytes: int
    fits: bool
    bytes_read_per_token: float
    macs_per_token: float
    decode_s_per_token: float
    decode_tokens_per_s: float
    sustained_decode_tokens_per_s: float
    prefill_s: float
    dram_energy_j_per_token: float
    compute_energy_j_per_token: float
    static_energy_j_per_token: float
    energy_j_per_token: float
    battery_j: float
    battery_pct_per_1000_tokens: float
    hours_continuous_generation: float
    bits_per_weight: float
    block_bits_per_weight: float

    def to_dict(self) -> dict[str, float | int | bool]:
        """Plain numbers by field name, for JSON and MLflow metrics."""
        return asdict(self)


def kv_cache_bytes_per_token(arch: Arch, kv_type: str = "F16", kv_heads_per_layer: Sequence[int] | None = None) -> int:
    """KV cache bytes one context position holds: keys and values of every layer's KV heads."""
    heads = kv_heads_per_layer if kv_heads_per_layer is not None else [arch.n_kv_heads] * arch.n_layers
    return 2 * sum(tensor_type(kv_type).nbytes((n, arch.head_dim)) for n in heads if n > 0)


def file_tensors(path) -> tuple[Arch, list[TensorSpec], list[int]]:
    """A GGUF model file of any family autosquash reads, as the cost model prices it: its architecture, every tensor
    it holds (name, torch shape, stored type, work per token, as `deployed_tensors` gives a plan's) and each block's
    KV-head count, so `estimate` prices the file a user has rather than the plan it came from."""
    from autosquash.models.load import gguf_layout

    layout = gguf_layout(path)
    config, kv_heads, tensors = layout.config, layout.kv_heads, layout.tensors
    tied = "output.weight" not in tensors
    specs = []
    for name, t in tensors.items():
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists the row length first
        if name == "token_embd.weight":
            specs.append(TensorSpec(name, shape, t.tensor_type.name, shape[0] * shape[1] if tied else 0, not tied))
        else:
            macs = shape[0] * shape[1] if len(shape) == 2 else 0
            specs.append(TensorSpec(name, shape, t.tensor_type.name, macs))
    return Arch.from_config(config), specs, kv_heads


KV_CELL_ROUND = 256  # llama.cpp pads n_ctx to a multiple of 256 and allocates that many KV cells


def kv_cells(context_tokens: int) -> int:
    """KV cells llama.cpp allocates for a context of `context_tokens`."""
    return -(-context_tokens // KV_CELL_ROUND) * KV_CELL_ROUND


def compute_buffer_bytes(arch: Arch, cells: int, ubatch_tokens: int = 512, flash_attention: bool = True) -> int:
    """llama.cpp's compute buffer: float32 scratch for one micro-batch of u tokens (u = n_ubatch, at most the
    context). Its peak is either the logits (vocabulary plus a few hidden-size rows per token) or, without flash
    attention, the attention scores of every head over every cell. Measured with llama-cpp-python 0.3.36 over 222
    loads of 14 shapes (CPU): the attention branch exactly; the logits branch's slack moved between 2E+1 and 7E+1
    floats per token with the allocator's reuse, and 2E+1 (taken here) was exact in 108 of 154 loads and never
    above the measured size (at most 7 % below it). Independent of layers, FFN width and weight types."""
    u = min(ubatch_tokens, cells)
    e, hd, g = arch.hidden_size, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim
    logits = arch.vocab_size + 2 * e + 1
    if flash_attention:
        return 4 * u * logits
    attention = (arch.n_heads + 1) * cells + 3 * e + 2 * hd + 2 * g + 5 + 3 * max(0, e - hd)
    return 4 * u * max(logits, attention)


def output_buffer_bytes(arch: Arch) -> int:
    """llama.cpp's output buffer: one row of float32 logits (measured exactly, llama-cpp-python 0.3.36)."""
    return 4 * arch.vocab_size


def _duplicated_head_bytes(tensors: Sequence[TensorSpec], phone: PhoneProfile) -> int:
    """A tied token table llama.cpp holds twice: with the file read into its own buffers (not mapped), the
    output head is a second copy of the table in the matmul weights' buffer (measured on three phones: every
    tied model's model buffer exceeds its file's tensors by exactly the table; pocketpal-ai's sweep,
    autosquash/cost/measurements.yaml). A mapped file shares its pages."""
    if phone.mmap_weights or any(t.name == "output.weight" for t in tensors):
        return 0
    return sum(t.nbytes for t in tensors if t.name == "token_embd.weight")


def estimate(
    arch: Arch,
    tensors: Sequence[TensorSpec],
    phone: PhoneProfile,
    context_tokens: int = 2048,
    prompt_tokens: int = 512,
    kv_type: str = "F16",
    kv_heads_per_layer: Sequence[int] | None = None,
) -> CostReport:
    """Price `tensors` (from `deployed_tensors(arch, plan)`) on `phone` for one conversation.

    The KV cache is allocated for `context_tokens`; decoding runs from the end of a `prompt_tokens`
    prompt to the end of the context, so per-token figures are taken at the average position.
    `kv_heads_per_layer` (from `kv_heads_per_layer(arch, plan)`) accounts for pruned attention.
    """
    if not 0 < prompt_tokens <= context_tokens:
        raise AutosquashError(
            f"prompt_tokens ({prompt_tokens}) must be positive and at most context_tokens ({context_tokens})"
        )
    kv_heads = list(kv_heads_per_layer) if kv_heads_per_layer is not None else [arch.n_kv_heads] * arch.n_layers
    kv_per_position = kv_cache_bytes_per_token(arch, kv_type, kv_heads)
    memory = _memory(arch, tensors, phone, kv_cells(context_tokens), kv_per_position)
    decode = _decode(arch, tensors, phone, kv_heads, kv_per_position, prompt_tokens, context_tokens)
    continuous = _continuous_generation(
        phone, decode["bytes_read_per_token"], decode["macs_per_token"], decode["decode_s_per_token"]
    )
    matrices = [t for t in tensors if len(t.shape) == 2]
    blocks = [t for t in matrices if t.name.startswith("blk.")]
    return CostReport(
        context_tokens=context_tokens,
        prompt_tokens=prompt_tokens,
        **memory,
        **decode,
        **continuous,
        # Average storage bits per weight value of the matrices (as llama.cpp reports BPW);
        # pruning and low-rank factors show in weights_bytes, not here.
        bits_per_weight=_bits_per_value(matrices),
        # The same over the blocks' matrices only: the embedding table (a fifth of SmolLM2) left out.
        block_bits_per_weight=_bits_per_value(blocks),
    )


def _memory(
    arch: Arch, tensors: Sequence[TensorSpec], phone: PhoneProfile, cells: int, kv_per_position: int
) -> dict[str, int | bool]:
    """CostReport's memory fields: the weights as held, a KV cache of `cells` cells and llama.cpp's buffers,
    against the phone's app memory limit."""
    weights_bytes = sum(t.nbytes for t in tensors)
    model_bytes = weights_bytes + _duplicated_head_bytes(tensors, phone)
    kv_bytes = kv_per_position * cells
    compute_bytes = compute_buffer_bytes(arch, cells, phone.ubatch_tokens, phone.flash_attention)
    output_bytes = output_buffer_bytes(arch)
    runtime_bytes = phone.runtime_fixed_bytes + compute_bytes + output_bytes
    peak_bytes = model_bytes + kv_bytes + runtime_bytes
    return {
        "weights_bytes": weights_bytes,
        "model_buffer_bytes": model_bytes,
        "kv_cache_bytes": kv_bytes,
        "runtime_overhead_bytes": runtime_bytes,
        "compute_buffer_bytes": compute_bytes,
        "output_buffer_bytes": output_bytes,
        "peak_memory_bytes": peak_bytes,
        "app_memory_limit_bytes": phone.app_memory_limit_bytes,
        "fits": peak_bytes <= phone.app_memory_limit_bytes,
    }


def _decode(
    arch: Arch,
    tensors: Sequence[TensorSpec],
    phone: PhoneProfile,
    kv_heads: Sequence[int],
    kv_per_position: int,
    prompt_tokens: int,
    context_tokens: int,
) -> dict[str, float]:
    """CostReport's speed fields on a cool phone: bytes read and MACs per token at the average position, the
    decode time they take, and the prompt's prefill time."""
    avg_position = (prompt_tokens + context_tokens) / 2
    # Scores q·k and the weighted sum of values: head_dim MACs each, per query head and position.
    attn_macs_per_position = 2 * sum(kv_heads) * (arch.n_heads // arch.n_kv_heads) * arch.head_dim
    linear_macs = sum(t.macs_per_token for t in tensors)
    weights_read = sum(t.bytes_read_per_token for t in tensors)
    bytes_read = weights_read + kv_per_position * avg_position
    bandwidth = phone.bandwidth_efficiency * phone.peak_bandwidth_bytes_per_s
    decode_s = bytes_read / bandwidth + phone.fixed_overhead_s_per_token
    # Prefill multiplies the whole prompt at once, so compute bounds it, but the weights still
    # have to come from DRAM at least once.
    prefill_macs = prompt_tokens * linear_macs + attn_macs_per_position * prompt_tokens**2 / 2
    return {
        "bytes_read_per_token": bytes_read,
        "macs_per_token": linear_macs + attn_macs_per_position * avg_position,
        "decode_s_per_token": decode_s,
        "decode_tokens_per_s": 1.0 / decode_s,
        "prefill_s": max(prefill_macs / phone.peak_macs_per_s, weights_read / bandwidth),
    }


def _continuous_generation(phone: PhoneProfile, bytes_read: float, macs: float, decode_s: float) -> dict[str, float]:
    """CostReport's fields for generating without pause on a hot phone: its sustained speed, the energy per token
    (DRAM, compute, static power over the sustained time) and the battery that drains."""
    sustained_s = decode_s / phone.sustained_speed_factor
    dram_j = bytes_read * phone.dram_energy_j_per_byte
    compute_j = macs * phone.mac_energy_j
    static_j = phone.static_power_w * sustained_s
    energy_j = dram_j + compute_j + static_j
    return {
        "sustained_decode_tokens_per_s": 1.0 / sustained_s,
        "dram_energy_j_per_token": dram_j,
        "compute_energy_j_per_token": compute_j,
        "static_energy_j_per_token": static_j,
        "energy_j_per_token": energy_j,
        "battery_j": phone.battery_j,
        "battery_pct_per_1000_tokens": 100.0 * 1000 * energy_j / phone.battery_j,
        # Tokens come at the sustained rate, each costing energy_j.
        "hours_continuous_generation": phone.battery_j / (energy_j / sustained_s) / 3600,
    }


def _bits_per_value(matrices) -> float:
    values = sum(t.shape[0] * t.shape[1] for t in matrices)
    return 8.0 * sum(t.nbytes for t in matrices) / values if values else 0.0


def format_report(report: CostReport, phone: PhoneProfile) -> str:
    """A readable multi-line breakdown of `report` on `phone`, for a terminal."""
    r = report
    verdict = "fits" if r.fits else "does NOT fit"
    return "\n".join(
        [
            f"phone    {phone.name}" + (f" ({phone.description})" if phone.description else ""),
            f"memory   weights {r.weights_bytes / GIB:.2f} GiB + KV cache {r.kv_cache_bytes / GIB:.2f} GiB "
            f"({r.context_tokens} tokens) + runtime {r.runtime_overhead_bytes / GIB:.2f} GiB "
            f"(compute buffer {r.compute_buffer_bytes / 2**20:.0f} MiB) "
            f"= {r.peak_memory_bytes / GIB:.2f} GiB",
            f"         {verdict}: app limit {r.app_memory_limit_bytes / GIB:.2f} GiB "
            f"({phone.app_memory_fraction:.0%} of {phone.dram_bytes / GIB:.1f} GiB DRAM)",
            f"weights  {r.bits_per_weight:.2f} bits per weight ({r.block_bits_per_weight:.2f} in the blocks)",
            f"decode   {r.bytes_read_per_token / 1e6:,.0f} MB read and {r.macs_per_token / 1e9:.2f} GMAC per token "
            f"-> {r.decode_tokens_per_s:.1f} tok/s ({r.decode_s_per_token * 1e3:.1f} ms/token); "
            f"{r.sustained_decode_tokens_per_s:.1f} tok/s sustained (hot)",
            f"prefill  {r.prompt_tokens} prompt tokens in {r.prefill_s:.2f} s",
            f"energy   {r.energy_j_per_token:.3f} J/token = DRAM {r.dram_energy_j_per_token:.3f} "
            f"+ compute {r.compute_energy_j_per_token:.3f} + static {r.static_energy_j_per_token:.3f}",
            f"battery  {r.battery_j / 1e3:.1f} kJ: {r.battery_pct_per_1000_tokens:.2f} % per 1000 tokens, "
            f"{r.hours_continuous_generation:.1f} h of continuous generation",
        ]
    )
