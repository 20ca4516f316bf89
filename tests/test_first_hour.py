"""What a new user meets in the first hour: help text, re-runs, check, evaluate, predict."""

from __future__ import annotations

import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from embedstore_cli.app import _progress_text, cli

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "fashion-mnist-sample"


def _commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


def test_every_option_of_every_command_has_help_and_a_real_metavar():
    missing, vague = [], []
    for name, command in _commands(cli):
        ctx = click.Context(command, info_name=name)
        for param in command.get_params(ctx):  # as --help sees them: head options included
            if not isinstance(param, click.Option) or param.hidden:  # deprecated aliases
                continue
            flags, text = param.get_help_record(ctx)
            if not param.help:
                missing.append(f"{name} {flags}")
            if "VALUE" in flags:
                vague.append(f"{name} {flags}")
    assert not missing and not vague, (missing, vague)
    ctx = click.Context(cli.commands["train"], info_name="train")
    shown = {p.opts[0]: p.get_help_record(ctx)[0] for p in cli.commands["train"].get_params(ctx)
             if isinstance(p, click.Option)}
    assert shown["--epochs"] == "--epochs INTEGER" and shown["--C"] == "--C FLOAT|auto"


def test_the_progress_line_names_elapsed_time_and_the_eta():
    from embedstore.engines import JobState

    state = JobState(done=50, total=150, embedded=50)
    state.started -= 10  # 10 s in, 50 of 150 done: 20 s to go
    text = _progress_text(state)
    assert text.startswith("0:10 elapsed, ETA 0:20, ") and text.endswith("0 failed")


def test_an_unchanged_rerun_does_not_load_the_model(small_tree, tmp_path):
    store = str(tmp_path / "s.h5")
    runner = CliRunner()
    first = runner.invoke(cli, ["extract", str(small_tree), store])
    assert first.exit_code == 0, first.output
    assert "loading mobilenet_v2" in first.stderr
    again = runner.invoke(cli, ["extract", str(small_tree), store])
    assert again.exit_code == 0, again.output
    assert "loading" not in again.stderr
    assert "nothing new: 12 images, 0 reused, 12 unchanged" in again.stderr
    assert "not loaded" in again.stderr
    shutil.copy(next((SAMPLE / "Coat").glob("*.png")), small_tree / "Bag" / "new.png")
    third = runner.invoke(cli, ["extract", str(small_tree), store, "--json"])
    assert third.exit_code == 0, third.output
    assert "loading mobilenet_v2" in third.stderr  # the first new image loads it
    assert '"embedded": 1' in third.stdout and '"unchanged": 12' in third.stdout


def test_backbone_check_gives_a_verdict_and_fails_on_a_file_that_is_no_image(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["backbone", "check"])
    assert result.exit_code == 0, result.output
    assert "PASS: " in result.stdout and "china.jpg is 'palace'" in result.stdout
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = runner.invoke(cli, ["backbone", "check", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"embedstore: error: {bad}: not an image (unrecognised format)"]
    assert "no verdict" in result.stdout


@pytest.fixture(scope="module")
def sample_head(tmp_path_factory):
    """The 10-class bundled sample, extracted and a logreg head trained on it."""
    work = tmp_path_factory.mktemp("first-hour")
    runner = CliRunner()
    store, head = work / "sample.h5", work / "head"
    assert runner.invoke(cli, ["extract", str(SAMPLE), str(store), "-q"]).exit_code == 0
    assert runner.invoke(cli, ["train", str(store), str(head)]).exit_code == 0
    return head


def test_evaluate_says_top_5(sample_head):
    result = CliRunner().invoke(cli, ["evaluate", str(sample_head), "--no-plots"])
    assert result.exit_code == 0, result.output
    assert "top-5 accuracy " in result.stdout and "top5" not in result.stdout


def test_predict_says_when_top_k_is_cut_to_the_classes(sample_head):
    image = str(next((SAMPLE / "Bag").glob("*.png")))
    result = CliRunner().invoke(cli, ["predict", str(sample_head), image, "--top-k", "20"])
    assert result.exit_code == 0, result.output
    assert "--top-k 20: the head has only 10 classes, so 10 are listed" in result.stderr
    result = CliRunner().invoke(cli, ["predict", str(sample_head), image, "--top-k", "10"])
    assert "--top-k" not in result.stderr
