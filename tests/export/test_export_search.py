"""A real (tiny) search, its trials exported through the CLI and re-measured with `eval`: every file gives
back the perplexity its trial recorded."""

import json
from pathlib import Path

import pytest
import yaml

from autosquash.cli import main
from autosquash.compress.plan import Plan
from autosquash.export.build import deploys_factors
from autosquash.export.gguf_file import gguf_arch
from autosquash.formats.gguf import open_gguf
from autosquash.models.load import load_arch
from autosquash.search.trial import merges_adapter
from autosquash.track.mlflow_store import default_tracking_uri, find_trial_run
from autosquash.yaml_io import load_yaml_model

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.integration
SPACE = {
    "name": "export-check",
    "target": "torch",
    "embed_quant": ["Q8_0"],
    "attn": {"quant": ["F16", "Q8_0", "Q4_K"], "attn_keep_ratio": [1.0, 0.5, 0.0], "rank_ratio": [0.0, 0.25]},
    "ffn": {"quant": ["F16", "Q8_0", "Q4_0"], "ffn_keep_ratio": [1.0, 0.5], "kron_rank": [0, 4]},
    "baselines": ["F16", "Q8_0"],
}
EVALUATION = {"source": "lambada", "tokens": 512, "seq_len": 128}


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """Six trials: the F16 and Q8_0 baselines, then random plans (seeded: the same plans every run)."""
    folder = tmp_path_factory.mktemp("export-search")
    (folder / "space.yaml").write_text(yaml.safe_dump(SPACE))
    experiment = {
        "name": "export-check",
        "model": str(ROOT / "experiments/tiny-llama.json"),
        "phone": "iphone-16",
        "search_space": "space.yaml",
        "objectives": ["perplexity", "memory"],
        "trials": 6,
        "workers": 2,
        "sampler": "random",
        "context_tokens": 512,
        "calibration": {"source": "wikipedia", "tokens": 512, "seq_len": 128},
        "evaluation": EVALUATION,
        "topk": 16,
        # Every trial keeps its adapter (on a random model the check would drop most): the files are what is tested.
        "heal": {"steps": 2, "rank": 4, "lr": 1.0e-3, "batch_seqs": 2, "only_if_better": False},
    }
    (folder / "experiment.yaml").write_text(yaml.safe_dump(experiment))
    assert main(["search", str(folder / "experiment.yaml"), "--out", str(folder / "run")]) == 0
    return folder / "run"


def _recorded(run: Path, trial: int) -> float:
    return find_trial_run(default_tracking_uri(run), "export-check", trial).data.metrics["perplexity"]


def _remeasured(capsys, model: Path, lora: Path | None = None) -> float:
    capsys.readouterr()
    argv = ["eval", "--model", str(model), "--text", EVALUATION["source"], "--json"]
    argv += ["--tokens", str(EVALUATION["tokens"]), "--seq-len", str(EVALUATION["seq_len"])]
    assert main(argv + (["--lora", str(lora)] if lora else [])) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]


def test_every_exported_trial_remeasures_its_recorded_perplexity(search, tmp_path, capsys):
    arch = load_arch(str(ROOT / "experiments/tiny-llama.json"))
    plans = {n: load_yaml_model(Plan, search / f"plans/trial-{n:04d}.yaml") for n in range(6)}
    kinds = {}
    for n, plan in plans.items():
        if deploys_factors(arch, plan):
            kinds[n] = "torch"
        else:
            kinds[n] = f"{gguf_arch(arch, plan)}-{'merged' if merges_adapter(arch, plan) else 'adapter'}"
    # The seeded plans cover every kind of file: llama and deci GGUF, merged or with an adapter, and torch.
    assert {"llama-merged", "llama-adapter", "deci-adapter", "torch"} <= set(kinds.values()), kinds
    chosen = {kind: n for n, kind in sorted(kinds.items(), reverse=True)}  # the first trial of each kind
    measured = {}
    for kind, n in sorted(chosen.items()):
        export = ["export", "--run", str(search), "--trial", str(n)]
        if kind == "torch":
            out = tmp_path / f"t{n}.safetensors"
            assert main([*export, "--format", "torch", "--out", str(out)]) == 0
            lora = None
        else:
            out = tmp_path / f"t{n}.gguf"
            assert main([*export, "--out", str(out)]) == 0
            lora = out.with_suffix(".lora.gguf")
            assert lora.exists() == kind.endswith("adapter"), kind
            assert open_gguf(out).fields["general.architecture"].contents() == kind.split("-")[0]
            lora = lora if lora.exists() else None
        measured[f"trial {n} ({kind})"] = (_recorded(search, n), _remeasured(capsys, out, lora))
    print("\n".join(f"{k}: recorded perplexity {r!r}, re-measured {m!r}" for k, (r, m) in measured.items()))
    for what, (recorded, remeasured) in measured.items():
        # Same weights, adapter and thread count as the trial: equal to float rounding (observed: exactly equal).
        assert remeasured == pytest.approx(recorded, rel=1e-9), what
