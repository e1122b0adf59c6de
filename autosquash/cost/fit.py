"""A phone profile's speed and energy constants fitted to measured decode rows (tokens/s and J/token of known
models on that phone), as the fitted constants of `galaxy-s25-ultra.yaml` were: each by least squares in
relative error, since the rows span a 16x range of model size.

Speed: the model's decode time is bytes_read / (bandwidth_efficiency * peak_bandwidth) + fixed_overhead, linear
in (1 / bandwidth_efficiency, fixed_overhead). Energy: bytes_read * dram_energy_j_per_byte + MACs * mac_energy_j
+ static_power_w * time, with mac_energy_j from the literature (arithmetic is a small share) and the time the
fitted speed model's, so that a plan's price uses the same time it is fitted with (`fit_profile`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autosquash.errors import AutosquashError


@dataclass(frozen=True)
class DecodeRow:
    """One measured decode: the cost model's bytes read and MACs per token for the model as run, and what the
    phone measured."""

    bytes_read: float
    macs: float
    tokens_per_s: float
    j_per_token: float


def _relative_lstsq(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """x minimising sum ((features @ x - target) / target)^2."""
    x, *_ = np.linalg.lstsq(features / target[:, None], np.ones_like(target), rcond=None)
    return x


def fit_speed(rows: list[DecodeRow], peak_bandwidth: float) -> tuple[float, float]:
    """(bandwidth_efficiency, fixed_overhead_s_per_token) of the rows' decode times."""
    if len(rows) < 2:
        raise AutosquashError("fitting decode speed needs at least two measured rows")
    b = np.array([r.bytes_read for r in rows], dtype=np.float64)
    t = 1.0 / np.array([r.tokens_per_s for r in rows], dtype=np.float64)
    inv_bandwidth, fixed = _relative_lstsq(np.stack([b, np.ones_like(b)], axis=1), t)
    return float(1.0 / (inv_bandwidth * peak_bandwidth)), float(fixed)


def fit_energy(rows: list[DecodeRow], mac_energy_j: float, seconds: list[float]) -> tuple[float, float]:
    """(dram_energy_j_per_byte, static_power_w) of the rows' J/token, given each row's decode time `seconds` and
    the MACs priced at `mac_energy_j`."""
    if len(rows) < 2:
        raise AutosquashError("fitting energy needs at least two measured rows")
    b = np.array([r.bytes_read for r in rows], dtype=np.float64)
    rest = np.array([r.j_per_token - r.macs * mac_energy_j for r in rows], dtype=np.float64)
    j_per_byte, watts = _relative_lstsq(np.stack([b, np.array(seconds, dtype=np.float64)], axis=1), rest)
    return float(j_per_byte), float(watts)


def _decode_seconds(bytes_read: float, efficiency: float, fixed: float, peak_bandwidth: float) -> float:
    """The cost model's decode time per token (cost.model.estimate's)."""
    return bytes_read / (efficiency * peak_bandwidth) + fixed


def fit_profile(rows: list[DecodeRow], peak_bandwidth: float, mac_energy_j: float) -> dict[str, float]:
    """The four fitted constants of a phone profile: speed first, then energy at the fitted decode times."""
    efficiency, fixed = fit_speed(rows, peak_bandwidth)
    seconds = [_decode_seconds(r.bytes_read, efficiency, fixed, peak_bandwidth) for r in rows]
    j_per_byte, watts = fit_energy(rows, mac_energy_j, seconds)
    return {
        "bandwidth_efficiency": efficiency,
        "fixed_overhead_s_per_token": fixed,
        "dram_energy_j_per_byte": j_per_byte,
        "static_power_w": watts,
    }


def predict(row: DecodeRow, constants: dict[str, float], peak_bandwidth: float, mac_energy_j: float):
    """(tokens/s, J/token) the fitted constants give for `row`'s bytes and MACs."""
    efficiency, fixed = constants["bandwidth_efficiency"], constants["fixed_overhead_s_per_token"]
    s = _decode_seconds(row.bytes_read, efficiency, fixed, peak_bandwidth)
    joules = row.bytes_read * constants["dram_energy_j_per_byte"] + row.macs * mac_energy_j
    return 1.0 / s, joules + constants["static_power_w"] * s
