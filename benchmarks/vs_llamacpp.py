"""autosquash's front against llama.cpp's own quantizer, importance matrix included, scored by llama.cpp.

The peer is what a phone user would run instead: `llama-quantize` on the base model, with an importance
matrix from `llama-imatrix` on the search's own calibration text, for llama.cpp's recipes. Every front plan of
a finished search is exported (with its adapter, where its trial kept one). Every file, peer and ours, is
scored by `llama-perplexity --kl-divergence` against the base model's logits on test text that neither the
calibration, the importance matrix nor the search's selection saw: LAMBADA passages after those the search's
evaluation set took. Per peer file: its size, mean KL, perplexity, same-top-token share, and the best front
plan no larger, with the KL ratio (front / peer; below 1 the front wins).

    .venv/bin/python benchmarks/vs_llamacpp.py --run runs/smollm2-135m-iphone16   # a finished search
    .venv/bin/python benchmarks/vs_llamacpp.py --run DIR --recipes Q4_K_M,Q4_0 --no-front
    .venv/bin/python benchmarks/vs_llamacpp.py --run DIR --allocator ~/tools/allocator --damage-model

`--allocator DIR` adds llama.cpp's per-tensor allocator (`llama-quantize --target-size`, PR 15550, from branch
`quantize` of github.com/EAddario/llama.cpp; DIR holds that branch's llama-quantize and llama-imatrix, which
autosquash does not build): asked for each front plan's exact file size (its adapter included), with its own
branch's importance matrix on the same calibration text, and compared at that size. `--damage-model` adds, at
each front plan's size, the plan autosquash's damage model alone picks for it (the sensitivity profile the search
measured, its knapsack at that plan's size: no trials, no healing), so the table shows what the measured trials,
healing and pruning add over a one-shot allocation.

The tools come from scripts/llama_tools.sh (built once from the pinned llama-cpp-python sdist, or found on
PATH). Writes benchmarks/results/vs_llamacpp.txt and .json. The recipes made with the importance matrix are
also scored as the search scores its trials (its quality metric on its evaluation tokens, priced as stored on its
phone) into the run's peers.csv, and the run's front plots (folder and MLflow) are re-drawn with them marked;
`autosquash report` shows them too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import table  # noqa: E402

# llama.cpp's recipes a phone user picks between (llama-quantize names).
RECIPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_K_M", "IQ4_NL", "IQ4_XS")
TEST_TOKENS = 16384  # test text: 32 windows of 512 tokens (llama-perplexity scores the second half of each)
CONTEXT = 512


def tools() -> Path:
    """The folder holding llama-quantize, llama-imatrix and llama-perplexity (built on first use)."""
    out = subprocess.run(["bash", str(ROOT / "scripts/llama_tools.sh")], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"vs_llamacpp: the llama.cpp tools could not be built:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _run(cmd: list, log: Path) -> str:
    """Run a tool, its output kept in `log`; a failure ends the benchmark naming the command."""
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        sys.exit(f"vs_llamacpp: {' '.join(map(str, cmd[:3]))} ... failed; see {log}")
    return out.stdout + out.stderr


def texts(exp, folder: Path) -> tuple[Path, Path]:
    """(calibration text file, test text file): the passages the search calibrated on, and LAMBADA passages
    after every one its evaluation set used."""
    from autosquash.evaluate.texts import load_texts
    from autosquash.models.load import load_tokenizer

    tok = load_tokenizer(exp.model)

    def take(passages, tokens: int, skip: int = 0) -> tuple[list[str], int]:
        out, count, used = [], 0, skip
        for p in passages[skip:]:
            if count >= tokens:
                break
            out.append(p)
            count += len(tok(p, add_special_tokens=False)["input_ids"]) + 1
            used += 1
        return out, used

    calib, _ = take(load_texts(exp.calibration.source), exp.calibration.tokens)
    evaluation = load_texts(exp.evaluation.source)
    _, used = take(evaluation, exp.evaluation.tokens)  # what the search selected on
    test, _ = take(evaluation, TEST_TOKENS * 5 // 4, skip=used)  # llama.cpp's tokens run a little shorter
    (folder / "calibration.txt").write_text("\n\n".join(calib))
    (folder / "test.txt").write_text("\n\n".join(test))
    return folder / "calibration.txt", folder / "test.txt"


def base_gguf(exp, path: Path) -> None:
    """The base model as a lossless F32 GGUF file (the peer's input)."""
    from autosquash.compress.plan import Plan
    from autosquash.export.build import BuiltModel
    from autosquash.export.gguf_file import write_gguf
    from autosquash.models.arch import Arch
    from autosquash.models.load import load_model

    base = load_model(exp.model, seed=exp.seed)
    arch = Arch.from_config(base.config)
    write_gguf(path, BuiltModel(exp.model, base, arch, Plan.uniform(arch, "F32"), {}))


def score(bin_dir: Path, model: Path, test: Path, kld_base: Path, log: Path, lora: Path | None = None) -> dict:
    """llama-perplexity's KL divergence statistics of `model` against the base logits in `kld_base`."""
    cmd = [bin_dir / "llama-perplexity", "-m", model, "-f", test, "-c", CONTEXT, "-t", os.cpu_count() or 1]
    cmd += ["--kl-divergence-base", kld_base, "--kl-divergence"]
    if lora is not None:
        cmd += ["--lora", lora]
    return _stats(_run(cmd, log), log)


def base_logits(bin_dir: Path, base: Path, test: Path, kld_base: Path) -> None:
    """The base model's logits on the test text, kept in `kld_base` for the KL of every other file."""
    cmd = [bin_dir / "llama-perplexity", "-m", base, "-f", test, "-c", CONTEXT, "-t", os.cpu_count() or 1]
    _run([*cmd, "--kl-divergence-base", kld_base], kld_base.with_suffix(".log"))


def _stats(text: str, log: Path) -> dict:
    """KL, perplexity and same-top share from llama-perplexity's output."""

    def number(pattern: str) -> float:
        m = re.search(pattern, text)
        if m is None:
            sys.exit(f"vs_llamacpp: no {pattern!r} in llama-perplexity's output ({log})")
        return float(m.group(1))

    return {
        "kl": number(r"Mean\s+KLD:\s+([-\d.eE+]+)"),
        "perplexity": number(r"Mean PPL\(Q\)\s*:\s*([\d.eE+]+)"),
        "same_top_pct": number(r"Same top p:\s*([\d.]+)"),
    }


def front_files(run: Path, folder: Path, near: list[float] | None = None) -> list[dict]:
    """Every front plan of the search in `run` exported as GGUF (and its adapter), with its trial number; with
    `near` (MB of weights a file of each peer's size holds), only the plans the table compares: for each, the three
    largest no larger."""
    rows = list(csv.DictReader(open(run / "pareto.csv")))
    if near is not None:
        ordered = sorted(rows, key=lambda r: float(r["weights_mb"]))
        keep = set()
        for mb in near:
            under = [r["trial"] for r in ordered if float(r["weights_mb"]) <= mb]
            keep.update(under[-3:])
        rows = [r for r in rows if r["trial"] in keep]
    out = []
    for r in rows:
        path = folder / f"front-{int(r['trial']):04d}.gguf"
        if not path.exists():
            cmd = [sys.executable, "-m", "autosquash", "export", "--run", run, "--trial", r["trial"], "--out", path]
            _run(cmd, folder / f"export-{int(r['trial']):04d}.log")
        lora = path.with_suffix(".lora.gguf")
        out.append({"trial": int(r["trial"]), "path": path, "lora": lora if lora.exists() else None})
    return out


def _mb(*paths: Path | None) -> float:
    return sum(p.stat().st_size for p in paths if p is not None) / 1e6


def _tensor_mb(path: Path) -> float:
    """MB of a GGUF file's tensor data alone."""
    from autosquash.formats.gguf import open_gguf

    return sum(int(t.n_bytes) for t in open_gguf(path).tensors) / 1e6


def allocator_files(tools: Path, base: Path, calib: Path, front: list[dict], work: Path, seq_len: int) -> list[dict]:
    """The allocator's file at each front plan's size (bytes, adapter included), with its own importance matrix."""
    threads = str(os.cpu_count() or 1)
    imatrix = work / "allocator-imatrix.gguf"
    if not imatrix.exists():
        cmd = [tools / "llama-imatrix", "-m", base, "-f", calib, "-o", imatrix, "-c", seq_len, "-t", threads]
        _run(cmd, work / "allocator-imatrix.log")
    out = []
    for f in front:
        size = int(round(f["mb"] * 1e6))
        path = work / f"allocator-{f['trial']:04d}.gguf"
        if not path.exists():
            cmd = [tools / "llama-quantize", "--imatrix", imatrix, "--target-size", f"{size}b", base, path, "Q8_0"]
            _run([*cmd, threads], path.with_suffix(".quantize.log"))
        out.append({"trial": f["trial"], "path": path})
    return out


def damage_model_files(run: Path, exp, front: list[dict], work: Path) -> list[dict]:
    """At each front plan's size (as the damage model prices it), the plan the damage model alone picks, exported."""
    import optuna

    from autosquash.compress.plan import Plan
    from autosquash.models.load import load_arch
    from autosquash.search.profile import Profile
    from autosquash.search.sensitivity import best_under
    from autosquash.search.space import SearchSpace
    from autosquash.yaml_io import dump_yaml_model, load_yaml_model

    found = sorted((run / "cache").glob("sensitivity-*.json"), key=lambda p: p.stat().st_mtime)
    profile = Profile.from_json(found[-1].read_text()) if found else None
    if profile is None:
        sys.exit(f"vs_llamacpp: {run}/cache holds no sensitivity profile of this version (a sensitivity search's)")
    space, arch = SearchSpace.load(exp.search_space), load_arch(exp.model)
    out = []
    for f in front:
        plan = load_yaml_model(Plan, run / "plans" / f"trial-{f['trial']:04d}.yaml")
        budget = profile.size(*profile.picks_of(space.params_of(plan, arch)))
        picks = best_under(profile, budget)
        if picks is None:
            continue
        one_shot = space.sample(optuna.trial.FixedTrial(profile.params(*picks)), arch)
        plan_file, path = work / f"damage-{f['trial']:04d}.yaml", work / f"damage-{f['trial']:04d}.gguf"
        dump_yaml_model(one_shot, plan_file)
        if not path.exists():
            cmd = [sys.executable, "-m", "autosquash", "export", "--model", exp.model, "--plan", plan_file]
            _run([*cmd, "--out", path], path.with_suffix(".export.log"))
        out.append({"trial": f["trial"], "path": path})
    return out


def equal_size_report(front: list[dict], allocator: dict[int, dict], damage: dict[int, dict]) -> str:
    """Each front plan beside the allocator's file and the damage model's one-shot plan at its size."""
    head = ["trial", "MB", "KL", "allocator MB", "its KL", "ratio", "damage model MB", "its KL", "ratio"]
    body = []
    for f in sorted(front, key=lambda f: f["mb"]):
        row = [f["trial"], f"{f['mb']:.2f}", f"{f['kl']:.4f}"]
        for other in (allocator.get(f["trial"]), damage.get(f["trial"])):
            if other is None:
                row += ["", "", ""]
            else:
                row += [f"{other['mb']:.2f}", f"{other['kl']:.4f}", f"{f['kl'] / max(other['kl'], 1e-12):.2f}"]
        body.append(row)
    return table(head, body)


def report(peers: list[dict], front: list[dict], base: dict) -> str:
    head = ["peer file", "imatrix", "MB", "KL", "ppl", "same top %", "best front <= MB", "its MB", "its KL", "KL ratio"]
    body = []
    for p in sorted(peers, key=lambda p: p["mb"]):
        fits = [f for f in front if f["mb"] <= p["mb"]]
        best = min(fits, key=lambda f: f["kl"]) if fits else None
        body.append(
            [
                p["recipe"],
                "yes" if p["imatrix"] else "no",
                f"{p['mb']:.1f}",
                f"{p['kl']:.4f}",
                f"{p['perplexity']:.2f}",
                f"{p['same_top_pct']:.1f}",
                f"trial {best['trial']}" if best else "none",
                f"{best['mb']:.1f}" if best else "",
                f"{best['kl']:.4f}" if best else "",
                f"{best['kl'] / max(p['kl'], 1e-12):.2f}" if best else "",
            ]
        )
    lines = [
        f"base model (F32): ppl {base['perplexity']:.2f} on the test text",
        table(head, body),
        "",
        "front plans (scored the same way)",
        table(
            ["trial", "MB", "KL", "ppl", "same top %", "adapter"],
            [
                [
                    f["trial"],
                    f"{f['mb']:.1f}",
                    f"{f['kl']:.4f}",
                    f"{f['perplexity']:.2f}",
                    f"{f['same_top_pct']:.1f}",
                    "yes" if f["lora"] else "no",
                ]
                for f in sorted(front, key=lambda f: f["mb"])
            ],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    from autosquash.search.experiment import load_experiment

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished search's output folder (its experiment and front)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="llama-quantize types, comma-separated")
    p.add_argument("--no-front", action="store_true", help="score the peer files only")
    p.add_argument("--work", default=str(ROOT / "benchmarks/out/vs_llamacpp"), help="folder for the files")
    p.add_argument("--results", default=str(ROOT / "benchmarks/results"), help="folder for the table")
    p.add_argument(
        "--front-near-peers",
        action="store_true",
        help="export and score only the front plans the table compares (per peer, the three largest no larger)",
    )
    p.add_argument("--allocator", help="folder of the --target-size branch's llama-quantize and llama-imatrix")
    p.add_argument("--damage-model", action="store_true", help="score the damage model's one-shot plan per size")
    p.add_argument(
        "--reuse-peers",
        action="store_true",
        help="keep the peer files and scores already in --work when its calibration and test texts are unchanged",
    )
    args = p.parse_args()
    run, work = Path(args.run), Path(args.work)
    if not (run / "experiment.yaml").is_file() or not (run / "pareto.csv").is_file():
        sys.exit(f"vs_llamacpp: {run} is not a finished search's folder (experiment.yaml, pareto.csv)")
    work.mkdir(parents=True, exist_ok=True)
    exp = load_experiment(run / "experiment.yaml")
    bin_dir = tools()
    before = [(work / n).read_text() if (work / n).is_file() else None for n in ("calibration.txt", "test.txt")]
    calib, test = texts(exp, work)
    reuse = args.reuse_peers and before == [calib.read_text(), test.read_text()]
    if args.reuse_peers and not reuse:
        print("vs_llamacpp: the texts changed: every peer is made and scored again", flush=True)
    base = work / "base-f32.gguf"
    if not base.exists():
        base_gguf(exp, base)
    threads = str(os.cpu_count() or 1)
    imatrix = work / "imatrix.gguf"
    if not (reuse and imatrix.exists()):
        _run(
            [
                bin_dir / "llama-imatrix",
                "-m",
                base,
                "-f",
                calib,
                "-o",
                imatrix,
                "-c",
                exp.calibration.seq_len,
                "-t",
                threads,
            ],
            work / "imatrix.log",
        )
    kld_base = work / "base.kld"
    if not (reuse and kld_base.exists()):
        base_logits(bin_dir, base, test, kld_base)
    self_log = work / "base-self.log"
    if reuse and self_log.exists():
        base_stats = _stats(self_log.read_text(), self_log)
    else:
        base_stats = score(bin_dir, base, test, kld_base, self_log)
    peers = []
    for recipe in args.recipes.split(","):
        for use_imatrix in (False, True):
            out = work / f"peer-{recipe}{'-imatrix' if use_imatrix else ''}.gguf"
            cmd = [
                bin_dir / "llama-quantize",
                *(["--imatrix", imatrix] if use_imatrix else []),
                base,
                out,
                recipe,
                threads,
            ]
            log = out.with_suffix(".log")
            if reuse and out.exists() and log.exists():
                stats = _stats(log.read_text(), log)  # the same recipe on the same base and texts
            else:
                _run(cmd, out.with_suffix(".quantize.log"))
                stats = score(bin_dir, out, test, kld_base, log)
            peers.append({"recipe": recipe, "imatrix": use_imatrix, "mb": _mb(out), **stats})
            print(f"{recipe:8s} imatrix={use_imatrix!s:5s} {peers[-1]['mb']:7.1f} MB  KL {stats['kl']:.4f}", flush=True)
    # The recipes with the importance matrix (the stronger peer) scored as the search scores its trials, for
    # its plots and report (peers.csv in the run's folder).
    from autosquash.search.outputs import read_peers
    from autosquash.search.peers import add_peers

    marked = [(p["recipe"], work / f"peer-{p['recipe']}-imatrix.gguf") for p in peers if p["imatrix"]]
    if reuse and {r["name"] for r in read_peers(run)} == {name for name, _ in marked}:
        print(f"{run / 'peers.csv'} already scores these recipes (same files, same texts)", flush=True)
    else:
        add_peers(run, marked)
        print(f"marked {len(marked)} recipes in {run / 'pareto.png'} (peers.csv)", flush=True)
    front = []
    if not args.no_front:
        # A plan's file adds the metadata (the tokenizer's vocabulary and merges) to its weights, as the base's does.
        overhead = _mb(base) - _tensor_mb(base)
        near = [p["mb"] - overhead for p in peers] if args.front_near_peers else None
        for f in front_files(run, work, near):
            stats = score(bin_dir, f["path"], test, kld_base, f["path"].with_suffix(".log"), f["lora"])
            front.append({"trial": f["trial"], "mb": _mb(f["path"], f["lora"]), "lora": bool(f["lora"]), **stats})
            print(f"front trial {f['trial']:4d} {front[-1]['mb']:7.1f} MB  KL {stats['kl']:.4f}", flush=True)
    text = report(peers, front, base_stats)
    allocator, damage = {}, {}
    if front and args.allocator:
        for a in allocator_files(Path(args.allocator), base, calib, front, work, exp.calibration.seq_len):
            got = {"mb": _mb(a["path"]), **score(bin_dir, a["path"], test, kld_base, a["path"].with_suffix(".log"))}
            allocator[a["trial"]] = got
            print(f"allocator at trial {a['trial']:4d}'s size: {got['mb']:7.2f} MB  KL {got['kl']:.4f}", flush=True)
    if front and args.damage_model:
        for d in damage_model_files(run, exp, front, work):
            damage[d["trial"]] = {
                "mb": _mb(d["path"]),
                **score(bin_dir, d["path"], test, kld_base, d["path"].with_suffix(".log")),
            }
    if allocator or damage:
        text += "\n\nat each front plan's size: llama.cpp's allocator (--target-size) and the damage model alone\n"
        text += equal_size_report(front, allocator, damage)
    print(text)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / "vs_llamacpp.txt").write_text(text + "\n")
    (results / "vs_llamacpp.json").write_text(
        json.dumps(
            {
                "base": base_stats,
                "peers": peers,
                "front": front,
                "allocator": allocator,
                "damage_model": damage,
                "run": str(run),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {results / 'vs_llamacpp.txt'} and .json")


if __name__ == "__main__":
    main()
