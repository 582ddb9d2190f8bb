"""The `headlab` command line. Every HeadlabError is printed as one clear line (exit code 2)."""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from headlab.compat import cli_exceptions
from headlab.errors import HeadlabError, InputError

app = typer.Typer(help="headlab: capture, analyse and intervene on attention heads.", no_args_is_help=True)
zoo_app = typer.Typer(
    help="Models that run without a hub: tiny random models of real architectures.", no_args_is_help=True
)
app.add_typer(zoo_app, name="zoo")
act_app = typer.Typer(
    help="ACT (Yu et al., ICML 2024): calibrate hidden attention sinks, search the heads.",
    no_args_is_help=True,
)
app.add_typer(act_app, name="act")
report_app = typer.Typer(help="Benchmark reports (HTML + JSON + Markdown).", no_args_is_help=True)
app.add_typer(report_app, name="report")
store_app = typer.Typer(help="Inspect and check activation stores.", no_args_is_help=True)
app.add_typer(store_app, name="store")
console = Console(soft_wrap=True)  # messages are never broken mid-path


def _friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HeadlabError as err:
            _say_error(str(err))
            raise typer.Exit(2) from None

    return wrapper


def _say_error(message: str) -> None:
    """One `headlab: ...` line; the message is printed as text, never read as rich markup."""
    console.print(f"[bold red]headlab:[/] {escape(message)}")


def main() -> None:
    """The `headlab` console script: the typer app, with a usage error (a bad option value, a missing
    argument) printed as one `headlab:` line like every other error, exit code 2."""
    errors = cli_exceptions()
    try:
        code = app(standalone_mode=False)
    except errors.NoArgsIsHelpError as err:
        err.show()
        code = 2
    except errors.UsageError as err:
        command = err.ctx.command_path if err.ctx is not None else "headlab"
        _say_error(f"{err.format_message()} (see `{command} --help`)")
        code = 2
    except errors.Abort:
        code = 130
    raise SystemExit(code or 0)


@app.command()
@_friendly
def info(model: Annotated[str, typer.Argument(help="local model directory or hub id")]) -> None:
    """Load a model and show its family, towers and attention shapes."""
    import headlab as hl

    lm = hl.load(model)
    table = Table(title=f"{lm.model_type} ({lm.family.value}) from {lm.source}")
    for col in ("tower", "module path", "layers", "heads", "kv heads", "head dim", "causal", "patch grid"):
        table.add_column(col)
    for t in lm.towers:
        table.add_row(
            t.name,
            t.path,
            str(t.n_layers),
            str(t.n_heads),
            str(t.n_kv_heads),
            str(t.head_dim),
            str(t.causal),
            "x".join(map(str, t.grid)) if t.grid else "-",
        )
    console.print(table)
    console.print(f"image tokens: {lm.image_tokens}")


def _summary(frame, title: str) -> Table:
    """Per (tower, layer, head): first-token mass, entropy, mean distance, alpha of key 0."""
    import pandas as pd

    picks = {
        "mass:bos": ("mass", "bos"),
        "mass:cls": ("mass", "cls"),
        "mass:image": ("mass", "image"),
        "entropy": ("entropy", ""),
        "distance": ("distance", ""),
        "alpha pos:0": ("alpha", "pos:0"),
    }
    cols = {}
    for label, (stat, role) in picks.items():
        sub = frame[(frame.stat == stat) & (frame.role == role)]
        if len(sub):
            cols[label] = sub.groupby(["tower", "layer", "head"]).value.mean()
    joined = pd.DataFrame(cols).reset_index()
    table = Table(title=title)
    for c in joined.columns:
        table.add_column(str(c), justify="right")
    for row in joined.itertuples(index=False):
        table.add_row(*(("-" if v != v else f"{v:.3f}") if isinstance(v, float) else str(v) for v in row))
    return table


@app.command()
@_friendly
def stats(
    model: Annotated[str, typer.Argument(help="local model directory or hub id")],
    prompt: Annotated[list[str], typer.Option(help="a prompt (repeat for a batch)")],
    image: Annotated[list[Path] | None, typer.Option(help="an image per prompt (LVLMs, ViTs)")] = None,
    out: Annotated[
        Path | None, typer.Option(help="write the tidy head_stats table (.csv or .parquet)")
    ] = None,
) -> None:
    """Capture per-head attention statistics of every head for a few prompts."""
    import headlab as hl
    from headlab.inputs import prepare

    if out is not None:
        _check_table_path(out, "--out")
    lm = hl.load(model)
    inputs = prepare(lm, prompt, image or [])
    frame = _capture_stats(lm, inputs)
    console.print(_summary(frame, f"per-head statistics of {lm.model_type}, {len(prompt)} example(s)"))
    if out is not None:
        _write(frame, out)


