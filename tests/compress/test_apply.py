import pytest
import torch
from transformers import LlamaForCausalLM

from autosquash.compress.apply import VariantCache, compress
from autosquash.compress.calibrate import HEAD, HEAD_COVARIANCE, collect_stats
from autosquash.compress.operators.svd import LowRankLinear
from autosquash.compress.plan import LayerChoice, Plan, deployed_tensors
from autosquash.compress.quantize import fake_quantize, quantize
from autosquash.formats.codecs import dequantize
from autosquash.models.arch import Arch
from tests.conftest import tiny_config


def _deployed_shapes(model) -> list[tuple[int, ...]]:
    return sorted(tuple(p.shape) for n, p in model.named_parameters() if p.dim() == 2)


def test_compressed_model_holds_exactly_the_planned_tensors(tiny_model, tiny_arch, tiny_batch):
    stats = collect_stats(tiny_model, tiny_batch)
    plan = Plan(
        target="torch",
        embed_quant="Q4_0",
        groups={
            "blk.0.ffn": LayerChoice(quant="Q4_K", ffn_keep_ratio=0.5),
            "blk.1.attn": LayerChoice(quant="Q2_K", rank_ratio=0.25),
            "blk.1.ffn": LayerChoice(quant="Q8_0", ffn_keep_ratio=0.75, rank_ratio=0.25),
        },
    )
    model = compress(tiny_model, tiny_arch, plan, stats)
    planned = sorted(t.shape for t in deployed_tensors(tiny_arch, plan) if len(t.shape) == 2)
    assert _deployed_shapes(model) == planned
    assert isinstance(model.model.layers[1].self_attn.q_proj, LowRankLinear)
    out = model(tiny_batch).logits
    assert out.shape == (*tiny_batch.shape, 512) and torch.isfinite(out).all()


def test_weights_sit_on_the_format_grid(tiny_model, tiny_arch):
    # Quantizing an already-quantized weight again must give it back unchanged (to float32 rounding):
    # the trial evaluates exactly what a GGUF file of that type holds.
    model = compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q4_0"), {})
    w = model.model.layers[0].mlp.up_proj.weight.data
    torch.testing.assert_close(fake_quantize(w, "Q4_0"), w, rtol=0, atol=1e-6)


def test_base_model_is_left_untouched(tiny_model, tiny_arch):
    before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q2_K"), {})
    for n, p in tiny_model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_variant_cache_reuses_layers(tiny_model, tiny_arch):
    cache = VariantCache()
    compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, "Q4_0"), {}, cache)
    misses = cache.misses
    plan = Plan.uniform(tiny_arch, "Q4_0").model_copy(
        update={"groups": {**Plan.uniform(tiny_arch, "Q4_0").groups, "blk.1.attn": LayerChoice(quant="Q8_0")}}
    )
    compress(tiny_model, tiny_arch, plan, {}, cache)
    assert cache.misses - misses == 4  # only the four attention weights of block 1 are new


def test_variant_cache_holds_gguf_bytes_and_hands_out_fresh_weights(tiny_model, tiny_arch, tiny_batch):
    """The cache keeps the deployed bytes, not float32 weights; a model built from it owns its weights."""
    plan = Plan(
        target="torch",
        groups={
            "blk.0.ffn": LayerChoice(quant="Q4_0", kron_rank=2),
            "blk.1.attn": LayerChoice(quant="Q8_0", rank_ratio=0.25),
        },
    )
    stats = collect_stats(tiny_model, tiny_batch)
    cache = VariantCache()
    first = compress(tiny_model, tiny_arch, plan, stats, cache)
    stored = sum(t.nbytes for t in deployed_tensors(tiny_arch, plan) if len(t.shape) == 2)
    h, f = tiny_arch.hidden_size, tiny_arch.intermediate_size
    perms = 3 * 2 * (h + f) + 4 * (2 * h + f)  # gate, up, down: int16 row/column orders, float32 column scales
    assert cache.nbytes == stored + perms < cache.decoded_nbytes() / 2
    for p in first.parameters():
        p.data.mul_(0)  # healing or a merge writing into one trial's model must not reach the next
    second = compress(tiny_model, tiny_arch, plan, stats, cache)
    assert cache.hits > 0
    torch.testing.assert_close(
        second(tiny_batch).logits, compress(tiny_model, tiny_arch, plan, stats)(tiny_batch).logits
    )


