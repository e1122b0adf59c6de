"""Kronecker products (plain and with learned permutations) next to truncated SVD, at equal parameter count.

On SmolLM2-135M's q_proj, o_proj, gate_proj and down_proj of a few blocks, at about 25 % and 10 % of each
layer's dense parameters, prints the relative Frobenius error ||W - Ŵ|| / ||W||, the relative output error
||X (W - Ŵ)^T|| / ||X W^T|| on held-out activations X (LAMBADA text), and seconds. The activation-aware variants
(svd-aa: ASVD; kron+perm-aa: columns weighted by sqrt(E[x²])) take E[x²] from Wikipedia text, never from X.

    python benchmarks/kronecker_vs_svd.py [--threads 1] [--blocks 0 10 20 29] [--iters 8] [--tokens 512]
"""

from __future__ import annotations

import argparse
import time

import torch

from autosquash.compress.calibrate import collect_inputs
from autosquash.compress.operators.kron import kron_factors, kron_shape
from autosquash.compress.operators.svd import svd_factors
from autosquash.evaluate.texts import load_texts, token_block
from autosquash.models.load import load_model, load_tokenizer

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
KEEP = (0.25, 0.10)
METHODS = ("svd", "svd-aa", "kron", "kron+perm", "kron+perm-aa")
COMPARED = (("kron+perm", "kron"), ("kron+perm", "svd"), ("kron+perm-aa", "kron+perm"), ("kron+perm-aa", "svd-aa"))


def _moved(perm: torch.Tensor) -> float:
    return float((perm != torch.arange(len(perm))).float().mean())


def _approximations(
    w: torch.Tensor, keep: float, input_sq: torch.Tensor, iters: int
) -> tuple[dict[str, tuple[torch.Tensor, int, float]], tuple[float, float], float]:
    """Each method's Ŵ, stored values and seconds at `keep` of the dense parameter count; the share of rows and of
    columns that kron+perm moved; the Kronecker layer's multiply-adds per token over the dense layer's."""
    out_f, in_f = w.shape
    m1, m2, n1, n2 = kron_shape(out_f, in_f)
    budget = keep * out_f * in_f
    svd_rank = max(1, round(budget / (out_f + in_f)))
    kron_rank = max(1, round(budget / (m1 * n1 + m2 * n2)))
    results = {}
    for method in METHODS:
        sq = input_sq if method.endswith("-aa") else None
        start = time.perf_counter()
        if method.startswith("svd"):
            a, b = svd_factors(w, svd_rank, sq)
            approx, params = b @ a, a.numel() + b.numel()
        else:
            f = kron_factors(w, kron_rank, permute="perm" in method, iters=iters, input_sq=sq)
            approx, params = f.matrix(), f.n_params
            if method == "kron+perm":
                moved, macs = (_moved(f.row_perm), _moved(f.col_perm)), f.macs_per_token / w.numel()
        results[method] = approx, params, time.perf_counter() - start
    return results, moved, macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--blocks", type=int, nargs="+", default=[0, 10, 20, 29], help="decoder blocks to compress")
    parser.add_argument("--iters", type=int, default=8, help="permutation search rounds (default 8)")
    parser.add_argument("--tokens", type=int, default=512, help="calibration and held-out tokens each (default 512)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model("smollm2-135m")
    tokenizer = load_tokenizer("smollm2-135m")
    paths = [f"model.layers.{i}.{name}" for i in args.blocks for name in LINEARS]
    calib = collect_inputs(model, token_block(tokenizer, load_texts("wikipedia"), args.tokens, 128), paths)
    held_out = collect_inputs(model, token_block(tokenizer, load_texts("lambada"), args.tokens, 128), paths)

    print(f"torch threads: {torch.get_num_threads()}; errors as frob / out (relative); kron+perm also stores")
    print("(m + n) int16 permutation indices, the -aa Kronecker variant n column scales (counted in its params);")
    print("kron MACs: multiply-adds per token through the factors over the dense layer's (SVD: its params / dense)")
    header = (
        f"{'layer':<16} {'keep':>4} {'svd params':>10} {'kron params':>11} | "
        + " | ".join(f"{m:^11}" for m in METHODS)
        + f" | {'s svd/kron/perm':>15} | {'moved r/c':>9} | {'kron MACs':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for path in paths:
        w = model.get_submodule(path).weight.data.float()
        x, input_sq = held_out[path], calib[path].square().mean(0)
        reference = (x @ w.T).norm()
        for keep in KEEP:
            results, moved, macs = _approximations(w, keep, input_sq, args.iters)
            errors = {
                m: (float((a - w).norm() / w.norm()), float((x @ (w - a).T).norm() / reference))
                for m, (a, _, _) in results.items()
            }
            rows.append(errors)
            layer = path.removeprefix("model.layers.").replace(".self_attn.", ".").replace(".mlp.", ".")
            seconds = "/".join(f"{results[m][2]:.1f}" for m in ("svd", "kron", "kron+perm"))
            print(
                f"{layer:<16} {keep:>4.0%} {results['svd'][1]:>10} {results['kron'][1]:>11} | "
                + " | ".join(f"{errors[m][0]:.3f} {errors[m][1]:.3f}" for m in METHODS)
                + f" | {seconds:>15} | {moved[0]:>4.0%}/{moved[1]:<4.0%} | {macs:>8.1f}x"
            )
    # An activation-aware fit minimises a weighted norm, so only its output error is compared.
    for metric, i, pairs in (("Frobenius", 0, COMPARED[:2]), ("output", 1, COMPARED)):
        wins = ", ".join(f"{x} beats {y} in {sum(e[x][i] < e[y][i] for e in rows)}/{len(rows)}" for x, y in pairs)
        print(f"{metric} error, layer-sizes where {wins}")


if __name__ == "__main__":
    main()
