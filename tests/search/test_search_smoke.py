"""The smoke search end to end through real Optuna, Ray and MLflow (a tiny random Llama)."""

import csv
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from autosquash.cli import main
from autosquash.search.experiment import load_experiment
from autosquash.search.outputs import COLUMNS, read_peers
from autosquash.search.peers import add_peers
from autosquash.track.mlflow_store import default_tracking_uri, find_trial_run
from tests.conftest import copy_search

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.integration


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_output_folder_holds_trials_front_and_plans(smoke_run):
    trials = _rows(smoke_run / "trials.csv")
    front = _rows(smoke_run / "pareto.csv")
    assert len(trials) == 6 and all(r["state"] == "COMPLETE" for r in trials)
    assert set(COLUMNS) <= set(trials[0])
    assert [r["origin"] for r in trials[:2]] == ["baseline", "baseline"]  # the space seeds Q8_0 and Q4_0
    assert {r["origin"] for r in trials[2:]} == {"sampled"}
    assert 1 <= len(front) <= 6 and {r["trial"] for r in front} <= {r["trial"] for r in trials}
    assert all(0 <= float(r["lm_eval_mean_acc"]) <= 1 for r in front)  # the front's benchmark, beside its proxies
    # The front is scored again on the test split (LAMBADA tokens after the evaluation set's): close to the
    # selection set's numbers (the same model), never the same numbers (other tokens).
    on_front = {r["trial"] for r in front}
    for r in trials:
        if r["trial"] in on_front:
            assert float(r["test_kl"]) > 0 and float(r["test_perplexity"]) != float(r["perplexity"])
            assert 0.5 < float(r["test_perplexity"]) / float(r["perplexity"]) < 2
        else:
            assert r["test_kl"] == r["test_perplexity"] == ""
    for r in trials:
        assert (smoke_run / r["plan"]).is_file()
        assert float(r["memory_mb"]) > 0 and float(r["perplexity"]) > 1


