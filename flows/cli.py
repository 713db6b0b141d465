"""The ``shrinkflow`` command: run a sweep, list devices, pull a promoted model.

Exit codes: 0 promoted (or kept an unbeaten champion), 3 no variant fits the budget,
2 bad input (the message names the field), 1 anything else.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from shrinkflow import budget
from shrinkflow.errors import ArtifactError, ShrinkflowError, SpecError
from shrinkflow.specs import SweepSpec, parse

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_NO_FIT = 0, 1, 2, 3


def load_spec(path: str | None, overrides: dict) -> SweepSpec:
    """A SweepSpec from a YAML file and/or CLI options (options win)."""
    data: dict = {}
    if path:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise SpecError(f"Spec file {path!r} does not exist; expected a YAML file path.") from None
        except yaml.YAMLError as exc:
            raise SpecError(f"Spec file {path!r} is not valid YAML ({str(exc).splitlines()[0]}); expected a mapping.") from None
        if not isinstance(loaded, dict):
            raise SpecError(f"Spec file {path!r} holds a {type(loaded).__name__}; expected a YAML mapping of SweepSpec fields.")
        data = loaded
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = data[key] | value  # e.g. --trials within the file's search mapping
        elif value is not None:
            data[key] = value
    return parse(SweepSpec, data)


def _validate(spec: SweepSpec) -> None:
    """Everything that can be checked before a run writes anything (the workload is built, with
    the teacher read from, or trained once into, the store cache the flow reads it from)."""
    from shrinkflow import pipeline, search, steps, workloads
    from tasks import config, storage

    profile, limits = budget.resolve(spec.device, spec.budget)
    search.check(spec, profile)
    workload = workloads.load(**spec.workload_args(), cache=storage.StoreCache(storage.open_store(config.store_uri())))
    steps.check_capabilities(workload, pipeline.recipes_for(spec, workload, limits))  # before the teacher runs


@functools.cache
def _console():
    """The one console: tables, the live display and log records share it."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160, log_path=False)  # pipes and logs get whole rows


def human_bytes(n: int) -> str:
    """Bytes as kB or MB (decimal, as the budgets' MB are)."""
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _fits(outcome, v) -> str:
    if v.skipped:
        return "skipped: " + v.skipped
    if v is outcome.teacher:
        return "teacher"
    if v.name == outcome.selection.winner:
        return "[bold green]winner[/]"
    return "yes" if v.fits else "no: " + ", ".join(m.label for m in v.verdict.misses)


def _table(outcome, console) -> None:
    from rich.table import Table

    table = Table(title=f"{outcome.name}: {len(outcome.variants)} variants on {outcome.device}")
    table.add_column("variant", no_wrap=True)
    for col in ("quality", "size", "p50 ms", "peak memory", "energy mJ"):
        table.add_column(col, justify="right")
    table.add_column("fits")
    for v in (outcome.teacher, *outcome.variants):
        r = v.report
        cells = (f"{r.quality:.4f}", human_bytes(r.size_bytes), f"{r.latency_p50_ms:.3f}",
                 human_bytes(r.peak_memory_bytes), f"{r.energy_mj:.4f}") if r else ("-",) * 5
        table.add_row(v.name, *cells, _fits(outcome, v))
    console.print(table)
    sel, promo = outcome.selection, outcome.promotion
    if sel.winner is not None:
        console.print(f"Winner [bold]{sel.winner}[/]: {sel.why}\nRule: {sel.rule}.")
    if promo is None:
        from shrinkflow.select import misses_text

        console.print(f"No variant fits. Nearest misses: {misses_text(outcome.variants, outcome.selection.nearest_misses)}.")
    elif promo.promoted:
        console.print(f"Promoted [bold]{promo.model}[/] v{promo.version} as @champion -> {promo.manifest_uri}\n"
                      f"Pull it: shrinkflow pull models:/{promo.model}@champion --out ./{promo.model}")
    else:
        console.print(f"{promo.model} v{promo.version} registered, not promoted: {promo.reason}")


