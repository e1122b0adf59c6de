"""A search checks its inputs before it writes or loads anything, and a start that fails blocks nothing."""

import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

import autosquash.search.study as study_module
from autosquash.cli import main
from autosquash.errors import AutosquashError
from autosquash.search.preflight import check_ray_address, check_storage, check_tracking_uri, stored_trials
from autosquash.track.mlflow_store import default_tracking_uri

SMOKE = str(Path(__file__).parents[2] / "experiments/smoke.yaml")


def test_addresses_nobody_answers_at_fail_in_seconds_naming_the_option():
    for check, value, message in [
        (check_ray_address, "127.0.0.1:1", "--ray-address 127.0.0.1:1: no Ray cluster answers at 127.0.0.1:1"),
        (check_ray_address, "ray://127.0.0.1:1", "no Ray cluster answers"),
        (check_ray_address, "localhost", "not an address with a host and a port"),
        (check_tracking_uri, "http://127.0.0.1:1", "--tracking-uri http://127.0.0.1:1: no MLflow server answers"),
        (check_tracking_uri, "bogus://x", r"--tracking-uri bogus://x: MLflow stores runs in .*https, databricks "),
        # No database driver installed here: the package to install, not SQLAlchemy's words.
        (check_tracking_uri, "postgresql://u@127.0.0.1:1/db", "driver is not installed: pip install psycopg2-binary"),
        (check_storage, "postgresql://u@127.0.0.1:1/db", "driver is not installed: pip install psycopg2-binary"),
        (check_storage, "mysql://u@127.0.0.1:1/db", "driver is not installed: pip install PyMySQL"),
        (check_storage, "notaurl", "--storage notaurl: Optuna cannot open it"),
        (check_storage, "sqlite:////nonexistent/folder/x.db", "Optuna cannot open it"),
    ]:
        t0 = time.monotonic()
        with pytest.raises(AutosquashError, match=message):
            check(value)
        assert time.monotonic() - t0 < 30, value


def test_usable_stores_pass(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    check_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    check_ray_address("auto")


def test_a_bad_address_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", SMOKE, "--trials", "2", "--out", str(out), "--ray-address", "127.0.0.1:1"]) == 2
    assert "no Ray cluster answers" in capsys.readouterr().err
    assert not out.exists()


def test_a_database_without_trials_is_no_search(tmp_path):
    assert stored_trials(tmp_path) is None
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s")
    study.enqueue_trial({"x": 1.0})  # a baseline queued by a start that failed before it ran
    assert stored_trials(tmp_path) == 0
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    assert stored_trials(tmp_path) == 1


def test_a_start_that_fails_after_it_began_marks_its_run_failed_and_blocks_no_rerun(tmp_path, monkeypatch, capsys):
    def unreadable(*args, **kwargs):
        raise AutosquashError("the model's weights are unreadable")

    monkeypatch.setattr(study_module, "load_inputs", unreadable)
    out = tmp_path / "run"
    for _ in range(2):  # the second start is not refused as "already holds a search"
        assert main(["search", SMOKE, "--trials", "2", "--out", str(out)]) == 2
        assert "the model's weights are unreadable" in capsys.readouterr().err
    client = MlflowClient(default_tracking_uri(out))
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}


def test_an_empty_front_is_explained(tmp_path):
    from autosquash.cli.commands import why_no_front
    from autosquash.search.outputs import COLUMNS, write_csv

    failed = [
        dict.fromkeys(COLUMNS, "") | {"trial": i, "state": "FAIL", "error": "quality is not finite"} for i in (0, 1)
    ]
    write_csv(tmp_path / "trials.csv", failed, COLUMNS)
    assert why_no_front(tmp_path, "iphone-16").startswith("every one of the 2 trials failed (first error: quality")
    unfit = [
        dict.fromkeys(COLUMNS, "") | {"trial": i, "state": "COMPLETE", "memory_mb": m} for i, m in [(0, 900), (1, 700)]
    ]
    write_csv(tmp_path / "trials.csv", unfit, COLUMNS)
    assert "the smallest needs 700 MB at run time (trial 1)" in why_no_front(tmp_path, "tiny-phone")


@pytest.fixture
def web_server():
    """A web server that is neither MLflow nor Ray, on a free local port."""
    import http.server
    import threading

    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_server_of_another_kind_is_refused_at_once(web_server):
    with pytest.raises(AutosquashError, match="is not an MLflow tracking server \\(HTTP 404\\)"):
        check_tracking_uri(f"http://{web_server}")
    t0 = time.monotonic()
    with pytest.raises(AutosquashError, match="is not a Ray cluster \\(it does not speak gRPC\\)"):
        check_ray_address(web_server)  # Ray itself would retry for minutes
    assert time.monotonic() - t0 < 30


def test_a_phone_that_cannot_hold_the_runtime_is_refused_before_anything_loads(tmp_path, capsys):
    import yaml

    from autosquash.cost import load_phone

    phone = load_phone("iphone-16").model_dump(mode="json") | {"name": "tiny", "dram_bytes": 100_000_000}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(phone))
    exp = yaml.safe_load(Path(SMOKE).read_text())
    exp.update(phone=str(tmp_path / "tiny.yaml"), model=str(Path(SMOKE).parent / exp["model"]))
    exp.update(search_space=str((Path(SMOKE).parent / exp["search_space"]).resolve()))
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(exp))
    assert main(["search", str(tmp_path / "e.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "cannot hold this model at any size: llama.cpp's runtime buffers alone take" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_read_only_store_is_one_line(tmp_path, capsys):
    """A store the user may not write (SQLite opened read-only: chmod does not stop root) fails in one line."""
    import optuna

    optuna.create_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    url = f"sqlite:///file:{tmp_path / 'optuna.db'}?mode=ro&uri=true"
    assert main(["search", SMOKE, "--out", str(tmp_path / "out"), "--storage", url]) == 1
    err = capsys.readouterr().err
    assert "a search database is read-only" in err and err.count("\n") == 1


def test_a_tracking_uri_check_makes_nothing_and_a_refused_one_leaves_no_folder(tmp_path, capsys):
    """Checking an SQLite tracking URI made its database and folders (MLflow makes them on opening): a search
    refused afterwards (here by its --storage) left a new folder behind. A URI naming a folder, or under a file,
    is refused in one line; a new database file is made by the search itself, not by its check."""
    out = tmp_path / "run"
    check_tracking_uri(f"sqlite:///{out / 'sub' / 'mlflow.db'}")
    assert not out.exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for uri, message in (
        (f"sqlite:///{out}/mlflow.db", "--storage notaurl: Optuna cannot open it"),
        (f"sqlite:///{out}/", f"--tracking-uri sqlite:///{out}/: names a folder, not a database file"),
        (f"sqlite:///{blocker}/mlflow.db", f"{blocker} is a file, not a folder"),
    ):
        argv = ["search", SMOKE, "--trials", "2", "--out", str(out), "--tracking-uri", uri, "--storage", "notaurl"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists(), uri
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_refused_search_of_a_model_leaves_no_folder_for_its_derived_space(tmp_path, capsys):
    """search --model M writes the space it derives for M into the output folder before the search's checks,
    which read it there: a start they refuse takes it, and the folder, away again."""
    qwen3 = str(Path(__file__).parents[2] / "tests/cost/configs/Qwen3-1.7B/config.json")  # a derived space
    out = tmp_path / "run"
    assert main(["search", "--model", qwen3, "--out", str(out), "--tracking-uri", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert "--tracking-uri bogus://x: MLflow stores runs in" in err
    assert not out.exists()
