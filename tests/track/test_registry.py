"""Register a file as a model version and pull it back, the store found through the registries under a runs folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from autosquash.errors import AutosquashError
from autosquash.track.mlflow_store import default_tracking_uri, search_tracking_uri
from autosquash.track.registry import pull, register


def _search_store(folder: Path) -> tuple[str, str]:
    """A search folder as a search leaves it: an MLflow SQLite store with one run, and tracking_uri.txt."""
    folder.mkdir(parents=True)
    uri = default_tracking_uri(folder)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("s", artifact_location=(folder / "mlartifacts").resolve().as_uri())
    run_id = client.create_run(exp).info.run_id
    (folder / "tracking_uri.txt").write_text(uri + "\n")
    return uri, run_id


def _file(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """runs/s1 registers 'solo' and 'shared'; runs/s2 registers another file as 'shared'; runs/gone names a
    store that was deleted."""
    root = tmp_path_factory.mktemp("registry")
    home = root / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # anything register wrote under the home directory would land here
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        u1, r1 = _search_store(root / "runs/s1")
        u2, r2 = _search_store(root / "runs/s2")
        register(u1, "solo", [_file(root / "f1/m.gguf", b"GGUF from s1")], r1, {"trial": "0"})
        register(u1, "shared", [root / "f1/m.gguf"], r1, {"trial": "0"})
        register(u2, "shared", [_file(root / "f2/m.gguf", b"GGUF from s2")], r2, {"trial": "1"})
    gone = root / "runs/gone"
    gone.mkdir()
    (gone / "tracking_uri.txt").write_text(f"sqlite:///{(gone / 'mlflow.db').resolve()}\n")
    return {"runs": root / "runs", "home": home, "s1": u1, "s2": u2}


@pytest.fixture
def no_env_store(monkeypatch, tmp_path):
    """No MLFLOW_TRACKING_URI from the caller's shell, and a home directory the test can inspect."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def test_pull_finds_the_one_search_store_holding_the_name(runs, tmp_path, no_env_store):
    files = pull("models:/solo/1", tmp_path / "out", runs_dir=runs["runs"])
    assert [f.name for f in files] == ["README.md", "m.gguf"] and files[1].read_bytes() == b"GGUF from s1"
    assert list(runs["home"].iterdir()) == [] and list(no_env_store.iterdir()) == []  # no index beside the stores
    assert not (runs["runs"] / "gone/mlflow.db").exists()  # asking a deleted store must not recreate it


def test_a_name_in_two_search_stores_is_refused_naming_both(runs, tmp_path, no_env_store):
    with pytest.raises(AutosquashError) as e:
        pull("models:/shared/1", tmp_path / "out", runs_dir=runs["runs"])
    msg = str(e.value)
    assert "\n" not in msg and runs["s1"] in msg and runs["s2"] in msg and "--tracking-uri" in msg
    assert not (tmp_path / "out").exists()


def test_a_name_no_search_store_holds_is_refused(runs, tmp_path, no_env_store):
    with pytest.raises(
        AutosquashError, match=r"no registry under .* knows 'ghost'.*--tracking-uri.*MLFLOW_TRACKING_URI"
    ):
        pull("models:/ghost/1", tmp_path / "out", runs_dir=runs["runs"])


def test_a_missing_runs_folder_is_refused_like_an_empty_one(tmp_path, no_env_store):
    with pytest.raises(AutosquashError, match="no registry under"):
        pull("models:/solo/1", tmp_path / "out", runs_dir=tmp_path / "no-runs")


def test_an_explicit_store_or_mlflow_tracking_uri_settles_an_ambiguous_name(runs, tmp_path, no_env_store, monkeypatch):
    got = pull("models:/shared/1", tmp_path / "a", tracking_uri=runs["s2"], runs_dir=runs["runs"])
    assert (tmp_path / "a/m.gguf").read_bytes() == b"GGUF from s2"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", runs["s1"])
    got = pull("models:/shared/1", tmp_path / "b", runs_dir=runs["runs"])
    assert (tmp_path / "b/m.gguf").read_bytes() == b"GGUF from s1"
    got = pull("models:/shared/1", tmp_path / "c", tracking_uri=runs["s2"], runs_dir=runs["runs"])
    assert (tmp_path / "c/m.gguf").read_bytes() == b"GGUF from s2"  # the explicit URI before the environment's
    assert [f.name for f in got] == ["README.md", "m.gguf"]


