"""Every bad command line of ``make bad-inputs`` ends in one ``error:`` line with exit 2, before any
training (53 CLI runs, ~2 min: slow)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_every_bad_input_is_one_line_and_exit_2_before_training(tmp_path):
    from experiments.bench import bad_inputs

    assert bad_inputs.main(["--out", str(tmp_path / "bad"), "--label", "t"]) == 0
    rows = json.loads((tmp_path / "bad_t.json").read_text())
    assert len(rows) == len(bad_inputs.CASES)
    for r in rows:
        assert r["exit"] == 2 and r["stderr_lines"] == 1 and r["first_line"].startswith("error: "), r
        assert not r["trained_before_error"], r
