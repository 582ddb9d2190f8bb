"""The bad-option corpus: analysis options, the commands `analyze`, `dash`, `info`, `zoo random`, `zoo train`,
`act search`, unreadable checkpoints and read-only stores. Each case is one bad input and what must happen.

The rules under test (headlab.analyses.registry, headlab.loading, the CLI):
- an analysis option is parsed, type- and range-checked and filled in once, before any work (the corpus
  replaces every analysis' computation with one that fails the test if it runs); a bad one is a
  SelectionError naming the analysis, the option, the value and what the option takes;
- a result is computed only if the store's results folder can be written;
- `headlab analyze` exits 0 (result saved), 1 (saved but empty, or --csv not written), 2 (nothing saved,
  one `headlab:` line and no traceback);
- a checkpoint that cannot be loaded as it is meant is a ModelLoadError naming the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import headlab as hl
from headlab.analyses import registry
from headlab.cli import app
from headlab.datasets import synthetic
from headlab.errors import ModelLoadError, SelectionError, StoreError
from headlab.zoo.random_models import build_random

runner = CliRunner()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A small store of the zoo LM: 4 induction prompts, default statistics and compact attention."""
    lm = hl.load("zoo:lm")
    lm.tokenizer.padding_side = "right"
    prompts = [e.prompt for e in synthetic.induction(4, seed=3)]
    inputs = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    store = hl.Store.create(tmp_path_factory.mktemp("options") / "store", lm)
    with torch.no_grad(), hl.capture(lm, stats=hl.Stats(), compact=hl.Select()) as rec:
        lm.model(**inputs)
    store.append(rec, examples=list(range(4)))
    return store.root


@pytest.fixture
def no_work(monkeypatch):
    """Every registered analysis' computation replaced by one that fails the test if it is reached."""

    def must_not_run(store, options):
        raise AssertionError(f"the analysis ran with {options}: the option should have been refused first")

    for name, entry in registry.registered().items():
        monkeypatch.setitem(registry.ANALYSES, name, dataclasses.replace(entry, run=must_not_run))


