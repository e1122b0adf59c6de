"""The fitted constants of autosquash/cost/profiles/galaxy-s25-ultra.yaml, from the three llama.cpp decode rows
measured on that phone at Q4_K_M (DESIGN.md §4), and how well each row is predicted when it is left out of the
fit. For another phone, put its measured rows (model config, tokens/s, J/token) in ROWS and its peak bandwidth in
PHONE's profile.

    .venv/bin/python scripts/fit_phone_profile.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autosquash.compress.plan import deployed_tensors  # noqa: E402
from autosquash.compress.recipes import llama_cpp_mixture  # noqa: E402
from autosquash.cost import estimate, load_phone  # noqa: E402
from autosquash.cost.fit import DecodeRow, fit_profile, predict  # noqa: E402
from autosquash.models.arch import Arch  # noqa: E402

PHONE = "galaxy-s25-ultra"
CONFIGS = ROOT / "tests" / "cost" / "configs"  # the models' config.json files (shapes only)
# llama.cpp on the Galaxy S25 Ultra's CPU at Q4_K_M (DESIGN.md §4): model, tokens/s, J/token.
ROWS = [("Llama-3.1-8B", 10.45, 2.92), ("Qwen2.5-3B", 19.84, 1.52), ("Qwen2-0.5B", 50.45, 0.44)]


def decode_rows(phone_name: str = PHONE, rows=ROWS) -> list[DecodeRow]:
    """Each measured row with the cost model's bytes read and MACs per token for its model at Q4_K_M."""
    phone = load_phone(phone_name)
    out = []
    for model, tokens_per_s, j_per_token in rows:
        arch = Arch.from_json(CONFIGS / model)
        r = estimate(arch, deployed_tensors(arch, llama_cpp_mixture(arch, "Q4_K_M")), phone)
        out.append(DecodeRow(r.bytes_read_per_token, r.macs_per_token, tokens_per_s, j_per_token))
    return out


def main() -> None:
    phone = load_phone(PHONE)
    rows = decode_rows()
    fitted = fit_profile(rows, phone.peak_bandwidth_bytes_per_s, phone.mac_energy_j)
    print(f"{PHONE}: fitted to {len(rows)} rows (the profile holds these, rounded)")
    for key, value in fitted.items():
        print(f"  {key}: {value:.4g}  (profile: {getattr(phone, key):.4g})")
    print("each row left out of the fit and predicted from the others:")
    for i, (row, (model, _, _)) in enumerate(zip(rows, ROWS, strict=True)):
        rest = fit_profile(rows[:i] + rows[i + 1 :], phone.peak_bandwidth_bytes_per_s, phone.mac_energy_j)
        tps, joules = predict(row, rest, phone.peak_bandwidth_bytes_per_s, phone.mac_energy_j)
        print(
            f"  {model}: {tps:.1f} tok/s (measured {row.tokens_per_s}, {tps / row.tokens_per_s - 1:+.0%}), "
            f"{joules:.2f} J/token (measured {row.j_per_token}, {joules / row.j_per_token - 1:+.0%})"
        )


if __name__ == "__main__":
    main()