def test_the_readme_runs_the_model_with_its_adapter_and_states_the_phone_estimate(tmp_path):
    from autosquash.track.registry import run_commands, write_readme

    _file(tmp_path / "m.gguf", b"x")
    _file(tmp_path / "trial-0003.yaml", b"groups: {}")
    tags = {"phone": "pixel-9", "peak_memory_bytes": "5.2e8", "decode_tokens_per_s": "41.5", "kl": "0.05"}
    text = write_readme(tmp_path, "tiny version 2", tags).read_text()
    assert "    llama-cli -m m.gguf -p" in text and "--lora" not in text
    assert "## On pixel-9" in text and "520 MB" in text and "41.5 tokens/s" in text and "| - |" in text
    # a version registered when the phone's tag was still called `device`
    old = {"device": "pixel-9", "peak_memory_bytes": "5.2e8"}
    assert "## On pixel-9" in write_readme(tmp_path, "tiny version 1", old).read_text()
    assert "kl 0.05" in text and "`trial-0003.yaml`" in text
    _file(tmp_path / "m.lora.gguf", b"y")
    assert run_commands(tmp_path)[0].startswith("llama-cli -m m.gguf --lora m.lora.gguf ")
    assert all("--lora m.lora.gguf" in c for c in run_commands(tmp_path))


def test_a_moved_search_folder_reads_its_own_store_not_the_old_path(tmp_path, no_env_store):
    uri, _ = _search_store(tmp_path / "was")
    (tmp_path / "was").rename(tmp_path / "now")  # tracking_uri.txt still names the old path
    assert search_tracking_uri(tmp_path / "now") == default_tracking_uri(tmp_path / "now") != uri
    # a store the search was pointed at (--tracking-uri) is kept as named, as is a folder that names none
    (tmp_path / "server").mkdir()
    (tmp_path / "server/tracking_uri.txt").write_text("http://127.0.0.1:5000\n")
    assert search_tracking_uri(tmp_path / "server") == "http://127.0.0.1:5000"
    assert search_tracking_uri(tmp_path / "nothing") is None


def test_a_pulled_plan_that_does_not_cover_its_model_file_is_refused_in_one_line(tmp_path, no_env_store):
    """A version pairs its model file with the plan it was built from; a plan for another model (registered by
    hand) would describe blocks the file does not have, or leave some of its blocks out."""
    import json

    from autosquash.compress.plan import Plan
    from autosquash.export.build import BuiltModel
    from autosquash.export.gguf_file import write_gguf
    from autosquash.models.arch import Arch
    from autosquash.models.load import load_model
    from autosquash.yaml_io import dump_yaml_model
    from tests.conftest import TINY_SHAPE

    spec = tmp_path / "config.json"
    spec.write_text(json.dumps({**TINY_SHAPE, "model_type": "llama", "vocab_size": 49152, "eos_token_id": 2}))
    model = load_model(str(spec))
    arch = Arch.from_config(model.config)
    plan = Plan.uniform(arch, "F16")
    gguf = tmp_path / "f/m.gguf"
    gguf.parent.mkdir()
    write_gguf(gguf, BuiltModel(str(spec), model, arch, plan, {}))
    dump_yaml_model(plan, tmp_path / "f/trial-0001.yaml")
    half = Plan(groups={g: c for g, c in plan.groups.items() if g.startswith("blk.0.")})
    (tmp_path / "g").mkdir()
    dump_yaml_model(half, tmp_path / "g/trial-0002.yaml")
    uri, run_id = _search_store(tmp_path / "runs/s")
    register(uri, "whole", [gguf, tmp_path / "f/trial-0001.yaml"], run_id, {"trial": "1"})
    files = pull("models:/whole/1", tmp_path / "ok", tracking_uri=uri)
    assert [f.name for f in files] == ["README.md", "m.gguf", "trial-0001.yaml"]
    uri, run_id = _search_store(tmp_path / "runs/t")  # a run's export/ artifacts hold one version's files
    register(uri, "half", [gguf, tmp_path / "g/trial-0002.yaml"], run_id, {"trial": "2"})
    with pytest.raises(AutosquashError) as e:
        pull("models:/half/1", tmp_path / "bad", tracking_uri=uri)
    assert str(e.value) == (
        "models:/half/1: trial-0002.yaml (for m.gguf): no choice for 2 of the model's 4 groups (blk.1.attn, "
        "blk.1.ffn); a plan names blk.<i>.attn and blk.<i>.ffn for each of its model's 2 blocks (a plan for another "
        "model?)"
    )