def _one_line(result, *fragments: str) -> str:
    """Exit code 2, no traceback, exactly one `headlab:` line (to its end), holding every fragment."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)
    assert result.output.count("headlab:") == 1, result.output  # (a progress bar may precede it)
    line = result.output[result.output.index("headlab:") :].splitlines()[0]
    for fragment in fragments:
        assert fragment in line, line
    return line


# ------------------------------------------------------------------------------------- analysis options

# (id, analysis, options as command-line text, fragment of the one-line error)
# fmt: off
OPTION_CASES = [
    ("non-numeric", "sinks", {"epsilon": "abc"}, "option epsilon=abc is not a number; epsilon takes a number in (0, 1]"),
    ("nan", "sinks", {"epsilon": "NaN"}, "epsilon=NaN is not a finite number"),
    ("inf", "massive-activations", {"threshold": "inf"}, "threshold=inf is not a finite number"),
    ("negative", "sinks", {"epsilon": "-1"}, "epsilon=-1 is out of range"),
    ("zero-epsilon", "sinks", {"epsilon": "0"}, "takes a number in (0, 1] (default 0.3)"),
    ("above-one", "hidden-sinks", {"tau": "1.5"}, "tau=1.5 is out of range"),
    ("relative-threshold-zero", "hidden-sinks", {"c": "0"}, "c takes a number > 0 or none"),
    ("negative-ratio", "massive-activations", {"ratio": "-5"}, "ratio takes a number >= 0"),
    ("zero-clusters", "atlas", {"clusters": "0"}, "clusters=0 is out of range; clusters takes an integer >= 1"),
    ("fractional-count", "atlas", {"clusters": "2.5"}, "clusters=2.5 is not an integer"),
    ("negative-seed", "atlas", {"seed": "-1"}, "seed takes an integer >= 0"),
    ("zero-count", "importance-gradient", {"n": "0"}, "option n=0 is out of range"),
    ("zero-batch-size", "importance-ablation", {"batch_size": "0"}, "batch_size takes an integer >= 1"),
    ("zero-steps", "sae-circuit", {"steps": "0"}, "steps takes an integer >= 1"),
    ("one-code", "sae-circuit", {"codes": "1"}, "codes takes an integer >= 2"),
    ("zero-patch-size", "vit-distance", {"patch_size": "0"}, "patch_size takes an integer >= 1 or none"),
    ("negative-radius", "vit-partial-pruning", {"radius": "-1"}, "radius takes a number >= 0"),
    ("threshold-above-one", "circuit-overlap", {"threshold": "2"}, "threshold takes a number in [0, 1]"),
    ("bool-maybe", "slot-profile", {"per_token": "maybe"}, "per_token=maybe is not true or false"),
    ("bool-number", "importance-gradient", {"normalize": "2"}, "normalize=2 is not true or false"),
    ("unknown-choice", "slot-profile", {"stat": "max"}, "stat=max is not one of the choices; stat takes one of mass_last, mass"),
    ("unknown-task", "importance-gradient", {"task": "sudoku"}, "task=sudoku is not one of the choices"),
    ("task-without-negatives", "sae-circuit", {"task": "multi_doc_qa"}, "task=multi_doc_qa is not one of"),
    ("unknown-kind", "importance-ablation", {"kind": "noise"}, "takes one of zero, mean, resample"),
    ("unknown-method", "circuit-overlap", {"method": "gradient"}, "method=gradient is not one of the choices"),
    ("unknown-direction-in-list", "activation-patching", {"directions": "denoising,sideways"}, "is not a list of the choices"),
    ("empty-list", "attribution-patching", {"positions": ""}, "positions='' is not a list of the choices"),
    ("list-for-a-single-choice", "path-patching", {"positions": "all,last"}, "positions takes one of all, last"),
    ("unknown-component", "path-patching", {"components": "q,x"}, "a comma-separated list of q, k, v, qkv"),
    ("unknown-option", "sinks", {"eps": "0.3"}, "analysis 'sinks' has no option eps; it takes epsilon, tower"),
    ("unknown-analysis", "sink", {}, "no analysis named 'sink'"),
    ("tower-not-in-store", "sinks", {"tower": "vision"}, "option tower=vision is not a tower in"),
    ("condition-not-in-store", "vhd", {"with_condition": "vhr"}, "with_condition=vhr is not a condition in"),
    ("result-not-in-store", "atlas", {"induction": "induction-scores"}, "induction=induction-scores is not a result in"),
    ("markup-in-a-value", "sinks", {"tower": "[/x]"}, "option tower=[/x] is not a tower in"),
]
# fmt: on

# the CLI prints messages through rich; "[/x]" must come out as text, not be read as markup
CLI_OPTION_CASES = [pytest.param(*c[1:], id=c[0]) for c in OPTION_CASES]


@pytest.mark.parametrize(("analysis", "options", "fragment"), CLI_OPTION_CASES)
def test_bad_option_on_the_command_line(analysis, options, fragment, store_dir, no_work):
    args = ["analyze", analysis, str(store_dir)] + [a for k, v in options.items() for a in ("-o", f"{k}={v}")]
    _one_line(runner.invoke(app, args), fragment)
    assert hl.Store.open(store_dir).results() == []


@pytest.mark.parametrize(
    ("analysis", "options", "fragment"), [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES]
)
def test_bad_option_in_python(analysis, options, fragment, store_dir, no_work):
    with pytest.raises(SelectionError) as err:
        hl.analyses.run_analysis(analysis, hl.Store.open(store_dir), **options)
    assert fragment in str(err.value)


# Python values reach the same rules (id, analysis, options, fragment)
# fmt: off
PYTHON_CASES = [
    ("nan-float", "sinks", {"epsilon": math.nan}, "epsilon=nan is not a finite number"),
    ("bool-for-an-int", "atlas", {"clusters": True}, "clusters=true is not an integer"),
    ("float-for-an-int", "atlas", {"clusters": 2.0}, "clusters=2.0 is not an integer"),
    ("int-for-a-bool", "slot-profile", {"per_token": 1}, "per_token=1 is not true or false"),
    ("none-for-a-required", "sinks", {"epsilon": None}, "epsilon=none is required"),
    ("number-for-text", "vhd", {"with_condition": 3}, "with_condition=3 is not text"),
    ("list-with-an-unknown", "activation-patching", {"directions": ["noising", "up"]}, "is not a list of"),
]
# fmt: on


@pytest.mark.parametrize(
    ("analysis", "options", "fragment"), [c[1:] for c in PYTHON_CASES], ids=[c[0] for c in PYTHON_CASES]
)
def test_bad_python_value(analysis, options, fragment, store_dir, no_work):
    with pytest.raises(SelectionError) as err:
        hl.analyses.run_analysis(analysis, hl.Store.open(store_dir), **options)
    assert fragment in str(err.value)


@pytest.mark.parametrize("name", sorted(registry.registered()))
def test_every_declared_option_is_typed_and_listed(name):
    entry = registry.registered()[name]
    typed = entry.parse({key: registry.as_text(option.default) for key, option in entry.options.items()})
    assert typed == entry.parse({})  # each default, written as command-line text, parses back to itself
    listed = runner.invoke(app, ["analyze", "list"]).output
    for key, option in entry.options.items():
        assert f"    {key}: {option.describe()}, default {registry.as_text(option.default)}." in listed


# ------------------------------------------------------------------------------------ command arguments


def _afile(tmp: Path) -> Path:
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _busy_port(stack: contextlib.ExitStack) -> str:
    return str(stack.enter_context(socket.create_server(("127.0.0.1", 0))).getsockname()[1])


def _act(tmp: Path, *extra: str) -> list[str]:
    return ["act", "search", "--model", "zoo:lm", "--task", "ioi", "--out", str(tmp / "a.csv"), *extra]


# (id, argv from (tmp_path, store dir, exit stack), fragment): exit 2 and one `headlab:` line holding the
# fragment; "Invalid value" is typer's own range check (its usage box, also exit 2, no traceback)
# fmt: off
COMMAND_CASES: list[tuple[str, Callable, str]] = [
    ("analyze-csv-onto-a-folder", lambda t, s, _: ["analyze", "sinks", s, "--csv", str(t)], "is a folder"),
    ("analyze-csv-under-a-file", lambda t, s, _: ["analyze", "sinks", s, "--csv", f"{_afile(t)}/x.csv"], "is a file, not a folder"),
    ("analyze-option-without-equals", lambda t, s, _: ["analyze", "sinks", s, "-o", "epsilon"], "--option expects KEY=VALUE"),
    ("analyze-option-twice", lambda t, s, _: ["analyze", "sinks", s, "-o", "epsilon=0.2", "-o", "epsilon=0.4"], "is given twice"),
    ("analyze-without-a-store", lambda t, s, _: ["analyze", "sinks"], "needs the store directory"),
    ("analyze-not-a-store", lambda t, s, _: ["analyze", "sinks", str(t)], "is not a headlab store"),
    ("zoo-random-out-is-a-file", lambda t, s, _: ["zoo", "random", "gpt2", str(_afile(t))], "is a file, not a folder"),
    ("zoo-random-out-under-a-file", lambda t, s, _: ["zoo", "random", "gpt2", f"{_afile(t)}/m"], "is a file, not a folder"),
    ("zoo-random-negative-seed", lambda t, s, _: ["zoo", "random", "gpt2", str(t / "m"), "--seed", "-1"], "Invalid value"),
    ("zoo-train-out-is-a-file", lambda t, s, _: ["zoo", "train", "lm", "--out", str(_afile(t))], "is a file, not a folder"),
    ("zoo-train-zero-steps", lambda t, s, _: ["zoo", "train", "lm", "--out", str(t / "m"), "--steps", "0"], "Invalid value"),
    ("act-zero-examples", lambda t, s, _: _act(t, "--n", "0"), "need at least one ioi example, got n=0"),
    ("act-zero-batch-size", lambda t, s, _: _act(t, "--batch-size", "0"), "Invalid value"),
    ("act-negative-eval-n", lambda t, s, _: _act(t, "--eval-n", "-1"), "Invalid value"),
    ("act-nan-tau", lambda t, s, _: _act(t, "--tau", "nan"), "ACT tau must be >= 0"),
    ("act-beta-above-one", lambda t, s, _: _act(t, "--beta", "2"), "ACT beta must lie in [0, 1]"),
    ("act-out-without-suffix", lambda t, s, _: [*_act(t), "--out", str(t)], "must end in .csv or .json"),
    ("act-out-is-a-folder", lambda t, s, _: (t / "x.csv").mkdir() or [*_act(t), "--out", str(t / "x.csv")], "is a folder"),
    ("act-bad-layers", lambda t, s, _: _act(t, "--n", "2", "--layers", "a,b"), "--layers takes"),
    ("dash-port-zero", lambda t, s, _: ["dash", s, "--port", "0"], "Invalid value"),
    ("dash-port-in-use", lambda t, s, stack: ["dash", s, "--no-model", "--port", _busy_port(stack)], "cannot serve on 127.0.0.1"),
    ("dash-not-a-store", lambda t, s, _: ["dash", str(t), "--no-model"], "is not a headlab store"),
]
# fmt: on


@pytest.mark.parametrize(
    ("argv", "fragment"), [c[1:] for c in COMMAND_CASES], ids=[c[0] for c in COMMAND_CASES]
)
def test_bad_command_argument(argv, fragment, tmp_path, store_dir, no_work):
    with contextlib.ExitStack() as stack:
        result = runner.invoke(app, argv(tmp_path, str(store_dir), stack))
    if fragment == "Invalid value":
        assert result.exit_code == 2 and "Traceback" not in result.output and fragment in result.output
    else:
        _one_line(result, fragment)
    assert not (tmp_path / "m").exists() and not (tmp_path / "a.csv").exists()  # nothing was written


def test_analyze_exit_codes_say_what_was_done(store_dir, tmp_path):
    store = shutil.copytree(store_dir, tmp_path / "store")
    csv = tmp_path / "new" / "folder" / "sinks.csv"  # a missing folder is made, as for every output file
    done = runner.invoke(app, ["analyze", "sinks", str(store), "-o", "epsilon=0.2", "--csv", str(csv)])
    assert done.exit_code == 0, done.output
    assert csv.is_file()
    assert hl.Store.open(store).result_params("sinks") == {"epsilon": 0.2, "tower": None}
    empty = runner.invoke(app, ["analyze", "hidden-sinks", str(store), "-o", "tau=1"])
    assert empty.exit_code == 1 and "has no rows" in empty.output  # saved, but nothing passed
    assert len(hl.Store.open(store).result("hidden-sinks")) == 0


# ----------------------------------------------------------------------------------- read-only stores


def _read_only(results: Path, monkeypatch) -> None:
    """results/ made read-only; where chmod does not stop this process (root), the writability probe is
    made to fail as the kernel would for anyone else (registry.probe_write is the documented hook)."""
    results.mkdir(exist_ok=True)
    results.chmod(0o500)
    try:
        (results / ".probe").write_text("x")
    except PermissionError:
        return
    (results / ".probe").unlink()

    def denied(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(registry, "probe_write", denied)


# fmt: off
STORE_CASES = [
    ("results-folder-read-only", _read_only, "cannot save results in"),
    ("results-is-a-file", lambda results, _: results.write_text("x"), "is a file, not the store's results folder"),
]
# fmt: on


@pytest.mark.parametrize(("spoil", "fragment"), [c[1:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES])
def test_unwritable_store_fails_before_computing(spoil, fragment, store_dir, tmp_path, monkeypatch, no_work):
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy)
    shutil.rmtree(copy / "results", ignore_errors=True)
    spoil(copy / "results", monkeypatch)
    try:
        _one_line(runner.invoke(app, ["analyze", "sinks", str(copy)]), fragment)  # no_work: not computed
        with pytest.raises(StoreError, match=fragment):
            hl.analyses.run_analysis("sinks", hl.Store.open(copy))
    finally:
        if (copy / "results").is_dir():
            (copy / "results").chmod(0o700)


# --------------------------------------------------------------------------------- unreadable checkpoints


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return build_random("gpt2", tmp_path_factory.mktemp("ckpt") / "gpt2")


def _config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | changes))

    return edit


def _cut(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


# (id, how the checkpoint folder is spoiled (a Path returned: load that instead), fragments of the one-line
# error, "{dir}" standing for the folder)
# fmt: off
CHECKPOINT_CASES = [
    ("truncated-safetensors", _cut, ("{dir}/model.safetensors is unreadable", "truncated or corrupt")),
    ("garbage-safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), ("{dir}/model.safetensors is unreadable",)),
    ("corrupt-config-json", lambda d: (d / "config.json").write_text("{not json"), ("{dir}/config.json is not a usable model config",)),
    ("config-without-model-type", lambda d: (d / "config.json").write_text("{}"), ("{dir}/config.json is not a usable model config",)),
    ("config-field-of-the-wrong-type", _config(n_head="two"), ("{dir}/config.json is not a usable model config",)),
    ("missing-weights", lambda d: (d / "model.safetensors").unlink(), ("{dir} holds no weights file",)),
    ("weights-of-another-shape", _config(n_embd=128), ("do not fit the shapes in its config.json", "[192] in the file, [384] by the config")),
    ("weights-lacking-a-layer", _config(n_layer=3), ("lack 12 tensors its config.json needs", "transformer.h.2")),
    ("config-that-builds-no-model", _config(n_head=3), ("could not load the model in {dir}", "divisible")),
    ("corrupt-tokenizer", lambda d: (d / "tokenizer.json").write_text("{bad"), ("tokenizer.json", "in {dir}")),
    ("a-file-not-a-folder", lambda d: d / "config.json", ("{dir}/config.json is a file; pass the model directory",)),
]
# fmt: on


@pytest.mark.parametrize(
    ("spoil", "fragments"), [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_unreadable_checkpoint(spoil, fragments, gpt2_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    spoiled = spoil(folder)
    target = spoiled if isinstance(spoiled, Path) else folder
    wanted = [f.format(dir=folder) for f in fragments]
    _one_line(runner.invoke(app, ["info", str(target)]), *wanted)
    with pytest.raises(ModelLoadError) as err:
        hl.load(target)
    assert all(f in str(err.value) for f in wanted)


def test_a_missing_output_head_loads_with_a_warning(gpt2_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(gpt2_dir, folder)
    _config(tie_word_embeddings=False)(folder)  # lm_head is then its own tensor, absent from the file
    with pytest.warns(UserWarning, match=r"no weights for the output head \(lm_head.weight\)"):
        lm = hl.load(folder)
    assert lm.n_layers == 2
