"""
Images/s of the full evaluation path (read image and label, short side 448, 448 windows at the
dataset's stride, rule v3 with background threshold, resize back, confusion matrix) on random
ViT-B/16 weights, for a VOC-layout folder of synthetic 500 x 375 images (597 x 448 after the resize:
4 windows at stride 56).

Run:
    python benchmarks/bench_evaluate.py                       # CPU, 4 images
    python benchmarks/bench_evaluate.py --images 50 --pamr    # GPU if present, with PAMR
"""
import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import clip_model  # noqa: E402
import evaluate  # noqa: E402
import tagalign  # noqa: E402
from conftest import VIT_B_16, random_state_dict  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="number of images")
    parser.add_argument("--pamr", action="store_true", help="include PAMR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    args = parser.parse_args()
    from PIL import Image
    device = torch.device(args.device)
    model = tagalign.TagAlign(clip_model.build_model(random_state_dict(VIT_B_16))).to(device).eval()
    with tempfile.TemporaryDirectory() as root:
        base = os.path.join(root, "VOCdevkit", "VOC2012")
        for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            os.makedirs(os.path.join(base, d))
        stems = [f"2007_{i:06d}" for i in range(args.images)]
        for s in stems:
            Image.fromarray(torch.randint(0, 255, (375, 500, 3), dtype=torch.uint8)
                            .numpy()).save(os.path.join(base, "JPEGImages", s + ".jpg"))
            Image.fromarray(torch.randint(0, 21, (375, 500), dtype=torch.uint8).numpy(), "L").save(
                os.path.join(base, "SegmentationClass", s + ".png"))
        open(os.path.join(base, "ImageSets/Segmentation/val.txt"), "w").write(
            "\n".join(stems) + "\n")
        eval_args = evaluate.apply_backbone(evaluate.parse_args(
            ["--data-root", root, "--no-progress"] + (["--pamr"] if args.pamr else [])), model.clip)
        embed = lambda names: tagalign.text_embeddings(model.clip, names).to(device)
        evaluate.evaluate_dataset("voc", model.dense_features, embed, evaluate.apply_backbone(
            evaluate.parse_args(["--data-root", root, "--no-progress", "--limit", "1"]),
            model.clip))  # warm-up
        t0 = time.perf_counter()
        result = evaluate.evaluate_dataset("voc", model.dense_features, embed, eval_args)
        dt = time.perf_counter() - t0
    print(f"device={args.device} threads={torch.get_num_threads()} pamr={args.pamr} "
          f"images={result['images']} (500x375 -> 597x448, 4 windows at stride 56, 20 prompts)")
    print(f"full evaluation path: {result['images'] / dt:.3f} img/s "
          f"({dt / result['images']:.2f} s/img)")


if __name__ == "__main__":
    main()
