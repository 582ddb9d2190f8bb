"""The `headlab` command line: help, info, stats, zoo random, and errors as one clear line."""

from __future__ import annotations

import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from headlab.cli import app

runner = CliRunner()


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("info", "check", "stats", "demo", "zoo"):
        assert command in result.output


def test_info(model_dirs):
    result = runner.invoke(app, ["info", model_dirs["llava"]])
    assert result.exit_code == 0, result.output
    assert "vision" in result.output and "4x4" in result.output and "input_ids ==" in result.output


def test_stats_writes_a_tidy_table(model_dirs, tmp_path):
    out = tmp_path / "stats.parquet"
    result = runner.invoke(
        app, ["stats", model_dirs["gpt2"], "--prompt", "a b c d", "--prompt", "e f", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(out)
    assert set(frame.columns) == {"example", "tower", "step", "layer", "head", "stat", "role", "value"}
    assert set(frame.example) == {0, 1}


def test_stats_on_a_vit_with_an_image(model_dirs, tmp_path):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), (0, 200, 0)).save(image)
    result = runner.invoke(app, ["stats", model_dirs["vit"], "--prompt", "", "--image", str(image)])
    assert result.exit_code == 0, result.output
    assert "vision" in result.output


def test_errors_are_one_clear_line(tmp_path):
    result = runner.invoke(app, ["info", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert "headlab:" in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_missing_image_is_a_clear_error(model_dirs, tmp_path):
    result = runner.invoke(
        app, ["stats", model_dirs["vit"], "--prompt", "", "--image", str(tmp_path / "no.png")]
    )
    assert result.exit_code == 2 and "does not exist" in result.output


def test_zoo_random_builds_a_loadable_model(tmp_path):
    result = runner.invoke(app, ["zoo", "random", "qwen2", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["info", str(tmp_path / "q")]).exit_code == 0


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    first = runner.invoke(app, ["demo", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "2 captured" in first.output and "verify: OK" in first.output and "row sum 1.0000" in first.output
    assert (out / "lm_head_stats.csv").is_file() and (out / "llava_store" / "manifest.json").is_file()
    again = runner.invoke(app, ["demo", "--out", str(out)])
    assert "0 captured, 2 already there" in again.output


def test_zoo_random_builds_any_causal_lm_type_and_refuses_others(tmp_path):
    result = runner.invoke(app, ["zoo", "random", "phi3", str(tmp_path / "phi3")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "phi3" / "config.json").is_file()
    for name, says in (
        ("t5", "could not build a tiny random 't5' as a causal LM"),
        ("nonsense", "no random"),
    ):
        refused = runner.invoke(app, ["zoo", "random", name, str(tmp_path / name)])
        assert refused.exit_code == 2 and says in refused.output and "Traceback" not in refused.output


def test_check_passes_on_a_model_the_interface_serves(tmp_path):
    assert runner.invoke(app, ["zoo", "random", "qwen3", str(tmp_path / "q")]).exit_code == 0
    result = runner.invoke(app, ["check", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "route: AttentionInterface, 2 of 2 lm attention layers" in result.output
    assert "logits unchanged by capture: yes" in result.output and "verdict: headlab serves" in result.output


def test_check_on_a_vision_model_uses_a_blank_image(model_dirs):
    result = runner.invoke(app, ["check", model_dirs["vit"]])
    assert result.exit_code == 0, result.output
    assert "2 of 2 vision attention layers" in result.output


def test_check_refuses_an_eager_only_model_with_exit_code_2(tmp_path):
    assert runner.invoke(app, ["zoo", "random", "bloom", str(tmp_path / "b")]).exit_code == 0
    result = runner.invoke(app, ["check", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "route: refused" in result.output and "never calls AttentionInterface" in result.output


def test_check_says_when_headlab_differs_from_the_model(tmp_path, monkeypatch):
    """GPT-OSS's attention sinks, were headlab to overlook them, change the patterns: exit code 1."""
    from headlab.models import discovery

    assert runner.invoke(app, ["zoo", "random", "gpt_oss", str(tmp_path / "g")]).exit_code == 0
    monkeypatch.setattr(discovery, "unsupported_scores", lambda module: ())
    result = runner.invoke(app, ["check", str(tmp_path / "g")])
    assert result.exit_code == 1, result.output
    assert "logits unchanged by capture: no" in result.output and "DIFFERS" in result.output
