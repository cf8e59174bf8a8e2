"""The command line: `info`, and `demo` end to end on the packaged SmolLM2 (small settings)."""

import json
import shutil
import subprocess
import sys

import pytest

from qlora_compile.tools import cli


def test_info_reports_kernels(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "qlora-compile" in out and "CPU kernel: native" in out


def test_bad_input_exits_2(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--tokens", "1"]) == 2
    assert "--tokens and --window must be at least 2" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, smollm2_dir):
    """Real SmolLM2-135M weights: NF4 beats FP4, double quantization costs ~nothing, 4.127 bits."""
    shutil.copytree(smollm2_dir, tmp_path / smollm2_dir.name)  # the demo reuses a built folder
    cmd = [
        sys.executable,
        "-m",
        "qlora_compile.tools.cli",
        "demo",
        "--out",
        str(tmp_path),
        "--tokens",
        "512",
        "--window",
        "256",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {r["variant"]: r for r in summary["rows"]}
    dense = rows["fp32 (GGUF dequantized)"]["perplexity"]
    assert rows["NF4 + DQ"]["bits_per_param"] == pytest.approx(4.127, abs=1e-3)
    assert rows["NF4"]["bits_per_param"] == pytest.approx(4.5, abs=1e-3)
    assert dense < rows["NF4 + DQ"]["perplexity"] < rows["FP4 + DQ"]["perplexity"]
    assert abs(rows["NF4 + DQ"]["perplexity"] / rows["NF4"]["perplexity"] - 1) < 0.01
    assert (tmp_path / "report.md").read_text().startswith("SmolLM2-135M-Instruct")
    assert summary["answers"]["fp32"] and summary["answers"]["NF4 + DQ"]