def test_quantization_error_grows_as_bits_shrink(tiny_model, tiny_arch, tiny_batch):
    ref = tiny_model(tiny_batch).logits
    errs = []
    for q in ("Q8_0", "Q4_K", "Q2_K"):
        out = compress(tiny_model, tiny_arch, Plan.uniform(tiny_arch, q), {})(tiny_batch).logits
        errs.append((out - ref).pow(2).mean().item())
    assert errs[0] < errs[1] < errs[2]


def test_heads_and_whole_blocks_are_pruned(tiny_model, tiny_arch, tiny_batch):
    from autosquash.compress.plan import kv_heads_per_layer
    from autosquash.models.layers import RemovedAttention, RemovedMLP

    stats = collect_stats(tiny_model, tiny_batch)
    plan = Plan(
        groups={
            "blk.0.attn": LayerChoice(quant="Q8_0", attn_keep_ratio=0.5),  # one of two KV groups
            "blk.1.attn": LayerChoice(quant="Q8_0", attn_keep_ratio=0.0),  # block 1 removed entirely
            "blk.1.ffn": LayerChoice(quant="Q8_0", ffn_keep_ratio=0.0),
        }
    )
    model = compress(tiny_model, tiny_arch, plan, stats)
    assert _deployed_shapes(model) == sorted(t.shape for t in deployed_tensors(tiny_arch, plan) if len(t.shape) == 2)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (2 * 64, 256) and attn.k_proj.weight.shape == (64, 256)
    assert isinstance(model.model.layers[1].self_attn, RemovedAttention)
    assert isinstance(model.model.layers[1].mlp, RemovedMLP)
    assert kv_heads_per_layer(tiny_arch, plan) == [1, 0]
    assert torch.isfinite(model(tiny_batch).logits).all()


def test_kept_kv_group_is_the_more_important_one(tiny_model, tiny_arch, tiny_batch):
    # Make KV group 1 matter far more in the output projection: pruning must keep it.
    with torch.no_grad():
        tiny_model.model.layers[0].self_attn.o_proj.weight[:, 128:] *= 10
    plan = Plan(groups={"blk.0.attn": LayerChoice(quant="F16", attn_keep_ratio=0.5)})
    model = compress(tiny_model, tiny_arch, plan, collect_stats(tiny_model, tiny_batch))
    kept = model.model.layers[0].self_attn.k_proj.weight
    base = tiny_model.model.layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(kept, base[64:].half().float(), rtol=0, atol=0)  # F16 storage of group 1


def test_kronecker_layers_compose_with_pruning_and_quantization(tiny_model, tiny_arch, tiny_batch):
    from autosquash.compress.operators.kron import KronLinear

    stats = collect_stats(tiny_model, tiny_batch)
    plan = Plan(target="torch", groups={"blk.0.ffn": LayerChoice(quant="Q4_0", ffn_keep_ratio=0.5, kron_rank=4)})
    model = compress(tiny_model, tiny_arch, plan, stats)
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, KronLinear) and (up.out_features, up.in_features) == (256, 256)
    specs = {t.name: t for t in deployed_tensors(tiny_arch, plan)}
    a = specs["blk.0.ffn_up.kron_a"]
    assert a.shape == (4, up.a[0].numel()) and a.type == "Q4_0"
    # The factors the model evaluates sit on the Q4_0 grid (re-quantizing them changes nothing).
    flat = up.a.data.reshape(4, -1)
    torch.testing.assert_close(fake_quantize(flat, "Q4_0"), flat, rtol=0, atol=1e-6)
    assert specs["blk.0.ffn_up.row_perm"].type == "I16"
    assert torch.isfinite(model(tiny_batch).logits).all()