def test_mlflow_has_a_parent_and_six_nested_trials(smoke_run):
    client = MlflowClient(default_tracking_uri(smoke_run))
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("autosquash.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("autosquash.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 6
    parent = parents[0].info.run_id
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent}
    assert sorted(int(r.data.tags["autosquash.trial"]) for r in trials) == list(range(6))
    t = trials[0]
    assert "blk.0.attn.quant" in t.data.params
    assert {"perplexity", "kl", "peak_memory_bytes", "energy_j_per_token", "dram_energy_j_per_token"} <= set(
        t.data.metrics
    )
    assert any(a.path.endswith(".yaml") for a in client.list_artifacts(t.info.run_id))
    assert {r.data.tags["autosquash.pareto"] for r in trials} <= {"true", "false"}
    front = [r for r in trials if r.data.tags["autosquash.pareto"] == "true"]
    assert front and all(0 <= r.data.metrics["lm_eval_mean_acc"] <= 1 for r in front)  # lm-eval beside the proxies
    assert all("lm_eval.piqa.acc" in r.data.metrics for r in front)
    assert not any("lm_eval_mean_acc" in r.data.metrics for r in trials if r not in front)
    assert {a.path for a in client.list_artifacts(parent)} >= {"trials.csv", "pareto.csv", "pareto.png", "pareto.html"}
    assert "front_table.json" in {a.path for a in client.list_artifacts(parent)}
    assert "Export a plan as GGUF" in parents[0].data.tags["mlflow.note.content"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    for r in trials:
        n = r.data.tags["autosquash.trial"]
        assert r.info.run_name.startswith(f"t{n} ") and f"kl {r.data.metrics['kl']:.3g}" in r.info.run_name
        assert r.data.metrics["pareto"] == (1.0 if r.data.tags["autosquash.pareto"] == "true" else 0.0)
        contexts = {t.value for d in r.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
        assert contexts == {"calibration", "evaluation"}
    for r in front:
        layers = {a.path for a in client.list_artifacts(r.info.run_id, "layers")}
        n = int(r.data.tags["autosquash.trial"])
        assert layers == {f"layers/trial-{n:04d}.png", f"layers/trial-{n:04d}.html"}
    baseline = next(r for r in trials if r.data.tags["autosquash.trial"] == "0")
    assert baseline.info.run_name.startswith("t0 Q8_0 ")  # a uniform baseline is named by its type


def _run_readme_command(folder: Path) -> None:
    """The pulled README's llama-cli line, run in llama.cpp (llama-cpp-python): its model (and adapter) load and
    generate."""
    import shlex

    from llama_cpp import Llama

    text = (folder / "README.md").read_text()
    (line,) = [x.strip() for x in text.splitlines() if x.strip().startswith("llama-cli ")]
    args = shlex.split(line)
    model = folder / args[args.index("-m") + 1]
    lora = folder / args[args.index("--lora") + 1] if "--lora" in args else None
    prompt, n = args[args.index("-p") + 1], int(args[args.index("-n") + 1])
    llm = Llama(str(model), lora_path=None if lora is None else str(lora), n_ctx=128, verbose=False)
    out = llm(prompt, max_tokens=n, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    assert "iphone-16" in text and "tokens/s" in text


def test_report_is_one_page_with_every_section(smoke_run, tmp_path):
    page = tmp_path / "report.html"
    assert main(["report", str(smoke_run), "--out", str(page)]) == 0
    text = page.read_text()
    assert "<h2>Pareto front</h2>" in text and "<h2>Quality against size</h2>" in text
    front = _rows(smoke_run / "pareto.csv")
    for r in front:
        assert f"<h2>Trial {r['trial']} (" in text and f"--trial {r['trial']} --out" in text
    assert text.count("<h3>Where the bits went</h3>") == len(front) and "<h3>Cost on iphone-16</h3>" in text
    assert "http://" not in text and "https://" not in text  # nothing to fetch: it opens offline
    assert text.count('src="data:image/png;base64,') == 1 + len(front)


def test_export_register_and_pull_a_trial(smoke_run, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = ["--runs", str(smoke_run.parent)]  # pull finds the registry among the searches there
    gguf = tmp_path / "m.gguf"
    code = main(["export", "--run", str(smoke_run), "--trial", "0", "--out", str(gguf), "--register", "tiny-phone"])
    assert code == 0 and gguf.stat().st_size > 0
    assert main(["pull", "models:/tiny-phone/1", "--out", str(tmp_path / "pulled"), *runs]) == 0
    pulled = tmp_path / "pulled"
    assert (pulled / "m.gguf").read_bytes() == gguf.read_bytes()
    assert (pulled / "trial-0000.yaml").exists()
    _run_readme_command(pulled)
    client = MlflowClient(default_tracking_uri(smoke_run))
    version = client.get_model_version("tiny-phone", "1")
    assert version.tags["phone"] == "iphone-16" and version.tags["trial"] == "0"
    # The smoke trials heal; the tag says where trial 0's adapter went, or is absent where the check dropped it.
    kept = find_trial_run(default_tracking_uri(smoke_run), "smoke", 0).data.metrics["heal_kept"]
    assert ("lora_adapter" in version.tags) == bool(kept)
    if kept:
        assert "LoRA healing" in version.tags["lora_adapter"]
    assert float(version.tags["perplexity"]) > 1 and "blk.0.attn" in version.tags["plan"]
    client.set_registered_model_alias("tiny-phone", "champion", "1")  # as a user would in the MLflow UI
    assert main(["pull", "models:/tiny-phone@champion", "--out", str(tmp_path / "by-alias"), *runs]) == 0
    assert (tmp_path / "by-alias" / "m.gguf").read_bytes() == gguf.read_bytes()
    assert main(["pull", "models:/no-such-model/1", "--out", str(tmp_path / "x"), *runs]) == 2
    assert f"no registry under {smoke_run.parent} knows 'no-such-model'" in capsys.readouterr().err


def test_peer_files_are_scored_as_the_trials_are_and_marked_in_plots_and_report(smoke_run, tmp_path):
    # vs_llamacpp.py hands llama-quantize's files to add_peers; two exports of the base stand in for them here.
    from autosquash.formats.gguf import open_gguf

    run = copy_search(smoke_run, tmp_path / "run")
    model = load_experiment(run / "experiment.yaml").model
    files = []
    for t in ("F16", "Q4_0"):
        files.append((f"base {t}", tmp_path / f"peer-{t}.gguf"))
        assert main(["export", "--model", model, "--uniform", t, "--out", str(files[-1][1])]) == 0
    f16, q4 = add_peers(run, files)
    # Against the search's own reference logits: F16 only rounds the float32 base (KL about 1e-10 on this random
    # model, whose outputs are near uniform), Q4_0 loses about 10^4 times more (about 3e-6).
    assert f16["kl"] < 1e-8 and q4["kl"] > 100 * f16["kl"] and q4["perplexity"] > 1
    # priced as stored: the file's own tensor bytes, exactly
    stored = sum(int(t.n_bytes) for t in open_gguf(files[1][1]).tensors)
    assert q4["weights_mb"] * 1e6 == pytest.approx(stored, abs=0.5)
    assert [r["name"] for r in read_peers(run)] == ["base F16", "base Q4_0"]
    assert "llama.cpp recipes" in (run / "pareto.html").read_text()
    # logged to the copy's MLflow artifacts, not to the shared search's (whose browser tests read its plot)
    (copied,), (shared,) = (list(d.glob("mlartifacts/*/artifacts/pareto.html")) for d in (run, smoke_run))
    assert "llama.cpp recipes" in copied.read_text() and "llama.cpp recipes" not in shared.read_text()
    page = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(page)]) == 0
    text = page.read_text()
    assert "<h2>llama.cpp's recipes</h2>" in text and "<td>base Q4_0</td>" in text
