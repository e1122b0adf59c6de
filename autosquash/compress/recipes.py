"""llama.cpp's own mixtures (Q4_K_M, Q3_K_M) as plans, for comparing with a search's plans and for pricing
published llama.cpp measurements."""

from __future__ import annotations

from autosquash.compress.operators import PRUNING
from autosquash.compress.plan import LayerChoice, Plan
from autosquash.formats.gguf_types import legal_type
from autosquash.models.arch import Arch

MIXTURES = ("Q4_K_M", "Q3_K_M")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's blocks that its _M mixtures give more bits: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def llama_cpp_mixture(arch: Arch, ftype: str) -> Plan:
    """llama.cpp's Q4_K_M or Q3_K_M recipe for a dense Llama as a plan (llama-quant.cpp,
    `llama_tensor_get_type`): a default type with per-tensor exceptions.

    Q4_K_M: Q4_K, attn_v and ffn_down in Q6_K where `use_more_bits`. Q3_K_M: Q3_K, attn_v Q5_K in the first
    two blocks and Q4_K after, ffn_down Q5_K in the first sixteenth and Q4_K after, attn_output Q4_K. The
    output head gets Q6_K (a tied one shares token_embd, which then gets the head's type). Rows that cannot
    hold K-quant super-blocks take llama.cpp's fallback (gguf_types.LLAMA_CPP_FALLBACK), named per tensor.
    """
    n, groups = arch.n_layers, {}
    for i in range(n):
        if ftype == "Q4_K_M":
            more = use_more_bits(i, n)
            attn = LayerChoice(quant="Q4_K", tensor_quant={"attn_v": "Q6_K"} if more else {})
            ffn = LayerChoice(quant="Q4_K", tensor_quant={"ffn_down": "Q6_K"} if more else {})
        elif ftype == "Q3_K_M":
            v = "Q5_K" if i < 2 else "Q4_K"
            attn = LayerChoice(quant="Q3_K", tensor_quant={"attn_v": v, "attn_output": "Q4_K"})
            ffn = LayerChoice(quant="Q3_K", tensor_quant={"ffn_down": "Q5_K" if i < n // 16 else "Q4_K"})
        else:
            raise ValueError(f"unknown mixture {ftype!r}; expected one of {', '.join(MIXTURES)}")
        groups.update(
            {f"blk.{i}.attn": _as_llama_cpp(arch, "attn", attn), f"blk.{i}.ffn": _as_llama_cpp(arch, "ffn", ffn)}
        )
    h = arch.hidden_size
    if arch.tied_embeddings:
        return Plan(embed_quant=legal_type("Q6_K", h, llama_cpp=True), groups=groups)
    embed, output = (legal_type(t, h, llama_cpp=True) for t in (ftype[:4], "Q6_K"))
    return Plan(embed_quant=embed, output_quant=output, groups=groups)


def _as_llama_cpp(arch: Arch, kind: str, choice: LayerChoice) -> LayerChoice:
    """`choice` with every linear's type named as llama.cpp stores it on its rows."""
    op = PRUNING[kind]
    shapes = op.shapes(arch, op.kept(arch, choice))
    types = {
        name: legal_type(choice.tensor_quant.get(name, choice.quant), cols, llama_cpp=True)
        for name, (_, cols) in shapes.items()
    }
    return choice.model_copy(update={"tensor_quant": {n: t for n, t in types.items() if t != choice.quant}})
