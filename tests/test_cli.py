"""Bad input gets one line naming the problem and a non-zero exit, never a traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from autosquash.cli import main

ROOT = Path(__file__).parents[1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "no/such/experiment.yaml"], "cannot read no/such/experiment.yaml"),
        (["estimate", "--model", "no-such-model", "--phone", "iphone-16"], "neither a shipped name"),
        (["estimate", "--model", "experiments/tiny-llama.json", "--phone", "nokia-3310"], "nokia-3310"),
        (["export", "--out", "x.gguf"], "export needs --run DIR --trial N"),
        (["export", "--model", "m", "--uniform", "Q4_0", "--out", "x", "--register", "n"], "--register needs --run"),
        (["pull", "not-a-uri", "--out", "x"], "is not a model URI"),
        (["export", "--run", "no/such/run", "--trial", "1", "--out", "x.gguf"], "not a search's output folder"),
        (["export", "--run", "experiments", "--trial", "1", "--out", "x.gguf"], "not a search's output folder"),
        (["export", "--model", "m", "--uniform", "Q4_0", "--out", "x.bin"], "ends in .gguf"),
        (["export", "--model", "m", "--uniform", "Q4_0", "--format", "torch", "--out", "x.gguf"], "writes safetensors"),
        (["eval", "--model", "README.md", "--text", "lambada"], "not an autosquash torch-format file"),
        (["eval", "--model", "no/such.safetensors", "--text", "lambada"], "does not exist"),
        (["eval", "--model", "m.gguf", "--text", "lambada", "--lora", "no/such.lora.gguf"], "does not exist"),
    ],
)
def test_bad_input_is_one_line(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(ROOT)
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "experiments/smoke.yaml", "--trials", "0"], "argument --trials: must be at least 1, got 0"),
        (["search", "experiments/smoke.yaml", "--workers", "two"], "expected a whole number, got 'two'"),
        (["ui", "--port", "70000"], "a TCP port is at most 65535"),
        (["eval", "--model", "m", "--tokens", "-5"], "argument --tokens: must be at least 1"),
        (
            ["estimate", "--model", "experiments/tiny-llama.json", "--phone", "iphone-16", "--uniform", "Q9_0"],
            "argument --uniform: unknown GGUF tensor type 'Q9_0'",
        ),
        # An empty type is no type (it once meant F16, silently).
        (["estimate", "--model", "m", "--phone", "iphone-16", "--uniform", ""], "unknown GGUF tensor type ''"),
        (["export", "--model", "m", "--uniform", "", "--out", "x.gguf"], "argument --uniform: unknown GGUF tensor"),
        (["estimate", "--phone", "iphone-16"], "the following arguments are required: --model"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert message in err and err.count("\n") == 1 and "usage:" not in err


def test_bad_experiment_field_is_named(capsys, tmp_path):
    (tmp_path / "e.yaml").write_text("name: x\nmodel: m\nphone: iphone-16\nsearch_space: s.yaml\ntrials: -3\n")
    code, _, err = _run(capsys, "search", str(tmp_path / "e.yaml"))
    assert code == 2 and "e.yaml" in err and "'trials'" in err


def test_estimate_json_from_a_config(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, out, _ = _run(
        capsys, "estimate", "--model", "tests/cost/configs/Llama-3.1-8B/config.json", "--phone", "iphone-16", "--json"
    )
    report = json.loads(out)
    assert code == 0
    assert 14 * 2**30 <= report["weights_bytes"] <= 16 * 2**30 and report["fits"] is False
    assert 0.6 <= report["dram_energy_j_per_token"] <= 1.0 < report["energy_j_per_token"]


def test_phones_lists_the_shipped_phones_and_devices_still_does_with_a_note(capsys):
    code, out, err = _run(capsys, "phones", "--json")
    names = {d["name"] for d in json.loads(out)}
    assert code == 0 and {"iphone-16", "pixel-9-pro", "galaxy-s24-ultra", "midrange-6gb"} <= names and not err
    code, old, err = _run(capsys, "devices", "--json")
    assert code == 0 and old == out
    assert err.count("\n") == 1 and "deprecated" in err and "autosquash phones" in err


def test_estimate_takes_phone_and_the_old_device_flag_with_a_note(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["estimate", "--model", "experiments/tiny-llama.json", "--uniform", "Q4_0"]
    code, out, err = _run(capsys, *args, "--phone", "pixel-9-pro")
    assert code == 0 and out.startswith("phone    pixel-9-pro") and not err
    code, old, err = _run(capsys, *args, "--device", "pixel-9-pro")
    assert code == 0 and old == out and err.count("\n") == 1 and "--device is deprecated" in err and "--phone" in err
    with pytest.raises(SystemExit):
        main([*args, "--phone", "iphone-16", "--device", "pixel-9-pro"])
    assert "not allowed with argument --phone" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(args)
    err = capsys.readouterr().err
    assert "one of the arguments --phone is required" in err and "--device" not in err


def test_an_experiment_file_with_the_old_device_field_loads_with_a_note(capsys, tmp_path):
    fields = "name: x\nmodel: m\nsearch_space: s.yaml\ntrials: -3\n"
    (tmp_path / "e.yaml").write_text(fields + "device: iphone-16\n")
    code, _, err = _run(capsys, "search", str(tmp_path / "e.yaml"))
    note, error = err.splitlines()
    assert code == 2 and "'trials'" in error  # it loaded on to the next check
    assert f"{tmp_path / 'e.yaml'}: field 'device' is deprecated" in note and "write 'phone: iphone-16'" in note
    (tmp_path / "e.yaml").write_text(fields + "device: iphone-16\nphone: iphone-16\n")
    code, _, err = _run(capsys, "search", str(tmp_path / "e.yaml"))
    assert code == 2 and err.count("\n") == 1 and "fields 'phone' and 'device' both given" in err


def test_every_subcommand_has_help():
    for sub in ("search", "estimate", "phones", "devices", "fetch", "eval", "export", "pull", "report", "ui"):
        r = subprocess.run([sys.executable, "-m", "autosquash", sub, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: autosquash" in r.stdout, sub


def test_a_model_that_scores_nan_is_an_error_with_valid_json(capsys, monkeypatch):
    """NaN weights give NaN perplexity: --json prints null (valid JSON, never NaN) and the exit is non-zero."""
    import autosquash.evaluate.proxy as proxy

    real = proxy.perplexity

    def nan_perplexity(model, batch, first=0):
        real(model, batch, first)
        return float("nan")

    monkeypatch.setattr(proxy, "perplexity", nan_perplexity)
    model = str(ROOT / "experiments/tiny-llama.json")
    code, out, err = _run(
        capsys, "eval", "--model", model, "--text", "lambada", "--tokens", "128", "--seq-len", "64", "--json"
    )
    assert code == 2 and json.loads(out)["perplexity"] is None
    assert "not a finite number: perplexity" in err and "Traceback" not in err
    code, out, err = _run(capsys, "eval", "--model", model, "--text", "lambada", "--tokens", "128", "--seq-len", "64")
    assert code == 2 and "not a finite number: perplexity" in err


def test_ui_refuses_a_port_that_is_taken(capsys, tmp_path):
    import socket

    (tmp_path / "mlflow.db").touch()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = _run(capsys, "ui", "--out", str(tmp_path), "--port", str(port))
    assert code == 2 and f"cannot serve on 127.0.0.1:{port}" in err


def test_sigterm_ends_a_command_as_ctrl_c_does_with_exit_143(capsys, monkeypatch):
    import os
    import signal

    import autosquash.cli as cli

    def stopped(args):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(cli, "phones_command", stopped)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = _run(capsys, "phones")
    assert code == 143 and "interrupted; finished trials are stored" in err
    assert signal.getsignal(signal.SIGTERM) is before  # put back for whoever called main


def test_sigterm_reraised_as_a_plain_keyboard_interrupt_still_exits_143(capsys, monkeypatch):
    """Ray's waits turn an exception raised in them by a signal handler into a plain KeyboardInterrupt (CI
    saw exit 130 for a SIGTERM that landed in ray.wait); the exit code still says SIGTERM, and the next
    command's Ctrl-C is a Ctrl-C again."""
    import os
    import signal

    import autosquash.cli as cli

    def waits(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            raise KeyboardInterrupt() from None  # as Ray's check_signals does
        raise AssertionError("SIGTERM did not stop the command")

    def ctrl_c(args):
        raise KeyboardInterrupt()

    monkeypatch.setattr(cli, "phones_command", waits)
    assert _run(capsys, "phones")[0] == 143
    monkeypatch.setattr(cli, "phones_command", ctrl_c)
    assert _run(capsys, "phones")[0] == 130


def test_report_of_a_folder_without_a_finished_search_is_one_line(capsys, tmp_path):
    code, _, err = _run(capsys, "report", str(tmp_path))
    assert code == 2 and "holds no finished search" in err and err.count("\n") == 1


def test_output_paths_are_checked_before_any_work(capsys, tmp_path):
    """export --out, pull --out and search --out: a file where a folder must be, or a folder where the file
    goes, is refused in one line before anything is built; a missing export folder is made."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "export", "--model", "m", "--uniform", "Q4_0", "--out", str(blocker / "m.gguf"))
    assert code == 2 and "is a file, not a folder" in err and err.count("\n") == 1
    (tmp_path / "dir.gguf").mkdir()
    code, _, err = _run(capsys, "export", "--model", "m", "--uniform", "Q4_0", "--out", str(tmp_path / "dir.gguf"))
    assert code == 2 and "is a folder; name the file to write" in err
    code, _, err = _run(
        capsys, "export", "--model", "no-such-model", "--uniform", "Q4_0", "--out", str(tmp_path / "new/m.gguf")
    )
    assert code == 2 and (tmp_path / "new").is_dir()  # made before the (here failing) build
    code, _, err = _run(capsys, "pull", "models:/x/1", "--out", str(blocker))
    assert code == 2 and "is a file, not a folder" in err
    code, _, err = _run(capsys, "search", "experiments/smoke.yaml", "--out", str(blocker / "run"))
    assert code == 2 and "is a file, not a folder" in err and not (blocker.parent / "run").exists()


def test_register_is_checked_before_the_file_is_built(capsys, tmp_path):
    code, _, err = _run(
        capsys,
        "export",
        "--run",
        str(tmp_path),
        "--trial",
        "0",
        "--out",
        str(tmp_path / "m.gguf"),
        "--register",
        "phone",
    )
    assert code == 2 and "is not a search's output folder" in err
    assert not (tmp_path / "m.gguf").exists()


def test_a_plan_for_another_model_is_refused_by_estimate_and_export(capsys, tmp_path):
    import yaml

    from tests.conftest import tiny_config

    config = tmp_path / "config.json"
    config.write_text(tiny_config().to_json_string())
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"groups": {"blk.7.attn": {"quant": "Q4_0"}}}))
    for cmd in (["estimate", "--phone", "iphone-16"], ["export", "--out", str(tmp_path / "m.gguf")]):
        code, _, err = _run(capsys, *cmd, "--model", str(config), "--plan", str(plan))
        assert code == 2 and "'blk.7.attn' is past the model's 2 blocks" in err, cmd
    plan.write_text(yaml.safe_dump({"groups": {"blk.0.attn": {"quant": "Q4_0", "tensor_quant": {"ffn_up": "Q8_0"}}}}))
    code, _, err = _run(capsys, "estimate", "--phone", "iphone-16", "--model", str(config), "--plan", str(plan))
    assert code == 2 and "blk.0.attn names tensors of another sublayer: ffn_up" in err


def test_export_of_a_trial_that_did_not_finish_names_its_state(capsys, tmp_path):
    (tmp_path / "plans").mkdir()
    (tmp_path / "experiment.yaml").write_text("name: x\n")
    (tmp_path / "plans/trial-0001.yaml").write_text("groups: {}\n")
    (tmp_path / "trials.csv").write_text("trial,state,error\n0,COMPLETE,\n1,FAIL,MemoryError: out of memory\n")
    code, _, err = _run(capsys, "export", "--run", str(tmp_path), "--trial", "1", "--out", str(tmp_path / "m.gguf"))
    assert code == 2 and "trial 1 of" in err and "did not finish (state FAIL: MemoryError: out of memory)" in err


def test_corrupt_model_files_are_one_line_errors(capsys, tmp_path):
    """A truncated GGUF (a download cut short), and config.json sizes that cannot form a model."""
    from pathlib import Path

    from autosquash.models.load import _shipped_path

    folder, file = _shipped_path("smollm2-135m")
    cut = tmp_path / "cut.gguf"
    with open(Path(folder, file), "rb") as f:
        cut.write_bytes(f.read(100_000))  # inside the header's vocabulary
    for cmd in (["estimate", "--phone", "iphone-16"], ["eval", "--text", "lambada"]):
        code, _, err = _run(capsys, *cmd, "--model", str(cut))
        assert code == 2 and f"{cut}: a truncated or corrupt GGUF file" in err and err.count("\n") == 1, cmd
    base = {"model_type": "llama", "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 100}
    for extra, msg in (
        ({"hidden_size": 0, "num_attention_heads": 4}, "sizes must be positive integers; got hidden_size 0"),
        ({"hidden_size": 100, "num_attention_heads": 3}, "hidden_size 100 does not divide into 3 heads"),
        ({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}, "4 attention heads do not split"),
    ):
        config = tmp_path / "config.json"
        config.write_text(json.dumps({**base, **extra}))
        code, _, err = _run(capsys, "estimate", "--phone", "iphone-16", "--model", str(config))
        assert code == 2 and msg in err, extra


def test_a_plan_that_leaves_groups_out_is_refused_by_estimate_export_and_a_trial_rebuild(capsys, tmp_path):
    """A plan priced or exported as if its missing groups were F16 is a silent wrong result: a plan names every
    group of the model it is applied to, or it is refused in one line, before any weight loads."""
    from autosquash.compress.plan import Plan
    from autosquash.models.arch import Arch
    from autosquash.search.experiment import load_experiment
    from autosquash.yaml_io import dump_yaml_model
    from tests.conftest import tiny_config

    model = str(ROOT / "tests/cost/configs/Llama-3.2-1B/config.json")  # 16 blocks, 32 groups
    tiny = tmp_path / "tiny-plan.yaml"
    dump_yaml_model(Plan.uniform(Arch.from_config(tiny_config()), "Q4_0"), tiny)  # the 2-block model's plan
    empty = tmp_path / "empty.yaml"
    empty.write_text("groups: {}\n")
    out = tmp_path / "m.gguf"
    for plan, msg in ((tiny, "no choice for 28 of the model's 32 groups (blk.2.attn"), (empty, "no choice for 32 of")):
        for cmd in (["estimate", "--phone", "iphone-16"], ["export", "--out", str(out)]):
            code, _, err = _run(capsys, *cmd, "--model", model, "--plan", str(plan))
            assert code == 2 and f"{plan}: {msg}" in err and err.count("\n") == 1, (cmd, err)
    assert not out.exists()

    # A search's trial whose plan file was cut down by hand: refused before the trial is rebuilt.
    run = tmp_path / "run"
    (run / "plans").mkdir(parents=True)
    dump_yaml_model(load_experiment(ROOT / "experiments/smoke.yaml"), run / "experiment.yaml")  # the tiny model
    (run / "plans/trial-0000.yaml").write_text("groups:\n  blk.0.attn: {quant: Q4_0}\n  blk.0.ffn: {quant: Q4_0}\n")
    (run / "trials.csv").write_text("trial,state,error\n0,COMPLETE,\n")
    code, _, err = _run(capsys, "export", "--run", str(run), "--trial", "0", "--out", str(out))
    assert code == 2 and "trial-0000.yaml: no choice for 2 of the model's 4 groups (blk.1.attn, blk.1.ffn)" in err
    assert not out.exists() and not (run / "cache").exists()  # nothing loaded, nothing calibrated


@pytest.mark.parametrize(
    "seq_len, score, least",
    [("1", "all", "at least 2 tokens"), ("2", "second-half", "at least 3 tokens to score one prediction with --score")],
)
def test_eval_refuses_a_window_that_scores_nothing_naming_the_flag(capsys, seq_len, score, least):
    """A window of one token predicts nothing: its perplexity was NaN, blamed on the weights."""
    code, _, err = _run(
        capsys, "eval", "--model", str(ROOT / "experiments/tiny-llama.json"), "--text", "lambada",
        "--seq-len", seq_len, "--score", score,
    )  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and f"--seq-len {seq_len}: a window must hold {least}" in err
    assert "NaN" not in err


@pytest.mark.integration
@pytest.mark.parametrize("optuna", [False, True], ids=["mlflow", "optuna-dashboard"])
def test_ctrl_c_stops_ui_quietly_with_exit_130(tmp_path, optuna):
    """Ctrl-C reaches the terminal's whole foreground process group: MLflow's workers and job runners each printed
    a traceback, and ui exited 0. Now only autosquash gets it and stops the server itself."""
    import os
    import signal
    import socket
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    if optuna:
        import optuna as optuna_lib

        optuna_lib.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    else:
        MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "autosquash", "ui", "--out", str(tmp_path), "--port", str(port)]
    # Its own process group, as a shell runs a foreground job: the group is what a terminal's Ctrl-C signals.
    proc = subprocess.Popen(
        [*cmd, *(["--optuna"] if optuna else [])],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # As in a terminal: a background job of a non-interactive shell (CI, nohup) inherits SIGINT ignored, and a
        # Python started so never turns Ctrl-C into KeyboardInterrupt (checked: under `trap '' INT` this test hung).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(3)  # MLflow starts its job runners once it serves
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    with socket.socket() as s:
        # The server is gone: its port binds again (SO_REUSEADDR lets the closed test request's TIME_WAIT pass, never
        # a socket still listening).
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_model_too_large_for_this_machine_is_refused_before_it_loads(capsys, monkeypatch, tmp_path):
    """search, export and eval of a config, a folder or a GGUF model: one line with what it needs and what there
    is, before a weight is read or a folder made."""
    import autosquash.models.device as device

    monkeypatch.setattr(device, "available_memory_bytes", lambda: 50_000_000)
    tiny = str(ROOT / "experiments/tiny-llama.json")  # 13.8M parameters: 55 MB in float32, 69 MB to load
    need = f"model {tiny} needs about 69 MB in float32 (14M parameters, 25% more to load them); this machine has 50 MB"
    out = tmp_path / "m.gguf"
    for argv in (
        ["eval", "--model", tiny, "--text", "lambada"],
        ["export", "--model", tiny, "--uniform", "Q8_0", "--out", str(out)],
        ["search", str(ROOT / "experiments/smoke.yaml"), "--out", str(tmp_path / "run")],
    ):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and err.count("\n") == 1 and need in err and "AUTOSQUASH_IGNORE_MEMORY=1" in err, argv
    assert not out.exists() and not (tmp_path / "run").exists()
    code, _, err = _run(capsys, "eval", "--model", "smollm2-135m", "--text", "lambada")  # a GGUF: its header only
    assert code == 2 and "model smollm2-135m needs about 673 MB in float32 (135M parameters" in err
    monkeypatch.setenv("AUTOSQUASH_IGNORE_MEMORY", "1")
    code, text, err = _run(capsys, "eval", "--model", tiny, "--text", "lambada", "--tokens", "64", "--seq-len", "32")
    assert code == 0 and text.startswith("perplexity"), err


def test_a_plan_the_familys_llama_cpp_graph_cannot_run_is_one_line_and_no_file(capsys, tmp_path):
    """Qwen3's llama.cpp graph sizes every block from block 0's: export refuses a plan that prunes one block's FFN
    (the file would not load in llama.cpp) in one line, before anything is written."""
    from autosquash.compress.plan import LayerChoice, Plan
    from autosquash.models.arch import Arch
    from autosquash.models.load import load_arch
    from autosquash.yaml_io import dump_yaml_model

    config = tmp_path / "tiny-qwen3" / "config.json"
    config.parent.mkdir()
    config.write_text(
        json.dumps(json.loads((ROOT / "experiments/tiny-llama.json").read_text()) | {"model_type": "qwen3"})
    )
    arch: Arch = load_arch(str(config))
    plan = Plan.uniform(arch, "Q8_0")
    groups = dict(plan.groups) | {"blk.1.ffn": LayerChoice(quant="Q8_0", ffn_keep_ratio=0.75)}
    dump_yaml_model(plan.model_copy(update={"groups": groups}), tmp_path / "plan.yaml")
    out = tmp_path / "m.gguf"
    code, _, err = _run(
        capsys, "export", "--model", str(config), "--plan", str(tmp_path / "plan.yaml"), "--out", str(out)
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "qwen3 plan whose blocks differ in FFN width or KV heads cannot be written as GGUF" in err
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))