STAGES = {"prefect-api": "starting the Prefect API", "teacher": "teacher: outputs and baseline",
          "variants": "variants", "promotion": "selection, promotion, report", "done": "done"}


class SweepDisplay:
    """A running sweep, live: the stage, variants done/total, running, failed, elapsed and an estimate.

    Fed by ``flows.compress.run``'s progress callback. With ``live=False`` (``-v``, where logs
    scroll past) each change is printed as a line instead.
    """

    def __init__(self, console, title: str, live: bool = True, budget_s: float | None = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console, self.live, self.last = console, live, None
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                 console=console, disable=not live)
        self.task = self.progress.add_task(title, total=None, detail="")
        self.variants_since: float | None = None
        self.budget_s = budget_s  # a search's time budget: no batch starts that would end past it

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def update(self, p) -> None:
        now = time.monotonic()
        if p.stage == "variants" and self.variants_since is None:
            self.variants_since = now
        detail = f"{p.running} running, {p.failed} failed, {self.estimate(p, now)}" if p.stage == "variants" else ""
        self.progress.update(self.task, description=STAGES[p.stage], total=p.total or None, completed=p.done,
                             detail=detail)
        if not self.live and (p.stage, p.done, p.failed) != self.last:
            self.console.log(f"{STAGES[p.stage]}: {p.done}/{p.total} done, {p.failed} failed" if p.total
                             else STAGES[p.stage])
        self.last = (p.stage, p.done, p.failed)

    def estimate(self, p, now: float) -> str:
        """Time left for the variants, at the mean pace so far (rough: variants differ in cost)."""
        if self.variants_since is None or not (p.done or self.budget_s):
            return "estimate after the first variant"
        left = (now - self.variants_since) / p.done * (p.total - p.done) if p.done else float("inf")
        if self.budget_s is not None:  # the search's budget ends it first (its sensitivity pass came before)
            left = min(left, max(0.0, self.budget_s - (now - self.variants_since)))
        return f"about {int(left // 60)}m{int(left % 60):02d}s left"


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.config import prepare_environment

    spec = load_spec(args.spec, {"workload": args.workload, "task": args.task, "data": args.data,
                                 "max_length": args.max_length, "device": args.device, "seed": args.seed,
                                 "workers": args.workers, "runner": args.runner,
                                 "dask_address": args.dask_address, "name": args.name, "registry_name": args.registry_name,
                                 "objective": args.objective, "workload_recipes": args.workload_recipes or None,
                                 "search": {k: v for k, v in {"trials": args.trials, "minutes": args.minutes,
                                                              "epochs": args.epochs}.items()
                                            if v is not None} or None})
    prepare_environment(quiet=not args.verbose)
    console = _console()
    with console.status(f"checking {spec.workload} for {spec.device}..."):
        _validate(spec)
        from flows.compress import run
    minutes = spec.search_or_default().minutes if spec.searching else None
    with SweepDisplay(console, f"{spec.name}: {spec.workload} for {spec.device}", live=not args.verbose,
                      budget_s=None if minutes is None else minutes * 60) as display, \
            native_output(spec.name, console, keep=args.verbose):
        outcome = run(spec, on_progress=display.update)
    _table(outcome, console)
    _where_to_browse(spec, console)
    return EXIT_NO_FIT if outcome.promotion is None else EXIT_OK


@contextlib.contextmanager
def native_output(name: str, console, keep: bool) -> Iterator[None]:
    """Send this process's standard error (file descriptor 2) to a log file while the sweep runs,
    unless ``keep``. Native libraries (ExecuTorch's runtime, Kineto) write to it from C++, where
    Python's logging settings cannot reach, and worker processes started meanwhile inherit it.
    On a failure the log's last lines are shown, with where the rest is."""
    if keep:
        yield
        return
    from tasks.config import home

    path = home() / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with path.open("ab") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            sys.stderr.flush()
            os.dup2(saved, 2)
            if tail := path.read_text(errors="replace").splitlines()[-20:]:
                console.print("\n".join(tail), markup=False, highlight=False)
                console.print(f"library output of this run: {path}")
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    if path.stat().st_size == 0:
        path.unlink()  # nothing was written: no file to point at