def _capture_stats(lm, inputs):
    import torch

    import headlab as hl

    with torch.no_grad(), hl.capture(lm) as rec:
        lm.model(**inputs)
    return rec.head_stats


_TABLE_SUFFIXES = (".csv", ".parquet")


def _check_table_path(path: Path, option: str) -> None:
    """A table can be written at `path` (.csv or .parquet, not a folder); checked before any work."""
    if path.suffix not in _TABLE_SUFFIXES:
        raise InputError(f"{option} {path} must end in .csv or .parquet")
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name ending in .csv or .parquet")
    _check_creatable(path.parent, option)


def _check_creatable(folder: Path, option: str) -> None:
    """`folder` is a folder or can be made one: its nearest existing ancestor is a folder."""
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                raise InputError(f"{option} {folder}: {existing} is a file, not a folder; give a folder path")
            return


def _write(frame, out: Path) -> None:
    _check_table_path(out, "the output")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)
    console.print(f"wrote {len(frame)} rows to {out}")


def _layers(text: str) -> tuple[int, ...] | None:
    if text == "all":
        return None
    if text == "none":
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--attention takes 'all', 'none' or comma-separated layers, got {text!r}") from None


@app.command("capture")
@_friendly
def capture_cmd(
    model: Annotated[str, typer.Option(help="local model directory or hub id")],
    data: Annotated[Path, typer.Option(help="JSONL of prompts: {'id', 'prompt', 'image'?, ...}")],
    out: Annotated[Path, typer.Option(help="the store directory (created if missing)")],
    condition: Annotated[str, typer.Option(help="name of this condition (e.g. with_image)")] = "default",
    images: Annotated[
        Path | None, typer.Option(help="folder the image paths are relative to (default: the data file's)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per forward pass")] = 8,
    attention: Annotated[
        str, typer.Option(help="layers whose compact attention is stored: all, none or 0,3")
    ] = "all",
) -> None:
    """Capture a prompt file into a store (resumable: a rerun skips committed examples).

    Exit code: 0 every example of the file is in the store; 1 some lines were bad (listed) but the others
    are in the store; 2 nothing of the file is in the store, or an error stopped it first; 130 interrupted.
    """
    import headlab as hl
    from headlab.datasets.prompts import read_prompts
    from headlab.store import Store
    from headlab.store.batch import capture_to_store

    attention_layers = _layers(attention)
    if not data.is_file():
        raise InputError(f"--data {data} does not exist (or is not a file)")
    if images is not None and not images.is_dir():
        raise InputError(f"--images {images} is not a folder")
    _check_creatable(out, "--out")
    lm = hl.load(model)
    prompts = read_prompts(data, images_dir=images, need_images=lm.family is not hl.Family.LLM)
    store = Store.create(out, lm, exist_ok=True)
    report = capture_to_store(
        lm,
        store,
        prompts.items,
        condition=condition,
        batch_size=batch_size,
        attention_layers=attention_layers,
    )
    _capture_summary(report, prompts.problems, out, data)


def _capture_summary(report, problems: list[str], out: Path, data: Path) -> None:
    """Print the counts and every skipped line; exit with the code `capture_cmd` documents."""
    bad = problems + report.failed
    in_store = report.done + report.skipped
    console.print(f"{report.done} captured, {report.skipped} already in the store, {len(bad)} bad -> {out}")
    for problem in bad:
        console.print(f"  [yellow]skipped[/] {problem}")
    if report.interrupted:
        console.print("[bold]interrupted[/]: every committed batch is kept; rerun the same command to resume")
        raise typer.Exit(130)
    if not in_store:
        what = f"all {len(bad)} lines are bad (listed above)" if bad else "it holds no examples"
        console.print(f"[bold red]headlab:[/] nothing of {data} is in the store: {what}")
        raise typer.Exit(2)
    if bad:
        raise typer.Exit(1)


