"""Where the sensitivity profile's time goes: `measure_profile` on a random-weight Llama of one of
`benchmarks/scale.py`'s shapes, with the default search space, each of its parts timed (probe passes, the
probes' quantized weights, the per-layer errors, the token table's options), beside one plain forward pass
over the same calibration tokens (2048 random token ids, 8 x 256 as the default experiment calibrates; the
cost does not depend on what the tokens say).

    .venv/bin/python benchmarks/profile_cost.py --size 1.1b          # about 12 minutes on 2 cores
    .venv/bin/python benchmarks/profile_cost.py --size 135m --layers 4
Prints one line of seconds per part (parts nest: `table_variant` is inside `_embed_profile`).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import SIZES, _config  # noqa: E402

PARTS = ("_block_inputs", "_group_errors", "_dense_swaps", "_probe", "_embed_profile", "table_variant")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1.1b", choices=list(SIZES))
    p.add_argument("--layers", type=int, help="fewer blocks than the shape has (a quicker look)")
    args = p.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from autosquash.compress.calibrate import collect_stats
    from autosquash.evaluate.proxy import reference
    from autosquash.models.arch import Arch
    from autosquash.search import profile as sensitivity  # the measurement: search/profile.py
    from autosquash.search.space import SearchSpace
    from autosquash.yaml_io import load_yaml_model

    config = _config(args.size)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    arch = Arch.from_config(model.config)
    space = load_yaml_model(SearchSpace, ROOT / "search_spaces/gguf-mixed.yaml")
    calib = torch.randint(0, config["vocab_size"], (8, 256), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    stats = collect_stats(model, calib)
    stats_s = time.perf_counter() - t0
    ref = reference(model, calib, 32)
    spent: dict[str, float] = {}

    def timed(name, f):
        @functools.wraps(f)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    for name in PARTS:
        setattr(sensitivity, name, timed(name, getattr(sensitivity, name)))
    t0 = time.perf_counter()
    sensitivity.measure_profile(model, arch, space, stats, ref, 2048)
    profile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference(model, calib, 32)
    forward_s = time.perf_counter() - t0
    parts = ", ".join(f"{k} {spent.get(k, 0.0):.1f}" for k in PARTS)
    print(
        f"{args.size} ({arch.n_layers} blocks): statistics {stats_s:.1f} s, profile {profile_s:.1f} s "
        f"= {profile_s / forward_s:.1f} x one forward pass ({forward_s:.1f} s); parts, s: {parts}"
    )


if __name__ == "__main__":
    main()
