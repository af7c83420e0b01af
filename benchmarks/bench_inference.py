"""
Images/s of TagAlign's dense inference (segment(): short side 448, 448 windows, rule v3) with the
windows batched vs one window at a time, on random ViT-B/16 weights, same machine, same run.

With --pamr-classes C it measures PAMR alone instead, on C class maps, both ways: per window on the
patch grid (what segment(use_pamr=True) does, as TCL's evaluation: n windows of 28 x 28 maps for
ViT-B/16 at 448) and, for comparison, once on the whole resized image (the alternative placement,
dilations in pixels): time and peak memory of each.

Run:
    python benchmarks/bench_inference.py                        # CPU, a 500x375 (VOC-like) image
    python benchmarks/bench_inference.py --device cuda --width 2048 --height 1024 --stride 56
                                                                # Cityscapes-like
    python benchmarks/bench_inference.py --pamr-classes 171     # PAMR, COCO-Stuff's 171 classes
"""
import argparse
import os
import resource
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--width", type=int, default=500, help="input image width")
    parser.add_argument("--height", type=int, default=375, help="input image height")
    parser.add_argument("--stride", type=int, default=56,
                        help="window stride (56: the authors' for most datasets)")
    parser.add_argument("--classes", type=int, default=20, help="number of text queries")
    parser.add_argument("--window-batch", type=int, default=16,
                        help="windows per forward in the batched run")
    parser.add_argument("--images", type=int, default=2, help="timed images per measurement")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype")
    parser.add_argument("--pamr-classes", type=int, default=0,
                        help="measure PAMR alone on this many class maps")
    args = parser.parse_args()
    if args.pamr_classes:
        return bench_pamr(args)

    clip = clip_model.build_model(random_state_dict(VIT_B_16)).to(args.device)
    model = tagalign.TagAlign(clip).to(args.device).eval()
    text = F.normalize(torch.randn(args.classes, 512, device=args.device), dim=-1)
    image = torch.rand(3, args.height, args.width)
    x = tagalign.resize_short_side(image[None], 448)
    n_windows = len(tagalign.window_boxes(x.shape[2], x.shape[3], 448, args.stride))
    device_type = torch.device(args.device).type

    def rate(window_batch):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            tagalign.segment(model.dense_features, image, text, stride=args.stride,
                             window_batch=window_batch)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.images):
                tagalign.segment(model.dense_features, image, text, stride=args.stride,
                                 window_batch=window_batch)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        return args.images / (time.perf_counter() - t0)

    print(f"device={args.device} dtype={args.dtype} image={args.width}x{args.height} "
          f"-> {x.shape[3]}x{x.shape[2]}, {n_windows} windows of 448 at stride {args.stride}, "
          f"threads={torch.get_num_threads()}")
    single, batched = rate(1), rate(args.window_batch)
    print(f"one window at a time: {single:.3f} img/s")
    print(f"batched ({args.window_batch} per forward): {batched:.3f} img/s")
    print(f"ratio batched / one-at-a-time: {batched / single:.2f}")


def bench_pamr(args):
    """Seconds and peak memory of pamr() (10 iterations): per window on (n, C, 28, 28) maps with the
    windows' images shrunk to 28 x 28 (segment's placement), then once on (1, C, H, W) at the
    resized size (the alternative placement). Peak memory: the process's peak RSS on CPU (getrusage,
    before vs after, so only what PAMR added above the inputs; the per-window run goes first, as the
    peak only grows), torch's peak allocation on CUDA."""
    device = torch.device(args.device)
    x = tagalign.resize_short_side(torch.rand(1, 3, args.height, args.width), 448).to(device)
    boxes = tagalign.window_boxes(x.shape[2], x.shape[3], 448, args.stride)
    crops = torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])  # (n, 3, 448, 448)
    small = F.interpolate(crops, size=(28, 28), mode="bilinear", align_corners=True)
    runs = [("per window, 28 x 28 (segment)", small,
             torch.rand(len(boxes), args.pamr_classes, 28, 28, device=device)),
            (f"whole image, {x.shape[2]} x {x.shape[3]} (former)", x,
             torch.rand(1, args.pamr_classes, *x.shape[-2:], device=device))]
    print(f"device={args.device} PAMR on {args.pamr_classes} class maps, 10 iterations, "
          f"{len(boxes)} windows at stride {args.stride}, threads={torch.get_num_threads()}")
    for name, image, masks in runs:
        # KiB -> GiB (Linux)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tagalign.pamr(image, masks)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if device.type == "cuda":
            memory = f"peak CUDA allocation {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
        else:
            memory = (
                "peak RSS +"
                f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 - rss_before:.2f}"
                " GiB")
        print(f"{name}: {dt:.2f} s, {memory}")


if __name__ == "__main__":
    main()
