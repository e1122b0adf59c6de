"""Experiment files: the single source of a search's configuration (CLI flags only override it)."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from autosquash.errors import AutosquashError, DeprecatedInput
from autosquash.yaml_io import read_yaml, validate

Objective = Literal["perplexity", "kl", "memory", "energy"]
SamplerName = Literal["tpe", "nsga2", "random", "gp", "sensitivity"]


class TextSpec(BaseModel):
    """A token set: a shipped source ('wikipedia', 'lambada') or a text file, and its size."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str
    tokens: int = Field(2048, gt=0)
    seq_len: int = Field(256, gt=1)


class CalibrationSpec(TextSpec):
    """The calibration token set; and whether the quantized block linears spread their quantization error
    through their inputs' covariance E[x xᵀ] (GPTQ, autosquash.compress.gptq), measured over the source's
    first `compensation_tokens` tokens (the calibration set among them) and dampened by `compensation_damp`
    of its mean diagonal. On SmolLM2-135M (benchmarks/gptq.py) these defaults lowered the KL of every uniform
    plan measured by a fifth to a third (Q2_K 0.317 -> 0.250, Q3_K 0.169 -> 0.119, Q4_0 0.133 -> 0.099, Q4_K
    0.027 -> 0.021, IQ4_NL 0.060 -> 0.047); H over the calibration set's 2048 tokens overfits, and without
    token normalization the first token dominates H. Off by default: on the default search's front plans
    (benchmarks/gptq_front.py, test split) it lowered the KL of 3 of 10 (median ratio 1.02). The sensitivity
    sampler's damage model is measured on uncompensated variants."""

    error_compensation: Literal["none", "gptq"] = "none"
    compensation_tokens: int = Field(16384, gt=0)
    compensation_damp: float = Field(0.1, gt=0)
    # Each token's input scaled to unit mean square in the covariance, so that a transformer's first token
    # (an attention sink, tens of times the others' norm) weighs no more than any other.
    compensation_token_normalized: bool = True


class HealSpec(BaseModel):
    """LoRA healing per trial; steps: 0 turns it off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(8, ge=0)
    rank: int = Field(8, gt=0)
    lr: float = Field(5e-4, gt=0)
    batch_seqs: int = Field(2, gt=0)
    only_if_better: bool = True  # keep an adapter only where it lowers the KL on calibration text


class BenchmarkSpec(BaseModel):
    """lm-eval tasks run on every plan of the final front (none: skip), `limit` examples per task."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, gt=0)


