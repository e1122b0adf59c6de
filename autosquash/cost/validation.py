"""The cost model against published phone measurements (measurements.yaml), out of sample.

Per group (one phone, one runtime): decode time per token is fitted as a * bytes read + b (the cost model's
law: a = 1 / (eta * peak bandwidth), b its fixed overhead per token) on every model but one, and the held-out
model's rows are predicted; energy per token likewise as e * bytes + MACs * e_mac + P * time, with time the
held-out speed prediction. Bytes and MACs per token are the cost model's own, from each model's shape and the
GGUF types its file is priced as. Groups with a single model leave one row out instead (one quantization).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from autosquash.compress.plan import Plan, deployed_tensors
from autosquash.compress.recipes import llama_cpp_mixture
from autosquash.cost.model import CostReport, estimate
from autosquash.cost.phone import load_phone
from autosquash.models.arch import Arch

MAC_ENERGY_J = 5.0e-13  # the profiles' arithmetic energy (Horowitz, ISSCC 2014, scaled to 3-4 nm)
DEFAULT_CONTEXT, DEFAULT_PROMPT = 2048, 512


def measurements_path() -> Path:
    return Path(str(resources.files("autosquash.cost") / "measurements.yaml"))


def load_measurements(path: Path | None = None) -> dict:
    """The dataset: `models` (shapes), `sources` and `rows`; every row's source is one of `sources`."""
    data = yaml.safe_load((path or measurements_path()).read_text())
    for r in data["rows"]:
        if r["source"] not in data["sources"]:
            raise ValueError(f"row {r['group']} {r['model']} {r['quant']}: unknown source {r['source']!r}")
        if r["model"] not in data["models"]:
            raise ValueError(f"row {r['group']} {r['model']}: no shape for the model in `models`")
    return data


def plan_for(arch: Arch, weights: dict) -> Plan:
    """The plan a row's file is priced as: a llama.cpp recipe, or one type per kind of tensor."""
    if "recipe" in weights:
        return llama_cpp_mixture(arch, weights["recipe"])
    head = weights.get("head")
    # A tied table is also the output head: it takes the head's type where one is given (llama.cpp's rule).
    embed = head if head and arch.tied_embeddings else weights["embed"]
    plan = Plan.uniform(arch, weights["linear"], embed_quant=embed)
    return plan if arch.tied_embeddings or not head else plan.model_copy(update={"output_quant": head})


def price(row: dict, models: dict) -> CostReport:
    """The cost model's report for a row's file (context and prompt as the row states, else the defaults);
    its speed and energy fields use the iPhone 16 profile's constants, which the fits replace."""
    arch = Arch.from_config(models[row["model"]])
    plan = plan_for(arch, row["weights"])
    return estimate(
        arch,
        deployed_tensors(arch, plan),
        load_phone("iphone-16"),
        context_tokens=row.get("context_tokens") or DEFAULT_CONTEXT,
        prompt_tokens=row.get("prompt_tokens") or DEFAULT_PROMPT,
    )


def _fit_time(bytes_read: np.ndarray, tokens_per_s: np.ndarray) -> tuple[float, float]:
    """(a, b) of time = a * bytes + b, least squares in relative error, b >= 0 (at least one row)."""
    x, t = bytes_read, 1.0 / tokens_per_s
    if len(x) >= 2 and np.ptp(x) > 0:
        a, b = np.linalg.lstsq(np.stack([x / t, 1 / t], 1), np.ones_like(x), rcond=None)[0]
        if b >= 0 and a > 0:
            return float(a), float(b)
    return float(np.sum(x / t) / np.sum((x / t) ** 2)), 0.0  # through the origin


def _fit_energy(bytes_read, macs, seconds, joules) -> tuple[float, float]:
    """(e per byte, P watts) of energy = e * bytes + MACs * MAC_ENERGY_J + P * time, relative least squares,
    both >= 0."""
    y = 1 - macs * MAC_ENERGY_J / joules
    a = np.stack([bytes_read / joules, seconds / joules], 1)
    if len(y) >= 2:
        e, p = np.linalg.lstsq(a, y, rcond=None)[0]
        if e >= 0 and p >= 0:
            return float(e), float(p)
    fits = [(float(np.sum(a[:, i] * y) / np.sum(a[:, i] ** 2)), i) for i in (0, 1)]
    (best, i) = min(fits, key=lambda f: float(np.sum((a[:, f[1]] * f[0] - y) ** 2)))
    return (best, 0.0) if i == 0 else (0.0, best)


@dataclass
class Prediction:
    """One row, predicted from the other models of its group."""

    group: str
    soc: str
    model: str
    quant: str
    held_out: str  # what the fit left out: "model" or "row"
    weights_mb: float
    bytes_read_mb: float
    decode_measured: float
    decode_predicted: float
    energy_measured: float | None = None
    energy_predicted: float | None = None
    file_mb: float | None = None

    @property
    def decode_error_pct(self) -> float:
        return 100 * (self.decode_predicted / self.decode_measured - 1)

    @property
    def energy_error_pct(self) -> float | None:
        if self.energy_measured is None or self.energy_predicted is None:
            return None
        return 100 * (self.energy_predicted / self.energy_measured - 1)


def validate(data: dict | None = None) -> list[Prediction]:
    """Every row of every group with at least two models (or two rows of one model), predicted out of sample."""
    data = data or load_measurements()
    rows = data["rows"]
    priced = [price(r, data["models"]) for r in rows]
    out = []
    for group in dict.fromkeys(r["group"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["group"] == group]
        models = {rows[i]["model"] for i in idx}
        by_model = len(models) >= 2
        if not by_model and len(idx) < 3:
            continue
        for i in idx:
            train = [j for j in idx if (rows[j]["model"] != rows[i]["model"] if by_model else j != i)]
            b = np.array([priced[j].bytes_read_per_token for j in train])
            a, c = _fit_time(b, np.array([rows[j]["decode_tokens_per_s"] for j in train]))
            p = priced[i]
            seconds = a * p.bytes_read_per_token + c
            pred = Prediction(
                group=group,
                soc=rows[i]["soc"],
                model=rows[i]["model"],
                quant=rows[i]["quant"],
                held_out="model" if by_model else "row",
                weights_mb=p.weights_bytes / 2**20,
                bytes_read_mb=p.bytes_read_per_token / 2**20,
                decode_measured=rows[i]["decode_tokens_per_s"],
                decode_predicted=1 / seconds,
                file_mb=rows[i].get("file_mb"),
            )
            energy_train = [j for j in train if rows[j].get("energy_j_per_token")]
            if rows[i].get("energy_j_per_token") and len(energy_train) >= 2:
                e, watts = _fit_energy(
                    np.array([priced[j].bytes_read_per_token for j in energy_train]),
                    np.array([priced[j].macs_per_token for j in energy_train]),
                    np.array([1 / rows[j]["decode_tokens_per_s"] for j in energy_train]),
                    np.array([rows[j]["energy_j_per_token"] for j in energy_train]),
                )
                pred.energy_measured = rows[i]["energy_j_per_token"]
                pred.energy_predicted = p.bytes_read_per_token * e + p.macs_per_token * MAC_ENERGY_J + watts * seconds
            out.append(pred)
    return out


def median_abs(values: list[float]) -> float | None:
    return statistics.median(abs(v) for v in values) if values else None
