"""Command-line bad input: a clear error before any model loads, and no file of the user's replaced."""

from __future__ import annotations

import pytest

from mechvis import cli


@pytest.fixture
def no_model(monkeypatch):
    import mechvis.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load for bad input")

    monkeypatch.setattr(mechvis.models, "load_model", refuse)
    monkeypatch.setattr(mechvis, "load_model", refuse)


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "99999"], "--port must be in 0–65535"),
    (["serve", "--port", "-5"], "--port must be in 0–65535"),
    (["serve", "--port", "0", "--model-root", "/nonexistent/models"], "--model-root must name existing directories"),
    (["serve", "--port", "0", "--host", "nosuchhost.invalid"], "Cannot listen on nosuchhost.invalid"),
])
def test_serve_refuses_bad_addresses_before_loading(argv, message, no_model, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_named_existing_output_is_never_replaced_without_force(tmp_path, no_model, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes")
    assert cli.main(["demo", "-o", str(mine)]) == 2
    assert cli.main(["sweep-report", str(tmp_path), "-o", str(mine)]) == 2
    assert capsys.readouterr().err.count("already exists; pass --force") == 2
    assert mine.read_text() == "my notes"


@pytest.mark.parametrize("extra, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--temperature", "-1"], "--temperature must be a number ≥ 0"),
    (["--temperature", "nan"], "--temperature must be a number ≥ 0"),
    (["--seed", str(10**23)], "--seed must be an integer from −2**63 to 2**64 − 1"),
    (["--layers", "0", "99"], "--layers 99 is out of range: this model has layers 0..1"),
    (["--image", "/nonexistent/picture.png"], "Could not read the image"),
    (["--json", "SAME"], "name the same file"),
    (["-o", "DIR"], "is a directory"),
    (["-o", "MINE"], "already exists; pass --force"),
    (["-o", "UNDERFILE"], "is a file, not a directory"),
    (["--json", "UNDERFILE"], "is a file, not a directory"),
    (["-o", "/proc/mechvis-report.html"], "cannot be written: nothing can be made in /proc:"),  # found before loading
    (["--json", "/proc/sub/mechvis.json"], "cannot be written: nothing can be made in /proc (to hold /proc/sub)"),
    (["--layers", "1", "-1"], "--layers names layer 1 more than once"),
    (["-o", ""], "-o/--output is empty"),
    (["--max-new-tokens", "100000"], "does not fit this model's context of 4096 tokens"),
])
def test_report_refuses_bad_arguments_before_loading(extra, message, tmp_path, no_model, capsys):
    """`mechvis report` checks its arguments before any model loads (the model loader is replaced
    by one that fails the test; no timing assert: the machine is shared)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"num_hidden_layers": 2, "max_position_embeddings": 4096}')  # nothing to load
    (tmp_path / "mine.html").write_text("my report")
    replace = {"SAME": str(tmp_path / "out.html"), "DIR": str(tmp_path), "MINE": str(tmp_path / "mine.html"),
               "UNDERFILE": str(tmp_path / "mine.html" / "sub" / "out.html")}
    argv = ["report", "--model", str(model), "--prompt", "Hello", "-o", str(tmp_path / "out.html"), *extra]
    assert cli.main([replace.get(a, a) for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert (tmp_path / "mine.html").read_text() == "my report"


def test_a_failed_report_leaves_no_directories_behind(tmp_path, monkeypatch):
    """Missing directories of the outputs are made only when the report is written."""
    import mechvis.report as report

    def fail(*args, **kwargs):
        raise RuntimeError("the analysis failed")

    monkeypatch.setattr(report, "build_report_data", fail)
    with pytest.raises(RuntimeError, match="the analysis failed"):
        report.write_report(None, "Hello", tmp_path / "new" / "deeper" / "report.html", json_path=tmp_path / "other" / "r.json")
    assert sorted(path.name for path in tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["sweep", "data.jsonl", "--example", "-o", "out"], "--example builds its own dataset"),
    (["sweep", "--example", "--example-items", "0", "-o", "out"], "--example-items must be at least 1"),
    (["sweep", "data.jsonl", "--workers", "3", "-o", "out"], "--workers sets the number of Ray actors"),
])
def test_sweep_refuses_options_that_would_be_ignored(argv, message, tmp_path, monkeypatch, no_model, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text('{"id": 1, "prompt": "hello"}\n')
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_ends_with_one_line_and_the_resume_hint(monkeypatch, capsys):
    def interrupted(arguments):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sweep", interrupted)
    assert cli.main(["sweep", "data.jsonl", "-o", "out"]) == 130
    assert capsys.readouterr().err == ("mechvis: interrupted. Complete shards are kept: run the same command again "
                                       "to resume.\n")
    monkeypatch.setattr(cli, "_inspect", lambda arguments: interrupted(arguments))
    assert cli.main(["inspect"]) == 130
    assert capsys.readouterr().err == "mechvis: interrupted.\n"


def test_instruction_check_refuses_bad_input_before_loading(tmp_path, monkeypatch, no_model, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["instruction-check", "--keyword", "French"]
    assert cli.main([*base, "--prompts-file", "nothere.txt"]) == 2
    assert "--prompts-file nothere.txt cannot be read" in capsys.readouterr().err
    assert cli.main(base) == 2
    assert "at least one prompt" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "instruction-check.json").write_text("my table")
    assert cli.main([*base, "--prompt", "Answer in French.", "--out", str(mine)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (mine / "instruction-check.json").read_text() == "my table"
    (tmp_path / "a-file").write_text("x")
    assert cli.main([*base, "--prompt", "Answer in French.", "--out", "a-file/sub"]) == 2
    assert "is a file" in capsys.readouterr().err