@store_app.command("verify")
@_friendly
def store_verify(
    store: Annotated[Path, typer.Argument(help="store directory")],
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="move what cannot be trusted to STORE/quarantine/ (nothing is deleted) and remove stale "
            ".tmp-* folders of writers that are gone",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(help="with --repair: the model that wrote the store, to rebuild its manifest"),
    ] = None,
) -> None:
    """Check every file of a store against its checksums and schema; --repair quarantines what fails.

    Exit code: 0 the store reads cleanly (notes are harmless); 1 problems remain (listed); 2 not a store.
    """
    from rich.markup import escape

    from headlab.store import Store
    from headlab.store.integrity import verify_store

    if model is not None and not repair:
        raise InputError("--model is for --repair (it rebuilds a broken manifest); add --repair")
    if repair:
        import headlab as hl

        result = Store.repair(store, hl.load(model) if model else None)
        console.print(
            escape("\n".join(f"repaired: {action}" for action in result.actions) or "nothing to repair")
        )
        report = result.after
    else:
        report = verify_store(store)
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    for problem in report.problems:
        console.print(f"[bold red]problem[/]: {escape(problem)}")
    console.print(
        f"{report.shards} shards, {report.files} files checked: {'OK' if report.ok else 'PROBLEMS'}"
    )
    if not report.ok:
        if not repair:
            console.print(
                escape(f"`headlab store verify {store} --repair` moves what cannot be trusted to quarantine/")
            )
        raise typer.Exit(1)


@store_app.command("info")
@_friendly
def store_info(store: Annotated[Path, typer.Argument(help="store directory")]) -> None:
    """Summarise a store: model, ids, (example, condition) rows, conditions, towers, what is stored, results."""
    from rich.markup import escape

    from headlab.store import Store

    labels = {"examples": "examples (ids)", "rows": "(example, condition) rows"}
    for key, value in Store.open(store).info().items():
        if key == "stored":
            for condition, what in value.items():
                shown = ", ".join(f"{name} {n}" for name, n in what.items()) or "nothing"
                console.print(escape(f"{'stored [' + condition + ']':>26}: {shown}"))
            continue
        shown = (", ".join(map(str, value)) or "none") if isinstance(value, list) else value
        console.print(escape(f"{labels.get(key, key.replace('_', ' ')):>26}: {shown}"))


def _option_pairs(items: list[str]) -> dict[str, str]:
    """-o KEY=VALUE items as {key: value text}; the analysis' option declarations parse the text."""
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"--option expects KEY=VALUE, got {item!r}")
        if key in pairs:
            raise InputError(f"--option {key} is given twice ({pairs[key]!r} and {value!r}); give it once")
        pairs[key] = value
    return pairs


def _analyses_list() -> None:
    """Each analysis, then each option: what it takes, its default, its help."""
    from rich.markup import escape

    from headlab.analyses.registry import as_text, registered

    for entry in registered().values():
        console.print(f"[bold]{entry.name}[/bold]: {escape(entry.description)}")
        for key, opt in entry.options.items():
            console.print(escape(f"    {key}: {opt.describe()}, default {as_text(opt.default)}. {opt.help}"))


def _check_file_target(path: Path, option: str) -> None:
    """A file can be written at `path`: it is not a folder and its folder exists or can be made."""
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name")
    _check_creatable(path.parent, option)


_ANALYZE_EXIT = (
    "Exit code: 0 the result is saved in the store (and written to --csv); 1 it is saved but has no rows "
    "(nothing passed the analysis), or --csv could not be written; 2 nothing was saved: a bad option, "
    "store or model (checked before any work) or an error while computing (one line says why)."
)


@app.command(epilog=_ANALYZE_EXIT)
@_friendly
def analyze(
    name: Annotated[str, typer.Argument(help="the analysis; `headlab analyze list` lists them")],
    store: Annotated[Path | None, typer.Argument(help="store directory (its result is saved there)")] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", "-o", help="KEY=VALUE, repeatable (e.g. -o task=ioi)")
    ] = None,
    csv: Annotated[Path | None, typer.Option(help="also write the result as CSV")] = None,
) -> None:
    """Run an analysis on a store and save its result into the store (results/NAME.parquet)."""
    from headlab.analyses.registry import analysis, run_analysis
    from headlab.store import Store

    if name == "list":
        _analyses_list()
        return
    options = _option_pairs(option or [])
    analysis(name).parse(options)  # the options' own rules, before the store is opened
    if store is None:
        raise InputError(f"headlab analyze {name} needs the store directory: headlab analyze {name} STORE")
    if csv is not None:
        _check_file_target(csv, "--csv")
    frame = run_analysis(name, Store.open(store), **options)
    console.print(frame.head(20).to_string(index=False))
    console.print(f"saved the {name} result ({len(frame)} rows) in {store / 'results'}")
    if csv is not None:
        _write_csv(frame, csv)
    if not len(frame):
        console.print(
            f"[bold]the {name} result has no rows[/]: nothing passed the analysis with these options"
        )
        raise typer.Exit(1)


