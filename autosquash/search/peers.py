"""Other tools' model files scored as a search scores its trials, so they can stand in its plots.

`benchmarks/vs_llamacpp.py` makes llama.cpp's own recipes (llama-quantize, with and without an importance
matrix) and scores them with llama.cpp on a test text. To mark them in a search's plots they need the
search's own numbers: its quality metric on its evaluation tokens, against the same base model, and the
cost model's price of the file as stored. `score_files` computes those and `write_peers` keeps them in the
search's folder (peers.csv), where the plots and `autosquash report` find them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from autosquash.errors import AutosquashError
from autosquash.search.outputs import PEER_COLUMNS, PEERS_FILE, metrics_row, write_csv, write_front_plots


def score_files(run: Path, files: list[tuple[str, Path]]) -> list[dict]:
    """Each (name, GGUF file) scored on the evaluation tokens of the search in `run` (its quality metrics,
    against its base model) and priced on its phone as stored; one row per file, PEER_COLUMNS."""
    from autosquash.cost import estimate, file_tensors, load_phone
    from autosquash.evaluate.proxy import reference, score
    from autosquash.models.load import load_model, load_tokenizer, read_gguf_model, resolve_model
    from autosquash.search.experiment import load_experiment
    from autosquash.search.trial import text_batch

    exp = load_experiment(run / "experiment.yaml")
    model = resolve_model(exp.model)
    held_out = text_batch(load_tokenizer(model), exp.evaluation)
    base = load_model(model, seed=exp.seed)
    ref = reference(base, held_out, exp.topk)
    vocab = base.config.vocab_size
    del base
    phone = load_phone(exp.phone)
    rows = []
    for name, path in files:
        arch, tensors, kv_heads = file_tensors(path)
        if arch.vocab_size != vocab:
            raise AutosquashError(f"{path}: {arch.vocab_size} tokens in its vocabulary, the search's model has {vocab}")
        quality = score(read_gguf_model(path), ref)  # autosquash's reader: no tokenizer rebuilt per file
        cost = estimate(arch, tensors, phone, context_tokens=exp.context_tokens, kv_heads_per_layer=kv_heads).to_dict()
        m = metrics_row(cost)
        rows.append(
            {
                "name": name,
                "file": str(path),
                **quality,
                **{k: m[k] for k in ("memory_mb", "energy_mj_per_token", "tokens_per_s", "weights_mb")},
                "bits_per_weight": cost["bits_per_weight"],
                "fits": cost["fits"],
            }
        )
    return rows


def write_peers(run: Path, rows: list[dict]) -> Path:
    """Keep `rows` as the search's peers.csv (replaced whole)."""
    path = run / PEERS_FILE
    write_csv(path, rows, PEER_COLUMNS)
    return path


def add_peers(run: Path, files: list[tuple[str, Path]]) -> list[dict]:
    """Score `files` for the search in `run`, keep them as its peers.csv, and re-draw its front plots with them
    (in the folder, and on the search's MLflow run where its store is at hand)."""
    from autosquash.cost import load_phone
    from autosquash.search.experiment import load_experiment
    from autosquash.track.mlflow_store import log_to_search_run, search_tracking_uri

    rows = score_files(run, files)
    write_peers(run, rows)
    exp = load_experiment(run / "experiment.yaml")
    with (run / "trials.csv").open(newline="") as f:
        trials = list(csv.DictReader(f))
    with (run / "pareto.csv").open(newline="") as f:
        front = list(csv.DictReader(f))
    write_front_plots(trials, front, exp, load_phone(exp.phone).app_memory_limit_bytes / 1e6, run)
    uri = search_tracking_uri(run)
    if uri is not None:
        files = [run / f for f in ("pareto.png", "pareto.html", PEERS_FILE)]
        log_to_search_run(uri, exp.name, files)
    return rows
