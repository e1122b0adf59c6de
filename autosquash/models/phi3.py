"""Phi-3 as the Llama it is: its fused projections split, so every operator, writer and price sees q/k/v and
gate/up as it does for Llama.

Phi-3's block is Llama's with `qkv_proj` (q, then k, then v rows) and `gate_up_proj` (gate rows, then up);
split, the same weights compute the same function (up to the rounding of three matmuls instead of one).
Taken as they are: full rotary dimensions with the default rope (Phi-3-mini-4k, Phi-3-medium-4k). Refused:
partial rotary factors (Phi-4-mini) and longrope scaling (the 128k variants), which Llama's attention and
llama.cpp's `llama` graph would compute differently. Phi-3's sliding window (2047 tokens in the 4k models)
is not kept: below it, which calibration and evaluation sequences are, attention is the same.
"""

from __future__ import annotations

import torch

from autosquash.errors import AutosquashError


def as_llama(model: torch.nn.Module) -> torch.nn.Module:
    """The LlamaForCausalLM (eval mode) computing what Phi3ForCausalLM `model` computes; its weights shared."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = model.config
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if float(rope.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise AutosquashError("phi3 models with a partial rotary factor (Phi-4-mini) are not supported yet")
    if rope.get("rope_type", "default") != "default":
        raise AutosquashError(f"phi3 models with {rope['rope_type']} rope (the 128k variants) are not supported yet")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    llama_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters=rope,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
        name_or_path=getattr(cfg, "name_or_path", ""),
        autosquash_family="phi3",  # what it exports as (models.gguf_family)
    )
    if any(n.endswith(".bias") for n, _ in model.named_parameters()):
        raise AutosquashError("this phi3 model has biases, which autosquash cannot compress yet")
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("self_attn.qkv_proj.weight"):
            q, k, v = t.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            prefix = name.removesuffix("qkv_proj.weight")
            state.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        elif name.endswith("mlp.gate_up_proj.weight"):
            gate, up = t.chunk(2, dim=0)
            prefix = name.removesuffix("gate_up_proj.weight")
            state.update({prefix + "gate_proj.weight": gate, prefix + "up_proj.weight": up})
        elif not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            state[name] = t
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_cfg)
    llama.load_state_dict(state, strict=not cfg.tie_word_embeddings, assign=True)
    if cfg.tie_word_embeddings:
        llama.lm_head.weight = llama.model.embed_tokens.weight
    llama.model.rotary_emb = LlamaRotaryEmbedding(config=llama_cfg)  # its buffers are not in the state
    return llama.to(next(model.parameters()).dtype).eval()