def _write_csv(frame, csv: Path) -> None:
    """The --csv copy of a result already saved in the store (exit 1 if it cannot be written)."""
    try:
        csv.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv, index=False)
    except OSError as err:
        console.print(
            f"[bold red]headlab:[/] could not write --csv {csv} ({err.strerror or err}); the result is saved "
            "in the store"
        )
        raise typer.Exit(1) from None
    console.print(f"wrote {len(frame)} rows to {csv}")


@app.command()
@_friendly
def dash(
    store: Annotated[Path, typer.Argument(help="store directory")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to serve on")] = 8050,
    host: Annotated[str, typer.Option(help="address to bind (127.0.0.1: this machine only)")] = "127.0.0.1",
    model: Annotated[bool, typer.Option(help="load the model for token strings, patch grids")] = True,
) -> None:
    """Browse a store's heads in the browser: heat maps, conditions, A - B, click a head for its attention."""
    from headlab.dashboards.app import serve
    from headlab.store import Store

    Store.open(store)  # a missing or broken store is one line, before the port is tried
    _check_servable(host, port)
    serve(store, host=host, port=port, model=model)


def _check_servable(host: str, port: int) -> None:
    """`host:port` can be bound now (the socket is closed again at once; the server binds it next)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            pass
    except OSError as err:
        raise InputError(
            f"cannot serve on {host}:{port} ({err.strerror or err}); pass a free --port or another --host"
        ) from None


@zoo_app.command("random")
@_friendly
def zoo_random(
    name: Annotated[str, typer.Argument(help="gpt2, llama, qwen2, llava, vit or clip_vision")],
    out: Annotated[Path, typer.Argument(help="directory to write the model into (created if missing)")],
    seed: Annotated[int, typer.Option(min=0, help="seed of the random weights")] = 0,
) -> None:
    """Build a tiny random-weight model of a real architecture (with tokenizer/processor) for offline use."""
    from headlab.zoo.random_models import build_random

    _check_creatable(out, "OUT")
    path = build_random(name, out, seed=seed)
    console.print(f"wrote a tiny random {name} to {path}")


@zoo_app.command("list")
@_friendly
def zoo_list() -> None:
    """The trained zoo models, whether their weights are present, and their shipped evaluation."""
    from headlab.zoo.registry import WEIGHTS, ZOO, card

    for name, model in ZOO.items():
        info = card(name)
        built = "shipped" if info else "not built"
        console.print(f"[bold]{name}[/bold] ({model.family}, {built}): {model.description}")
        if info:
            training = info["training"]
            console.print(
                f"    {training['steps']} steps, {training['seconds']:.0f} s, final loss {training['final_loss']:.3f}"
                f"; load with hl.load('zoo:{name}'); files in {WEIGHTS / name}"
            )


@zoo_app.command("train")
@_friendly
def zoo_train(
    name: Annotated[str, typer.Argument(help="zoo model: lm, llava or vit (`headlab zoo list`)")],
    out: Annotated[
        Path | None, typer.Option(help="directory to write into (default: the shipped location)")
    ] = None,
    seed: Annotated[int | None, typer.Option(min=0, help="default: the shipped weights' seed")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="training steps (default: the recipe's)")] = None,
) -> None:
    """Reproduce a zoo model from its recipe (deterministic seeds), evaluate it and write its zoo.json."""
    import json

    from tqdm import tqdm

    from headlab.zoo.registry import entry, train

    entry(name)
    if out is not None:
        _check_creatable(out, "--out")
    bar = tqdm(total=None, desc=f"training {name}", unit="step")

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    try:
        path = train(name, out, seed=seed, steps=steps, progress=progress)
    finally:
        bar.close()
    console.print(json.dumps(json.loads((path / "zoo.json").read_text())["evaluation"], indent=1))
    console.print(f"wrote the zoo model {name} to {path}")


def _act_layers(text: str, n_layers: int) -> tuple[int, ...] | None:
    if text == "code":
        return None
    if text == "all":
        return tuple(range(n_layers))
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--layers takes 'code', 'all' or comma-separated layers, got {text!r}") from None


@act_app.command("search")
@_friendly
def act_search(
    model: Annotated[str, typer.Option(help="local model directory, hub id or zoo:NAME")],
    task: Annotated[str, typer.Option(help="calibration task: colored_objects, multi_doc_qa or ioi")],
    out: Annotated[Path, typer.Option(help="write the per-head table here (.csv or .json)")],
    n: Annotated[int, typer.Option(help="calibration examples")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="seed of the calibration examples")] = 30_000,
    layers: Annotated[
        str, typer.Option(help="'code' (as the official code: not the first two, not the last), 'all' or 0,1")
    ] = "code",
    tau: Annotated[float, typer.Option(help="threshold on the received-attention score")] = 0.1,
    beta: Annotated[float, typer.Option(help="share of attention a hidden sink keeps")] = 0.4,
    eval_n: Annotated[
        int, typer.Option(min=0, help="held-out examples to compare plain vs ACT on (0 = skip)")
    ] = 0,
    eval_seed: Annotated[int, typer.Option(min=0, help="seed of the held-out examples")] = 10_000,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per forward pass")] = 32,
) -> None:
    """Search the heads whose ACT calibration alone improves a task's zero-shot accuracy (keep/skip)."""
    from tqdm import tqdm

    import headlab as hl
    from headlab.interventions import intervene
    from headlab.interventions.act import ACT, search_heads
    from headlab.interventions.act import task as act_task

    if out.suffix not in (".csv", ".json"):
        raise InputError(f"--out must end in .csv or .json, got {out.name!r}")
    _check_file_target(out, "--out")
    ACT(heads=(), tau=tau, beta=beta)  # ACT's own rules for tau and beta, before any work
    spec = act_task(task)
    examples = spec.examples(n, seed)
    lm = hl.load(model)
    chosen = _act_layers(layers, lm.n_layers)

    def score(lm, examples) -> float:
        return spec.accuracy(lm, examples, batch_size=batch_size)

    bar = tqdm(total=None, desc=f"ACT head search on {task}", unit="head")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = search_heads(lm, examples, score, layers=chosen, tau=tau, beta=beta, progress=progress)
    finally:
        bar.close()
    summary = {
        "model": model,
        "task": task,
        "n": n,
        "seed": seed,
        "tau": tau,
        "beta": beta,
        "layers": list(result.layers),
        "baseline": result.baseline,
        "kept": [list(h) for h in result.kept],
    }
    console.print(
        f"calibration accuracy without ACT {result.baseline:.4f} on {n} examples; "
        f"{len(result.kept)} of {len(result.table)} heads kept: {list(result.kept)}"
    )
    if eval_n > 0:
        held_out = spec.examples(eval_n, eval_seed)
        plain = score(lm, held_out)
        with intervene(lm, result.act()):
            calibrated = score(lm, held_out)
        summary["held_out"] = {"n": eval_n, "seed": eval_seed, "plain": plain, "act": calibrated}
        console.print(f"held-out accuracy on {eval_n} examples: plain {plain:.4f}, ACT {calibrated:.4f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        result.table.to_csv(out, index=False)
    else:
        out.write_text(json.dumps({**summary, "heads": result.table.to_dict(orient="records")}, indent=1))
    console.print(f"wrote {len(result.table)} heads to {out}")


@contextmanager
def _report_progress(unit: str):
    """A reports-style progress callback (description, total) -> tick; its bars close on exit."""
    from tqdm import tqdm

    bars = []

    def progress(desc: str, total: int):
        bar = tqdm(total=total, desc=desc, unit=unit)
        bars.append(bar)

        def tick() -> None:
            bar.update(1)
            if bar.n >= bar.total:
                bar.close()

        return tick

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def _answered(run, out: Path) -> None:
    failed = f", {len(run.failed)} failed (listed in the report)" if run.failed else ""
    console.print(
        f"{run.done} answered, {run.skipped} already in {out / 'answers.jsonl'}{failed} ({run.seconds:.1f} s)"
    )


def _report_done(html: Path, outcome: dict) -> None:
    """The report's path last, then exit with its outcome's code (`reports.output.Outcome`): 0 complete,
    1 partial (listed in the report), 2 nothing answered, 130 interrupted (rerun to resume)."""
    if outcome["status"] == "interrupted":
        console.print(
            "[bold]interrupted[/]: everything done so far is kept; rerun the same command to resume"
        )
    console.print(f"report: {html}")
    bad = f"{outcome['failed']} failed, {outcome['bad_input']} bad input records"
    if outcome["status"] == "partial":
        console.print(
            f"[yellow]partial[/]: {outcome['answered']} of {outcome['items']} items done ({bad}: see the report)"
        )
    if outcome["status"] == "empty":
        console.print(f"[bold red]headlab:[/] nothing was answered ({bad}: see the report)")
    if outcome["exit_code"]:
        raise typer.Exit(outcome["exit_code"])


_REPORT_EXIT = (
    "Exit code: 0 complete, 1 partial (a report was written; what is missing is listed in it), "
    "2 nothing answered or an error, 130 interrupted."
)
_REPORT_MODEL = (
    "local model directory, hub id or zoo:NAME "
    "(default: the model OUT/answers.jsonl was written with, else zoo:llava)"
)


@report_app.command("pope", epilog=_REPORT_EXIT)
@_friendly
def report_pope(
    out: Annotated[Path, typer.Option(help="report folder (answers.jsonl, report.json/.md/.html)")],
    model: Annotated[str | None, typer.Option(help=_REPORT_MODEL)] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(help="POPE question file (repeat per split; default: synthetic files in OUT/data)"),
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="image folder (default: an images/ folder beside each file)")
    ] = None,
    interventions: Annotated[str, typer.Option(help="conditions: a subset of none,vhr,var")] = "none,vhr,var",
    n: Annotated[int | None, typer.Option(help="first N questions per split (default: all)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens generated per answer")] = 4,
    var_tau: Annotated[float, typer.Option(help="VAR's sink threshold tau (paper: 20)")] = 20.0,
    vhd_images: Annotated[int, typer.Option(help="images for the per-head VHD heat map (0 = none)")] = 4,
) -> None:
    """POPE accuracy / precision / recall / F1 / yes-ratio per split and intervention, resumable."""
    from headlab.reports.output import fmt
    from headlab.reports.pope import parse_conditions, pope_report

    conditions = parse_conditions(interventions)
    with _report_progress("question") as progress:
        result = pope_report(
            out,
            model=model,
            data=data or (),
            images=images,
            conditions=conditions,
            n=n,
            max_new_tokens=max_new_tokens,
            var_tau=var_tau,
            vhd_images=vhd_images,
            progress=progress,
        )
    _answered(result.run, out)
    for name, split in result.report["splits"].items():
        accs = ", ".join(f"{c} {fmt(m['accuracy'])}" for c, m in split["metrics"].items())
        bad = len(split["malformed_lines"]) + len(split["missing_images"])
        console.print(f"  {name}: accuracy {accs}" + (f" ({bad} skipped: see the report)" if bad else ""))
    _report_done(result.html, result.report["outcome"])