def _where_to_browse(spec: SweepSpec, console) -> None:
    """The sweep's runs in the MLflow UI (as model training), or how to open a UI on the embedded store."""
    from tasks import config, report, tracking

    uri, exp_id = config.tracking_uri(), tracking.experiment_id(spec.name)
    if url := report.experiment_url(uri, exp_id):
        console.print(f"MLflow runs: {url}")
    elif uri.startswith("sqlite:"):
        console.print(f"Browse the runs: mlflow ui --backend-store-uri {uri}, then open "
                      f"{report.experiment_url('http://127.0.0.1:5000', exp_id)}")


def cmd_devices(args: argparse.Namespace) -> int:
    from rich.table import Table

    table = Table(title="device presets")
    table.add_column("name", no_wrap=True)
    for col in ("device", "size MB", "latency ms", "memory MB", "energy mJ", "quality drop", "threads", "runtimes"):
        table.add_column(col)
    for p in budget.DEVICES.values():
        b = p.budget
        table.add_row(p.name, p.title, *(str(x) for x in (b.max_size_mb, b.max_latency_ms, b.max_peak_memory_mb,
                                                           b.max_energy_mj, b.max_quality_drop, b.threads)),
                      ", ".join(p.runtimes))
    _console().print(table)
    return EXIT_OK


def cmd_pull(args: argparse.Namespace) -> int:
    import shlex

    from tasks.describe import LOADERS
    from tasks.pull import pull

    if (args.uri is None) == (args.device is None):
        raise SpecError("Give either a model URI or --device; expected 'shrinkflow pull models:/NAME@champion --out DIR' "
                        "or 'shrinkflow pull --device NAME [--workload W] [--version N] --out DIR'.")
    uri = args.uri
    if args.device:
        budget.device(args.device)
        name = f"{args.workload}-{args.device}"
        uri = f"models:/{name}/{args.version}" if args.version else f"models:/{name}@champion"
    manifest = pull(uri, Path(args.out))
    files = ", ".join(f["path"] for f in manifest["files"])
    print(f"Pulled {manifest['registry_name']} v{manifest['registry_version']} to {args.out} ({files}); checksums verified.")
    if manifest.get("inputs_text"):
        print(f"Inputs: {manifest['inputs_text']}")
    loader = manifest.get("load_with") or LOADERS.get(manifest.get("format", ""), "plain PyTorch")  # older manifests
    print(f"Load it with {loader}:\n  cd {shlex.quote(str(args.out))} && python -c {shlex.quote(manifest['load'])}")
    return EXIT_OK


