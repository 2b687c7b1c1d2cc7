"""The worker's command line: flag errors answer with exit code 2 before vLLM loads."""

from __future__ import annotations

from layerkv.worker.__main__ import main


def test_layerkv_decision_log_needs_layerkv_and_a_writable_place(tmp_path, capsys):
    log = str(tmp_path / "decisions.jsonl")
    assert main(["--model", "tiny", "--layerkv-decision-log", log]) == 2
    assert "needs --layerkv" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-dir" / "decisions.jsonl")
    assert main(["--model", "tiny", "--layerkv", "--layerkv-decision-log", missing]) == 2
    assert "cannot write in" in capsys.readouterr().err