@report_app.command("mme", epilog=_REPORT_EXIT)
@_friendly
def report_mme(
    out: Annotated[Path, typer.Option(help="report folder (answers.jsonl, results/, report.json/.md/.html)")],
    model: Annotated[str | None, typer.Option(help=_REPORT_MODEL)] = None,
    data: Annotated[
        list[Path] | None,
        typer.Option(
            help="MME question file <subtask>.txt (repeat per subtask; default: synthetic in OUT/data)"
        ),
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="image folder (default: an images/ folder beside each file)")
    ] = None,
    interventions: Annotated[str, typer.Option(help="conditions: a subset of none,vhr,var")] = "none,vhr,var",
    n: Annotated[int | None, typer.Option(help="first N images per subtask (default: all)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens generated per answer")] = 4,
    var_tau: Annotated[float, typer.Option(help="VAR's sink threshold tau (paper: 20)")] = 20.0,
) -> None:
    """MME hallucination subset: acc / acc+ / score per subtask and intervention, resumable."""
    from headlab.reports.lvlm import mme_report
    from headlab.reports.output import fmt
    from headlab.reports.pope import parse_conditions

    conditions = parse_conditions(interventions)
    with _report_progress("question") as progress:
        result = mme_report(
            out,
            model=model,
            data=data or (),
            images=images,
            conditions=conditions,
            n=n,
            max_new_tokens=max_new_tokens,
            var_tau=var_tau,
            progress=progress,
        )
    _answered(result.run, out)
    for name, sub in result.report["subtasks"].items():
        scores = ", ".join(f"{c} {fmt(m['score'], '.1f')}" for c, m in sub["metrics"].items())
        bad = len(sub["malformed_lines"]) + len(sub["missing_images"])
        console.print(f"  {name}: score {scores}" + (f" ({bad} skipped: see the report)" if bad else ""))
    _report_done(result.html, result.report["outcome"])


