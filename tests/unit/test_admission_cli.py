"""``python -m layerkv.admission`` refuses bad configuration with exit 2 and a message,
before it starts anything."""

from __future__ import annotations

from layerkv.admission.__main__ import main


def test_unwritable_decision_log_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "missing-dir" / "decisions.jsonl"
    assert main(["--workers", "127.0.0.1:1", "--decision-log", str(path)]) == 2
    assert "--decision-log" in capsys.readouterr().err
    assert not path.exists()


def test_bad_slo_class_spec_is_a_usage_error(capsys):
    assert main(["--workers", "127.0.0.1:1", "--slo-classes", "gold=fast:1"]) == 2
    assert "bad --slo-classes entry" in capsys.readouterr().err


def test_negative_outcome_flush_interval_is_a_usage_error(capsys):
    assert main(["--workers", "127.0.0.1:1", "--outcome-flush-interval-s", "-1"]) == 2
    assert "--outcome-flush-interval-s must be >= 0" in capsys.readouterr().err