@pytest.mark.parametrize(
    "choice",
    [
        LayerChoice(quant="F32"),
        LayerChoice(quant="F32", attn_keep_ratio=0.5),
        LayerChoice(quant="F32", rank_ratio=0.5),
        LayerChoice(quant="F32", kron_rank=64),
    ],
    ids=["plain", "pruned", "svd", "kron"],
)
def test_biases_are_kept_in_every_form_on_the_rows_pruning_keeps(choice, tiny_batch):
    """Qwen2's q/k/v biases: each compressed linear adds its own bias (pruned with its rows), whatever its form."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import TINY_SHAPE

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_SHAPE)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p is not model.model.norm.weight:
                p.normal_()
    arch = Arch.from_config(model.config)
    plan = Plan(target="torch", embed_quant="F32", groups={"blk.0.attn": choice})
    compressed = compress(model, arch, plan, {})
    q = compressed.model.layers[0].self_attn.q_proj
    rows = q.bias.shape[0]
    base_q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, arch.hidden_size)
    if rows == base_q.out_features:  # unpruned: the compressed linear's bias is the base's, added once
        assert torch.equal(q.bias, base_q.bias)
        with torch.no_grad():
            torch.testing.assert_close(q(torch.zeros(1, arch.hidden_size))[0], base_q.bias)
            if choice.rank_ratio == 0 and choice.kron_rank == 0:
                torch.testing.assert_close(q(x), base_q(x))
    else:  # the kept KV group's query rows, bias and all
        kept = [r for r in range(base_q.out_features) if any(torch.equal(base_q.weight[r], w) for w in q.weight)]
        assert len(kept) == rows and torch.equal(q.bias, base_q.bias[kept])
    with torch.no_grad():
        assert torch.isfinite(compressed(tiny_batch).logits).all()


def test_calibration_gathers_the_output_heads_input(tiny_model, tiny_batch):
    seen = []
    hook = tiny_model.model.norm.register_forward_hook(lambda _m, _a, out: seen.append(out.reshape(-1, out.shape[-1])))
    try:
        stats = collect_stats(tiny_model, tiny_batch)
    finally:
        hook.remove()
    h = torch.cat(seen).float()
    torch.testing.assert_close(stats[HEAD], h.square().mean(0))
    torch.testing.assert_close(stats[HEAD_COVARIANCE], h.T @ h / h.shape[0], rtol=1e-4, atol=1e-6)


def _weighted_error(table: torch.Tensor, w: torch.Tensor, imp: torch.Tensor) -> float:
    return float(((table - w).square() * imp).sum())


@pytest.mark.parametrize("tied", [True, False])
def test_a_table_the_head_reads_is_quantized_weighted_by_the_heads_input(tied, tiny_batch):
    # The logits' error is that of W h: channels the head's input fills weigh more. Here a few channels carry
    # 100x the energy of the rest; the weighted table errs less on them than an unweighted one would.
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tied)).eval()
    arch = Arch.from_config(model.config)
    hidden = arch.hidden_size
    imp = torch.ones(hidden)
    imp[:: hidden // 4] = 100.0
    stats = {HEAD: imp}
    out = compress(model, arch, Plan.uniform(arch, "Q4_0"), stats)
    emb = model.model.embed_tokens.weight.data
    plain = dequantize(quantize(emb, "Q4_0"), emb.device)
    if tied:
        table = out.model.embed_tokens.weight.data
        assert out.lm_head.weight is out.model.embed_tokens.weight
        assert _weighted_error(table, emb, imp) < 0.9 * _weighted_error(plain, emb, imp)
    else:
        # An untied token table is only looked up: every channel alike. The head is weighted.
        torch.testing.assert_close(out.model.embed_tokens.weight.data, plain, rtol=0, atol=0)
        head = model.lm_head.weight.data
        plain_head = dequantize(quantize(head, "Q4_0"), head.device)
        weighted = _weighted_error(out.lm_head.weight.data, head, imp)
        assert weighted < 0.9 * _weighted_error(plain_head, head, imp)


@pytest.mark.parametrize("tied", [True, False])
def test_a_table_the_head_reads_spreads_its_error_through_the_heads_input_covariance(tied, tiny_batch):
    # With E[h hᵀ] in the statistics (calibrate gathers it), the head's table is quantized with GPTQ's error
    # spreading, row by row no worse than without it: a lower output error (W - Ŵ) H (W - Ŵ)ᵀ of the head.
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tie_word_embeddings=tied)).eval()
    arch = Arch.from_config(model.config)
    stats = collect_stats(model, tiny_batch)
    h = stats[HEAD_COVARIANCE]
    diag_only = {HEAD: stats[HEAD]}
    head = model.lm_head.weight.data

    def head_error(s) -> float:
        out = compress(model, arch, Plan.uniform(arch, "Q4_0"), s)
        e = out.lm_head.weight.data - head
        return float(((e @ h) * e).sum())

    assert head_error(stats) < 0.9 * head_error(diag_only)
    if not tied:  # an untied token table is only looked up: plain, whatever the statistics
        out = compress(model, arch, Plan.uniform(arch, "Q4_0"), stats)
        emb = model.model.embed_tokens.weight.data
        torch.testing.assert_close(out.model.embed_tokens.weight.data, dequantize(quantize(emb, "Q4_0")))