@report_app.command("sinks", epilog=_REPORT_EXIT)
@_friendly
def report_sinks(
    out: Annotated[Path, typer.Option(help="report folder (store/, report.json/.md/.html)")],
    model: Annotated[str, typer.Option(help="local model directory, hub id or zoo:NAME")] = "zoo:lm",
    data: Annotated[
        Path | None,
        typer.Option(help="prompts (JSON Lines; default: synthetic induction, IOI and multi-doc QA)"),
    ] = None,
    n: Annotated[
        int | None, typer.Option(help="prompts per synthetic task (default 8), or the first N of --data")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="prompts per forward pass")] = 8,
) -> None:
    """Attention sinks: per-head alpha_0, Sink metric, hidden sinks, massive activations; resumable."""
    from headlab.reports.lm import sinks_report

    with _report_progress("ex") as progress:
        result = sinks_report(out, model=model, data=data, n=n, batch_size=batch_size, progress=progress)
    run, rep = result.run, result.report
    m = rep["sink_metric"]
    console.print(f"{run.done} captured, {run.skipped} already in {out / 'store'}, {len(run.failed)} failed")
    console.print(
        f"  Sink metric {m['percent']:.2f}% (eps {m['epsilon']}), {len(rep['sink_heads'])} sink heads, "
        f"{rep['hidden_sinks']['n_hits']} hidden-sink hits, "
        f"{rep['massive_activations']['n']} massive activations"
    )
    _report_done(result.html, rep["outcome"])


