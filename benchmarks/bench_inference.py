"""
Images/s of TagAlign's dense inference (segment(): short side 448, 448 windows, rule v3) with the windows batched
vs one window at a time, on random ViT-B/16 weights, same machine, same run.

Run:
    python benchmarks/bench_inference.py                                   # CPU, a 500x375 (VOC-like) image
    python benchmarks/bench_inference.py --device cuda --width 2048 --height 1024 --stride 56   # Cityscapes-like
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import clip_model  # noqa: E402
import tagalign  # noqa: E402
from conftest import VIT_B_16, random_state_dict  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--width", type=int, default=500, help="input image width")
    parser.add_argument("--height", type=int, default=375, help="input image height")
    parser.add_argument("--stride", type=int, default=56, help="window stride (SPEC: 56 for most datasets)")
    parser.add_argument("--classes", type=int, default=20, help="number of text queries")
    parser.add_argument("--window-batch", type=int, default=16, help="windows per forward in the batched run")
    parser.add_argument("--images", type=int, default=2, help="timed images per measurement")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype")
    args = parser.parse_args()

    clip = clip_model.build_model(random_state_dict(VIT_B_16)).to(args.device)
    model = tagalign.TagAlign(clip).to(args.device).eval()
    text = F.normalize(torch.randn(args.classes, 512, device=args.device), dim=-1)
    image = torch.rand(3, args.height, args.width)
    x = tagalign.resize_short_side(image[None], 448)
    n_windows = len(tagalign.window_boxes(x.shape[2], x.shape[3], 448, args.stride))
    device_type = torch.device(args.device).type

    def rate(window_batch):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            tagalign.segment(model.dense_features, image, text, stride=args.stride, window_batch=window_batch)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.images):
                tagalign.segment(model.dense_features, image, text, stride=args.stride, window_batch=window_batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        return args.images / (time.perf_counter() - t0)

    print(f"device={args.device} dtype={args.dtype} image={args.width}x{args.height} -> {x.shape[3]}x{x.shape[2]}, "
          f"{n_windows} windows of 448 at stride {args.stride}, threads={torch.get_num_threads()}")
    single, batched = rate(1), rate(args.window_batch)
    print(f"one window at a time: {single:.3f} img/s")
    print(f"batched ({args.window_batch} per forward): {batched:.3f} img/s")
    print(f"ratio batched / one-at-a-time: {batched / single:.2f}")


if __name__ == "__main__":
    main()