class HardwareSpec(BaseModel):
    """Where trials compute. Each worker resolves `device` on its own node: `auto` takes CUDA where torch sees
    it there, else the CPU (the embedded default). Whenever the experiment may use a GPU (`cuda`, or `auto` on a
    cluster with GPUs) each trial asks Ray for `gpus_per_worker` GPUs (a fraction lets several share one), so
    Ray places trials on GPU nodes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of the forward passes; codecs use float32
    gpus_per_worker: float = Field(1.0, gt=0)
    # Bytes of compressed layers a worker keeps across trials (None: from host memory and the model's size,
    # search.trial.default_cache_bytes).
    variant_cache_bytes: int | None = Field(None, gt=0)
    # Bytes of compressed layers kept on disk in the run folder (cache/variants), shared by the workers of a
    # machine, a resumed search and the exports (None: four float32 copies of the model, at most a quarter
    # of the free disk; 0: none).
    variant_store_bytes: int | None = Field(None, ge=0)
    # Healing activations above this many bytes turn on gradient checkpointing (None: what half the worker's
    # memory share leaves beside two copies of the model and its variant cache; search.trial.heal_budget).
    heal_activation_bytes: int | None = Field(None, gt=0)


class Experiment(BaseModel):
    """One search: which model, on which phone, over which space, scored how."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    phone: str  # a phone profile name or YAML file (autosquash.cost); where trials compute is hardware.device
    search_space: str
    objectives: list[Objective] = Field(default_factory=lambda: ["perplexity", "memory"], min_length=2)
    trials: int = Field(24, gt=0)
    workers: int = Field(1, gt=0)
    sampler: SamplerName = "tpe"
    seed: int = 0
    context_tokens: int = Field(2048, gt=0)
    calibration: CalibrationSpec = CalibrationSpec(source="wikipedia")
    evaluation: TextSpec = TextSpec(source="lambada")
    # The front's numbers to report, on tokens the search did not select on (None: the evaluation source's
    # next tokens after the evaluation set, of its size; where the source has too few, no test split).
    test: TextSpec | None = None
    topk: int = Field(32, gt=0)
    heal: HealSpec = HealSpec()
    benchmark: BenchmarkSpec = BenchmarkSpec()
    hardware: HardwareSpec = HardwareSpec()

    @field_validator("calibration", mode="before")
    @classmethod
    def _calibration_spec(cls, v):
        """A plain TextSpec is a calibration set without compensation."""
        return v.model_dump() if isinstance(v, TextSpec) and not isinstance(v, CalibrationSpec) else v

    @property
    def quality_objective(self) -> str:
        """The objective that measures quality: perplexity or kl."""
        quality = [o for o in self.objectives if o in ("perplexity", "kl")]
        return quality[0]

    def resolved(self, folder: Path) -> Experiment:
        """The same experiment with paths relative to `folder` (its file's folder) made absolute.

        A value that names no existing file there (a shipped model, phone or text) stays as it is.
        """

        fix = partial(resolve_path, folder=folder)
        return self.model_copy(
            update={
                "model": fix(self.model),
                "phone": fix(self.phone),
                "search_space": fix(self.search_space),
                "calibration": self.calibration.model_copy(update={"source": fix(self.calibration.source)}),
                "evaluation": self.evaluation.model_copy(update={"source": fix(self.evaluation.source)}),
                "test": None if self.test is None else self.test.model_copy(update={"source": fix(self.test.source)}),
            }
        )


def resolve_path(value: str, folder: Path) -> str:
    """`value` as an absolute path when it names an existing file or folder relative to `folder`, else as it is
    (a shipped name, a hub id, an absolute path)."""
    p = folder / value
    return str(p.resolve()) if not Path(value).is_absolute() and p.exists() else value


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML file; relative paths in it are taken from its folder."""
    exp = validate(Experiment, _renamed_fields(read_yaml(path), path), str(path), Path(path))
    quality = [o for o in exp.objectives if o in ("perplexity", "kl")]
    if len(quality) != 1 or "memory" not in exp.objectives or len(set(exp.objectives)) != len(exp.objectives):
        raise AutosquashError(
            f"{path}: field 'objectives': expected one of perplexity/kl, then memory, optionally energy"
        )
    exp = exp.resolved(Path(path).parent)
    # Only the plain case, named by its field before anything loads; trial.load_inputs compares the
    # tokens themselves, which also catches the same text under two different names.
    if exp.calibration.source == exp.evaluation.source:
        raise AutosquashError(f"{path}: field 'evaluation.source': must differ from calibration.source")
    return exp


def _renamed_fields(data, path: str | Path):
    """`data` with the phone under its field's old name, `device:`, moved to `phone:` (announced: `device` now
    means only the torch device, `hardware.device`)."""
    if not isinstance(data, dict) or "device" not in data:
        return data
    if "phone" in data:
        raise AutosquashError(
            f"{path}: fields 'phone' and 'device' both given; 'device' is the old name of 'phone': keep only 'phone'"
        )
    warnings.warn(
        f"{path}: field 'device' is deprecated (it names the phone profile); write 'phone: {data['device']}'",
        DeprecatedInput,
        stacklevel=3,
    )
    return {("phone" if k == "device" else k): v for k, v in data.items()}
