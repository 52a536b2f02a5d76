"""tools/corpus_table.py: the corpus table on one model, and its bad input."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import corpus_table  # noqa: E402


def test_one_model_row_and_file(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert corpus_table.main(["--only", "acnet.acb_crop", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| acnet.acb_crop | yes | 24 | 3 | 15 | 15 | 3 | 3 |" in text  # own 3, fused 3
    assert "at most the best baseline's linear ops on 1 of the 1" in text
    assert text in capsys.readouterr().out + "\n"
    assert not list(tmp_path.glob("*.partial"))


def test_unknown_prefix_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "table.md"
    assert corpus_table.main(["--only", "nosuchlibrary", "--out", str(out)]) == 2
    assert "no corpus model" in capsys.readouterr().err
    assert not out.exists()
