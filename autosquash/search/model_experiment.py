"""A search of the user's own model and phone without an experiment file (`autosquash search --model M --phone P`):
the default experiment's settings, the model and phone given, and the search space the model's shapes and family
can use."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from autosquash.cost import load_phone
from autosquash.errors import AutosquashError
from autosquash.files import write_text
from autosquash.formats.gguf_types import tensor_type
from autosquash.models.arch import Arch
from autosquash.models.gguf_family import family
from autosquash.models.load import load_arch
from autosquash.search.experiment import Experiment, load_experiment, resolve_path
from autosquash.search.space import SearchSpace

_SOURCE = Path(__file__).resolve().parents[2]  # the source folder (autosquash installs editable, scripts/setup.sh)
DEFAULT_EXPERIMENT = _SOURCE / "experiments" / "smollm2-135m-iphone16.yaml"
FULL_LADDER_SPACE = _SOURCE / "search_spaces" / "gguf-full-ladder.yaml"
DERIVED_SPACE = "search_space.yaml"  # a space derived for the model, in the search's output folder


@dataclass(frozen=True)
class ModelExperiment:
    """The experiment for a model and a phone. Where its space is derived here (`space` not None, `note` saying
    why), the search reads it from its output folder: `in_folder` points the experiment there and `write_space`
    writes it; `experiment.search_space` is then the file it was derived from."""

    experiment: Experiment
    space: SearchSpace | None = None
    note: str | None = None

    def in_folder(self, out_dir: Path) -> Experiment:
        """The experiment as a search in `out_dir` runs it (a derived space read from there)."""
        if self.space is None:
            return self.experiment
        return self.experiment.model_copy(update={"search_space": str((out_dir / DERIVED_SPACE).resolve())})


def takes_k_quants(arch: Arch) -> bool:
    """Whether every block linear's rows (its input width: hidden, attention output, FFN) split into 256-value
    super-blocks, so that each K-quant is stored as asked rather than as its fallback type."""
    q4_k = tensor_type("Q4_K")
    return all(q4_k.fits_row(w) for w in (arch.hidden_size, arch.n_heads * arch.head_dim, arch.intermediate_size))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.]+", "-", text.lower()).strip("-._")


def experiment_name(model: str, phone_name: str) -> str:
    """`<model>-<phone>`: the model's file or folder name (a config.json's folder, a hub id's last part)."""
    p = Path(model.rstrip("/"))
    stem = p.parent.name if p.name == "config.json" else p.name.removesuffix(".json").removesuffix(".gguf")
    return f"{_slug(stem) or 'model'}-{_slug(phone_name) or 'phone'}"


def model_experiment(model: str, phone: str | None, default: Path = DEFAULT_EXPERIMENT) -> ModelExperiment:
    """The experiment `default` with `model` on `phone` (the default's phone when None), named for both, over the
    full K-quant ladder where the model's widths take it (else the default's space); for a family whose llama.cpp
    graph sizes every block alike, that space without its pruning choices.

    Model and phone paths are taken from the working folder and recorded absolute.
    """
    if not default.is_file():
        raise AutosquashError(
            f"the default experiment {default} is missing (autosquash runs from its source folder); "
            "pass an experiment file instead"
        )
    base = load_experiment(default)
    model = resolve_path(model, Path.cwd())
    phone = resolve_path(phone, Path.cwd()) if phone else base.phone
    arch = load_arch(model)  # the config alone: the model is checked, and its shapes choose the space
    space_file = FULL_LADDER_SPACE if takes_k_quants(arch) else Path(base.search_space)
    exp = base.model_copy(
        update={
            "name": experiment_name(model, load_phone(phone).name),
            "model": model,
            "phone": phone,
            "search_space": str(space_file),
        }
    )
    space = SearchSpace.load(space_file)
    fam = family(arch.model_type)
    if space.target != "gguf" or fam.llama_graph or not space.pruned():
        return ModelExperiment(exp)
    note = (
        f"pruning ({', '.join(space.pruned())}) left out of {space.name}: {arch.model_type} exports as llama.cpp's "
        f"{fam.gguf_arch}, whose graph reads one FFN width and KV-head count for all blocks"
    )
    return ModelExperiment(exp, space.without_pruning(), note)


def write_space(made: ModelExperiment, out_dir: Path) -> None:
    """Write a derived space into `out_dir`, where `made.in_folder(out_dir)` reads it (a resumed search rewrites
    the same bytes, so the study's record of its space still matches)."""
    if made.space is None:
        return
    path = Path(made.in_folder(out_dir).search_space)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(made.space.model_dump(mode="json"), sort_keys=False)
    write_text(path, f"# {made.space.name}: {made.note}\n{text}")


def remove_space(made: ModelExperiment, out_dir: Path) -> None:
    """Undo `write_space` where the folder holds nothing else (a start refused before its search began), the
    folder with it: a refused start leaves no folder behind."""
    if made.space is not None and out_dir.is_dir() and [p.name for p in out_dir.iterdir()] == [DERIVED_SPACE]:
        (out_dir / DERIVED_SPACE).unlink()
        out_dir.rmdir()
