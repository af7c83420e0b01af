#!/usr/bin/env bash
# The device check, for the day a GPU is at hand: one GPU, about 5 minutes, no downloads.
#
#     bash benchmarks/gpu_check.sh [OUT]        # default OUT: out/gpu_check
#
# 1. Synthetic img2dataset shards (data/make_synthetic.py) with labels taken from their templated
#    captions (no LLM), and a random ViT-B/16 CLIP file of the real shapes.
# 2. train.py, 50 steps of batch 128 in bf16 with --sync-debug: a host-device synchronisation
#    anywhere between the batch and the optimizer step raises. Straight, and 25 + resume + 25: the
#    log lines after the resume and the final weights must match the straight run's (bf16 kernels
#    on a GPU may round differently run to run, so within 1e-2).
# 3. evaluate.py on the held-out colour set on CUDA.
# It prints the training img/s (the log's last line) and the evaluation time, and exits non-zero
# on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu_check}
rm -rf "$OUT"
mkdir -p "$OUT"
python3 -c "import torch, sys; \
sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"

python3 data/make_synthetic.py --out "$OUT/synthetic" --train 8000 --test 50
python3 - "$OUT" <<'EOF'
import glob, json, os, sys, tarfile
import torch
sys.path[:0] = [".", "tests"]
import parse_tags
from conftest import VIT_B_16, random_state_dict
out = sys.argv[1]
shapes, colours = ({"circle", "square", "triangle"},
                   {"red", "green", "blue", "yellow", "small", "large"})
os.makedirs(f"{out}/labels")
with open(f"{out}/labels/parsed.0-of-1.jsonl", "w") as f:
    for shard in sorted(glob.glob(f"{out}/synthetic/shards/*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".txt"):
                    words = tar.extractfile(m).read().decode().replace(".", "").split()
                    f.write(json.dumps({"key": m.name[:-4], "h": m.name[:-4],
                                        "objects": sorted(shapes & set(words)),
                                        "attributes": sorted(colours & set(words))}) + "\n")
open(f"{out}/labels/parsed.0-of-1.done.json", "w").write("{}")
parse_tags.merge(f"{out}/labels")
parse_tags.build_vocab(f"{out}/labels")
torch.save(random_state_dict(VIT_B_16, seed=0), f"{out}/clip.pt")
EOF

common=(--data "$OUT/synthetic/shards/*.tar" --labels "$OUT/labels" --clip "$OUT/clip.pt"
        --batch-size 128 --workers 8 --precision bf16 --log-every 5 --save-every 25 --sync-debug
        --lr 0.01)
python3 train.py "${common[@]}" --out "$OUT/straight" --steps 50
python3 train.py "${common[@]}" --out "$OUT/resumed" --steps 25
python3 train.py "${common[@]}" --out "$OUT/resumed" --steps 50 --resume
python3 - "$OUT" <<'EOF'
import sys
import torch
out = sys.argv[1]
def losses(run):
    lines = [l.split() for l in open(f"{out}/{run}/log.txt") if l.startswith("step")]
    return {l[1]: [float(l[i + 1]) for i in (2, 4, 6)] for l in lines}
straight, resumed = losses("straight"), losses("resumed")
after = [s for s in straight if int(s.split("/")[0]) > 25]
worst = max(abs(a - b) / max(abs(a), 1e-6) for s in after for a, b in zip(straight[s], resumed[s]))
a, b = (torch.load(f"{out}/{r}/ckpt.pt", weights_only=False)["model"]
        for r in ("straight", "resumed"))
weights = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-6)).item() for k in a)
print(f"resume: losses after step 25 within {worst:.2e} (relative), weights within {weights:.2e}")
assert worst < 1e-2 and weights < 1e-2, "a resumed run differs from the straight one"
print("train img/s (last log line):",
      open(f"{out}/straight/log.txt").read().split("img/s ")[-1].split()[0])
EOF

start=$(date +%s)
python3 evaluate.py --checkpoint "$OUT/straight/ckpt.pt" --dataset folder \
    --data-root "$OUT/synthetic/seg/colours" --window 224 --short-side 224 --out "$OUT/eval" \
    --no-progress | tail -5  # CUDA when available
echo "evaluate.py: 50 images in $(( $(date +%s) - start )) s (including model loading)"
echo "gpu_check: passed"