@report_app.command("position-bias")
@_friendly
def report_position_bias(
    out: Annotated[Path, typer.Option(help="report folder (position_cache.json, report.json/.md/.html)")],
    model: Annotated[str, typer.Option(help="local model directory, hub id or zoo:NAME")] = "zoo:lm",
    n: Annotated[int, typer.Option(help="examples per gold position and judge examples")] = 50,
    k: Annotated[int, typer.Option(help="documents per multi-document QA prompt")] = 4,
    seed: Annotated[int, typer.Option(help="seed of the synthetic tasks")] = 10_000,
) -> None:
    """Position bias plain vs PINE: lost-in-the-middle curve and pairwise-judge flip rate; cached."""
    from headlab.reports.lm import position_report

    with _report_progress("part") as progress:
        result = position_report(out, model=model, n=n, k=k, seed=seed, progress=progress)
    rep = result.report
    console.print(f"{result.run.computed} parts computed, {result.run.cached} from the cache")
    if rep["pine_unavailable"]:
        console.print(f"  PINE unavailable: {rep['pine_unavailable']}")
    for method, j in rep["judge"].items():
        curve = ", ".join(f"{r['accuracy']:.2f}" for r in rep["lost_in_the_middle"][method])
        console.print(
            f"  {method}: accuracy by gold position [{curve}]; judge flip rate {j['flip_rate']:.3f}, "
            f"accuracy {j['accuracy']:.3f}"
        )
    console.print(f"report: {result.html}")


@report_app.command("amber", epilog=_REPORT_EXIT)
@_friendly
def report_amber(
    out: Annotated[Path, typer.Option(help="report folder (answers.jsonl, report.json/.md/.html)")],
    model: Annotated[str | None, typer.Option(help=_REPORT_MODEL)] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="AMBER data folder: annotations.json, relation.json, safe_words.txt, query/query_*.json "
            "(default: synthetic in OUT/data)"
        ),
    ] = None,
    images: Annotated[Path | None, typer.Option(help="image folder (default: DATA/image)")] = None,
    interventions: Annotated[str, typer.Option(help="conditions: a subset of none,vhr,var")] = "none,vhr,var",
    n: Annotated[int | None, typer.Option(help="first N queries of each kind (default: all)")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per yes/no answer")] = 4,
    gen_tokens: Annotated[int, typer.Option(help="greedy tokens per description")] = 16,
    var_tau: Annotated[float, typer.Option(help="VAR's sink threshold tau (paper: 20)")] = 20.0,
) -> None:
    """AMBER: CHAIR / Cover / Hal / Cog, discriminative accuracy / F1 and the AMBER score, resumable."""
    from headlab.reports.amber import amber_report
    from headlab.reports.output import fmt
    from headlab.reports.pope import parse_conditions

    conditions = parse_conditions(interventions)
    with _report_progress("question") as progress:
        result = amber_report(
            out,
            model=model,
            data=data,
            images=images,
            conditions=conditions,
            n=n,
            max_new_tokens=max_new_tokens,
            gen_tokens=gen_tokens,
            var_tau=var_tau,
            progress=progress,
        )
    _answered(result.run, out)
    for c, m in result.report["metrics"].items():
        console.print(
            f"  {c}: CHAIR {fmt(m['chair'])}, Cover {fmt(m['cover'])}, Hal {fmt(m['hal'])}, Cog {fmt(m['cog'])}"
            f", AMBER score {fmt(m['amber_score'])}"
        )
    bad = sum(len(p) for p in result.report["problems"].values())
    if bad:
        console.print(f"  {bad} problems: see the report")
    _report_done(result.html, result.report["outcome"])