def cmd_stack(args: argparse.Namespace) -> int:
    from tasks import stack

    if args.action == "up":
        print(f"Starting the shrinkflow stack (state and logs in {stack.root()}):", flush=True)
        state = stack.up(progress=lambda line: print(f"  {line}", flush=True))
        print("shrinkflow stack is up:")
        print(f"  Prefect UI  http://127.0.0.1:{stack.ports()['prefect']}")
        # The MLflow UI opens experiments in GenAI mode unless the address asks for model training.
        print(f"  MLflow UI   {stack.urls()['mlflow']}/#/experiments?workflowType=machine_learning")
        print(f"  S3          {stack.urls()['s3']}" if "s3" in state else "  S3          your SHRINKFLOW_ARTIFACT_STORE")
        print("Use it from this shell:")
        for key, value in state["env"].items():
            print(f"  export {key}={value}")
        return EXIT_OK
    if args.action == "status":
        health = stack.status()
        for name, ok in health.items():
            print(f"{name:8s} {'up' if ok else 'DOWN'}")
        if not any(health.values()):
            print("The stack is not running; start it with `shrinkflow stack up`.")
        return EXIT_OK if health and all(health.values()) else EXIT_ERROR
    stopped = stack.down()
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}; data kept in {stack.root()}")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="shrinkflow", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="compress a teacher for a device and promote the best variant that fits")
    run.add_argument("spec", nargs="?", help="YAML file of SweepSpec fields")
    run.add_argument("--workload", help="built-in workload, package.module:function, or hf:PATH (a Hugging Face model directory)")
    run.add_argument("--task", choices=["sequence-classification", "sentence-embedding"], help="with hf:PATH: what the model does")
    run.add_argument("--data", help="with hf:PATH: .csv/.tsv/.jsonl with a 'text' column ('label' to classify), or .txt, one text per line")
    run.add_argument("--max-length", type=int, help="tokens per text (minilm, hf:PATH; default: the model's own limit)")
    run.add_argument("--device", help="device preset (see `shrinkflow devices`)")
    run.add_argument("--seed", type=int)
    run.add_argument("--workers", type=int)
    run.add_argument("--runner", choices=["dask", "threads"], help="dask (default on >1 core) or threads (debugging)")
    run.add_argument("--dask-address", help="join an existing Dask cluster, e.g. tcp://scheduler:8786")
    run.add_argument("--objective", choices=["best-quality", "smallest", "fastest", "lowest-energy"],
                     help="how the winner is picked among the variants that fit (default: best-quality)")
    run.add_argument("--trials", type=int, help="search: trials that train (default 16)")
    run.add_argument("--minutes", type=float, help="search: time budget in minutes (sensitivity pass included); no batch starts that would end past it")
    run.add_argument("--epochs", type=int, help="search: distillation epochs per trial (default 60)")
    run.add_argument("--workload-recipes", action="store_true",
                     help="run the workload's own hand-written recipe list instead of searching")
    run.add_argument("--name")
    run.add_argument("--registry-name")
    run.add_argument("-v", "--verbose", action="store_true", help="show library logs (Prefect, Dask, MLflow, torch) as they come")
    run.set_defaults(fn=cmd_run)
    sub.add_parser("devices", help="list device presets").set_defaults(fn=cmd_devices)
    stack_p = sub.add_parser("stack", help="a local Prefect + MLflow + S3 stack with a worker: up, status, down")
    stack_p.add_argument("action", choices=["up", "status", "down"])
    stack_p.set_defaults(fn=cmd_stack)
    pull = sub.add_parser("pull", help="fetch a promoted model and verify its checksums")
    pull.add_argument("uri", nargs="?", help="models:/NAME@champion or models:/NAME/VERSION")
    pull.add_argument("--device", help="instead of a URI: the champion (or --version) of <workload>-<device>")
    pull.add_argument("--workload", default="digits", help="with --device (default: digits)")
    pull.add_argument("--version", type=int, help="with --device: this version rather than the champion")
    pull.add_argument("--out", required=True)
    pull.set_defaults(fn=cmd_pull)
    return ap


#: Loggers of libraries that say too much at INFO (and some at WARNING); -v shows them.
#: Prefect's and MLflow's own handlers are set through the environment (tasks.config.QUIET_ENV).
NOISY_LOGGERS = ("httpx", "alembic", "torchao", "torch_pruning", "distributed", "botocore", "urllib3", "matplotlib",
                 "torch")


def configure_logging(verbose: bool) -> None:
    """Quiet by default: warnings from shrinkflow, errors from libraries; ``-v``: everything at INFO.

    Records go through the console the live display draws on, so they print above it."""
    from rich.logging import RichHandler

    level = logging.INFO if verbose else logging.WARNING
    handler = RichHandler(console=_console(), level=level, show_path=False, log_time_format="%H:%M:%S")
    logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[handler], force=True)
    if not verbose:
        warnings.simplefilter("ignore")  # libraries' deprecation notices (workers: PYTHONWARNINGS)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging(getattr(args, "verbose", False))
    try:
        return args.fn(args)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ShrinkflowError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR


def entry() -> int:
    """The ``shrinkflow`` command: :func:`main`, then a quick exit.

    Exiting, the interpreter runs a full collection over every object it tracks; after a sweep,
    with torch, Prefect and MLflow loaded, that kept the process alive 2.5 s after its last line
    (0.3 s with the objects frozen, ``gc.freeze()``; docs/BENCHMARKS.md, "exit"). Not in
    :func:`main`, which tests and other programs call and go on."""
    code = main()
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(entry())
