"""`shopfloor simulate` argument parsing: durations, times and clear errors."""

from __future__ import annotations

import argparse

import pytest

from agent.simulate.cli import main, parse_duration, parse_time


@pytest.mark.parametrize("text, seconds", [("10s", 10), ("5m", 300), ("6h", 21600), ("60d", 5184000),
                                           ("1w", 604800), ("300", 300), ("1.5h", 5400), ("2000ms", 2)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "six hours", "10x", "-5m", "0s", "500ms"])
def test_bad_durations_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["2026-01-01T00:00:00Z", "2026-01-01T00:00:00+00:00", "2026-01-01T01:00:00+01:00",
                                  "2026-01-01 00:00:00", "1767225600", "1767225600000", "1767225600.0"])
def test_times(text):
    assert parse_time(text) == 1767225600000


def test_bad_time_and_missing_target_are_clear_errors(capsys):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("yesterday")
    with pytest.raises(SystemExit):
        main(["--nodes", "2"])                    # neither --endpoint nor --out
    assert "--endpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--nodes", "0", "--out", "x"])
    assert main(["--duration", "10s", "--step", "60s", "--out", "never-written"]) == 2
    assert "shorter than --step" in capsys.readouterr().err