@report_app.command("chair", epilog=_REPORT_EXIT)
@_friendly
def report_chair(
    out: Annotated[Path, typer.Option(help="report folder (answers.jsonl, report.json/.md/.html)")],
    model: Annotated[str | None, typer.Option(help=_REPORT_MODEL)] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="CHAIR folder: synonyms.txt, truth.json, images.json (default: synthetic in OUT/data)"
        ),
    ] = None,
    images: Annotated[Path | None, typer.Option(help="image folder (default: DATA/images)")] = None,
    interventions: Annotated[str, typer.Option(help="conditions: a subset of none,vhr,var")] = "none,vhr,var",
    n: Annotated[int | None, typer.Option(help="first N images (default: all)")] = None,
    gen_tokens: Annotated[int, typer.Option(help="greedy tokens per description")] = 16,
    var_tau: Annotated[float, typer.Option(help="VAR's sink threshold tau (paper: 20)")] = 20.0,
) -> None:
    """CHAIR on generated descriptions: CHAIR_s, CHAIR_i, recall, length per condition, resumable."""
    from headlab.reports.chair import chair_report
    from headlab.reports.output import fmt
    from headlab.reports.pope import parse_conditions

    conditions = parse_conditions(interventions)
    with _report_progress("question") as progress:
        result = chair_report(
            out,
            model=model,
            data=data,
            images=images,
            conditions=conditions,
            n=n,
            gen_tokens=gen_tokens,
            var_tau=var_tau,
            progress=progress,
        )
    _answered(result.run, out)
    for c, m in result.report["metrics"].items():
        console.print(
            f"  {c}: CHAIR_s {fmt(m['chair_s'])}, CHAIR_i {fmt(m['chair_i'])}, recall {fmt(m['recall'])}"
        )
    _report_done(result.html, result.report["outcome"])


_DEMO_PROMPTS = {
    "lm": [
        "When Mary and John went to the store, John gave a drink to",
        "w3 w41 w7 w12 w60 w3 w41 w7",
    ],
    "llava": [
        "USER: <image>\nIs there an apple in the image? ASSISTANT:",
        "USER: <image>\nIs there a car in the image? ASSISTANT:",
    ],
}


@app.command()
@_friendly
def demo(
    out: Annotated[Path, typer.Option(help="where to write the demo outputs")] = Path("out/demo"),
) -> None:
    """The offline end-to-end path: the zoo's LM and LLaVA -> fused capture of every head -> store -> tables."""
    import headlab as hl
    from headlab.datasets import scenes
    from headlab.datasets.prompts import read_prompts
    from headlab.store.batch import capture_to_store

    out.mkdir(parents=True, exist_ok=True)
    for name, prompts in _DEMO_PROMPTS.items():
        lm = hl.load(f"zoo:{name}")
        lines = []
        for i, (prompt, scene) in enumerate(zip(prompts, scenes.make_scenes(len(prompts)), strict=True)):
            line = {"id": i, "prompt": prompt}
            if lm.family is hl.Family.LVLM:
                scenes.render(scene).save(out / scene.filename)
                line["image"] = scene.filename
            lines.append(json.dumps(line))
        data = out / f"{name}_prompts.jsonl"
        data.write_text("\n".join(lines) + "\n")
        store = hl.Store.create(out / f"{name}_store", lm, exist_ok=True)
        items = read_prompts(data, need_images=lm.family is hl.Family.LVLM).items
        report = capture_to_store(lm, store, items, batch_size=2, attention_layers=None, progress=False)
        frame = store.head_stats()
        console.print(_summary(frame, f"{name}: per-head statistics of every head, read back from the store"))
        pattern = store.pattern(0, layer=lm.n_layers - 1, head=0, queries=[-1])[0]
        console.print(
            f"{name}: last-token attention of layer {lm.n_layers - 1} head 0 rebuilt exactly from the "
            f"store: top keys {np.argsort(-pattern)[:5].tolist()}, row sum {pattern.sum():.4f}; "
            f"{report.done} captured, {report.skipped} already there; verify: "
            f"{'OK' if store.verify().ok else 'PROBLEMS'}"
        )
        _write(frame, out / f"{name}_head_stats.csv")
    console.print(f"[bold]demo done[/]: the zoo's LM and LLaVA captured into stores under {out.resolve()}")


if __name__ == "__main__":
    app()
