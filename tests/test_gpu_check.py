"""The GPU check runs every section at toy sizes on the CPU, so the one call on a lent GPU cannot fail on
a typo: each section prints its JSON line with its figures, none an error, and the summary names none.
Slow: the toy trainings take ~5 min on 2 shared cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_lines() -> dict[str, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {line["figure"]: line for line in lines if line["figure"] != "mfu_lever"}  # mfu carries its levers


def test_every_section_reports_its_figures_without_error(smoke_lines):
    expected = {"phantoms", "peak", "mfu", "deepspeed_vs_ddp", "bf16_vs_fp32", "counterfactuals", "generation",
                "mini_diffchest", "mini_cxr_ddpm", "mini_cheff_sr", "summary"}
    assert set(smoke_lines) == expected
    assert smoke_lines["summary"]["failed"] == [], {k: v.get("error") for k, v in smoke_lines.items()}
    assert smoke_lines["mfu"]["train_gflop_per_image"] > 0 and smoke_lines["mfu"]["img_s"] > 0
    assert smoke_lines["deepspeed_vs_ddp"]["ddp_img_s"] > 0 and smoke_lines["deepspeed_vs_ddp"]["deepspeed_img_s"] > 0
    # the same phantom batches, timesteps and noise in fp32 and under (CPU) bf16 autocast
    assert smoke_lines["bf16_vs_fp32"]["relative_difference"] < 0.05
    assert smoke_lines["mini_diffchest"]["images_shown"] == 256
    assert smoke_lines["mini_cxr_ddpm"]["images_shown"] == 256
    assert -1 <= smoke_lines["mini_cxr_ddpm"]["w1_r"] <= 1
    assert smoke_lines["mini_cheff_sr"]["bicubic_psnr_db"] > 15
    assert "at_cpu_length_sr3_from_0.5T_psnr_db" in smoke_lines["mini_cheff_sr"]
    assert -1 <= smoke_lines["mini_cxr_ddpm"]["lvidd_alone_shuffled_r_requested"] <= 1


def test_without_a_gpu_the_full_check_refuses_with_exit_2():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2 and "no CUDA device" in run.stderr
