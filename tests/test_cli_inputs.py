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
