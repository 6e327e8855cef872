"""``hf-ewtune`` CLI: accounting commands, error handling, command registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from hf_ewtune import cli

SMALL = ["--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "200"]


def test_epsilon_json(capsys):
    assert cli.main(["epsilon", *SMALL, "--accountant", "rdp", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["accountant"] == "rdp" and data["steps"] == 200
    assert data["epsilon"] > data["edgeworth_epsilon"] > 0
    assert "RDP" in data["certified_by"]


def test_epsilon_text_labels_the_estimate(capsys):
    assert cli.main(["epsilon", *SMALL, "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Certified privacy: epsilon = ")
    assert "Edgeworth estimate (not a guarantee)" in out


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "3"], "--sample-rate"),
        (["epsilon", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--steps", "3"], "--noise-multiplier"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "0"], "--steps"),
        (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "3", "--delta", "2"], "--delta"),
        (["epsilon", "--noise-multiplier", "x", "--sample-rate", "0.1", "--steps", "3"], "--noise-multiplier"),
        (["epsilon", "--sample-rate", "0.1", "--steps", "3"], "--noise-multiplier"),
        (["calibrate", "--target-epsilon", "-3", "--sample-rate", "0.01", "--steps", "300"], "--target-epsilon"),
        (["epsilon", *SMALL, "--accountant", "moments"], "--accountant"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_flag(argv, flag, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err


def test_no_command_and_help(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("epsilon", "calibrate", "compare", "plot"):
        assert command in out


def test_calibrate_rdp(capsys):
    argv = ["calibrate", "--target-epsilon", "3", "--sample-rate", "0.01", "--steps", "300", "--accountant", "rdp"]
    assert cli.main([*argv, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["certified"] is True and data["epsilon"] <= 3 and data["accountant"] == "rdp"
    assert data["noise_multiplier"] == pytest.approx(0.764, rel=5e-3)


def test_calibrate_no_certify_says_it_is_an_estimate(capsys):
    argv = ["calibrate", "--target-epsilon", "3", "--sample-rate", "0.01", "--steps", "300", "--no-certify"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "NOT a guarantee" in captured.out and "EXCEEDS" in captured.out  # true epsilon is ~4.4 at EW's sigma
    assert "not a privacy guarantee" in captured.err


def test_compare_json(capsys):
    argv = ["compare", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "100", "--json"]
    assert cli.main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    kinds = {row["method"]: row["kind"] for row in data["rows"]}
    assert kinds["Edgeworth order 1 (EW-Tune)"] == "estimate" and kinds["Edgeworth order 2"] == "estimate"
    assert kinds["PLD (default)"] == "certified" and kinds["RDP"] == "certified"
    eps = {row["method"]: row["epsilon"] for row in data["rows"]}
    assert eps["PLD (default)"] == pytest.approx(0.71804, abs=1e-3)  # design note section 9
    assert eps["Edgeworth order 1 (EW-Tune)"] == pytest.approx(0.61386, abs=1e-4)
    assert all(row["seconds"] >= 0 for row in data["rows"])


def test_compare_table_text():
    from hf_ewtune.accounting.compare import ComparisonRow, format_comparison

    rows = [
        ComparisonRow("Edgeworth order 1 (EW-Tune)", "estimate", 7.9929, 0.01, "estimate, not a guarantee"),
        ComparisonRow("Edgeworth order 1 error bound", "bound", float("inf"), 0.01, "not certifiable (Delta_Y >= delta)"),
        ComparisonRow("PLD (default)", "certified", 8.2891, 0.6, "dp-accounting PLD"),
        ComparisonRow("RDP", "certified", 9.285, 0.04, "dp-accounting RDP"),
    ]
    out = format_comparison(rows, setting=dict(noise_multiplier=0.7865, sample_rate=0.029696, steps=660, delta=1e-5))
    assert "| accountant | kind | epsilon | eps / PLD | time (s) | note |" in out
    assert "| Edgeworth order 1 (EW-Tune) | estimate | 7.9929 | 0.964 |" in out
    assert "| inf |" in out
    assert out.rstrip().endswith("Published (certified) epsilon: 8.2891 (PLD (default)); the Edgeworth numbers are estimates.")


def test_plot_writes_png(tmp_path, capsys):
    out = tmp_path / "eps.png"
    argv = ["plot", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "200", "--points", "3",
            "--output", str(out)]
    assert cli.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    argv = ["plot", "--steps", "10", "--points", "2", "--output", str(tmp_path / "x.png")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "matplotlib is required" in err and not (tmp_path / "x.png").exists()


def test_absent_command_module_is_skipped_but_broken_one_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "hf_ewtune.commands.not_written_yet"])
    parser = cli.build_parser()
    assert parser.parse_args(["epsilon", *SMALL]).command == "epsilon"
    (tmp_path / "broken_cmd_mod.py").write_text(textwrap.dedent("import a_dependency_that_is_missing_xyz\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["hf_ewtune.commands.accounting", "broken_cmd_mod"])
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()


def test_importing_cli_is_light():
    code = "import sys, hf_ewtune.cli as c; c.build_parser(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_console_script_calibrate():
    exe = shutil.which("hf-ewtune", path=os.path.dirname(sys.executable)) or shutil.which("hf-ewtune")
    cmd = [exe] if exe else [sys.executable, "-m", "hf_ewtune.cli"]
    proc = subprocess.run(
        [*cmd, "calibrate", "--target-epsilon", "3", "--sample-rate", "0.01", "--steps", "300", "--delta", "1e-5"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "noise multiplier: 0.70" in proc.stdout and "certified epsilon" in proc.stdout
