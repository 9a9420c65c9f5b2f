"""The rolo-batch command: help that reads well, exit codes, tables, errors that say what to do."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rolo_batch import cli, contracts, tables
from tests.test_tables import make_features

COMMANDS = ["synth", "inspect", "train-detector", "extract", "adapt", "train", "track", "score", "render", "pipeline",
            "track-archive", "demo",
            "benchmark", "schema", "validate", "submit", "jobs"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the installed console script, as a user would."""
    return subprocess.run([sys.executable, "-m", "rolo_batch.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_top_level_help_lists_every_command_and_the_pipeline():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert f"    {command}" in result.stdout
    assert "s3://bucket/prefix" in result.stdout and "examples:" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: rolo-batch {command}" in text and len(text.splitlines()) > 4


def test_synth_then_inspect_prints_a_table(tmp_path, capsys):
    assert cli.main(["synth", str(tmp_path), "--videos", "2", "--frames", "5", "--width", "96",
                     "--height", "64"]) == 0
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("video"))
    assert lines[header].split() == ["video", "kind", "frames", "first", "size", "valid_boxes", "notes"]
    assert lines[header + 2].split()[:6] == ["synth-000", "otb", "5", "1", "96x64", "5"]


def test_inspect_reports_a_bad_video_by_name_and_exits_1(tmp_path, capsys):
    cli.main(["synth", str(tmp_path), "--videos", "2", "--frames", "4", "--width", "96", "--height", "64"])
    (tmp_path / "synth-001" / "groundtruth_rect.txt").write_text("1,2,3,4\nbad line\n")
    assert cli.main(["inspect", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "synth-000" in captured.out
    assert "synth-001" in captured.err and "line 2" in captured.err


def test_inspect_of_an_empty_collection_says_what_is_expected(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "no videos found" in capsys.readouterr().err


def test_unsupported_uri_is_a_storage_error_not_a_traceback(capsys):
    assert cli.main(["inspect", "gs://bucket/x"]) == 1
    err = capsys.readouterr().err
    assert "unsupported URI scheme" in err and "Traceback" not in err


def test_bad_option_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["synth", "out", "--videos", "0"])
    assert info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_schema_prints_every_column(capsys):
    assert cli.main(["schema", "tracks"]) == 0
    out = capsys.readouterr().out
    for name in contracts.load("tracks").column_names:
        assert name in out


def test_validate_accepts_a_good_table_and_names_the_bad_column(tmp_path, capsys):
    good = tmp_path / "features"
    unit = tables.unit_uri(str(good), "v1")
    tables.write_parquet(f"{unit}/{tables.PART_FILE}", make_features().to_arrow(), contracts.load("features"))
    from rolo_batch import storage
    storage.mark_done(unit, {})
    assert cli.main(["validate", str(good), "--table", "features"]) == 0
    assert "1 file(s), 5 rows follow features/1" in capsys.readouterr().out
    assert cli.main(["validate", f"{unit}/{tables.PART_FILE}", "--table", "tracks"]) == 1
    assert "column 'method' is missing" in capsys.readouterr().err
