"""
Images/s of the CLIP ViT-B/16 image encoder: our dense CLIP Surgery forward, our plain forward, and
open_clip (the reference implementation) on the same random weights, same machine, same run.

Run:
    python benchmarks/bench_clip.py                       # CPU, fp32, batch 8, 224 and 448
    python benchmarks/bench_clip.py --device cuda --dtype bf16 --batch-size 64

Needs the test extra (open_clip_torch) for the reference column.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import clip_model  # noqa: E402
from conftest import VIT_B_16, random_state_dict  # noqa: E402


def images_per_second(fn, x, iters, warmup):
    for _ in range(warmup):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return iters * x.shape[0] / (time.perf_counter() - t0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast dtype (fp32: none)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward")
    parser.add_argument("--sizes", default="224,448", help="comma-separated square input sizes")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards before timing")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sd = random_state_dict(VIT_B_16)
    ours = clip_model.build_model(sd).to(args.device)
    try:
        import open_clip
        ref = (open_clip.model.build_model_from_openai_state_dict(dict(sd))
               .float().eval().to(args.device))
    except ImportError:
        ref = None
        print("open_clip not installed: no reference column (pip install -r requirements-test.txt)")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device_type = torch.device(args.device).type

    def timed(fn, x):
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype,
                                                    enabled=dtype is not None):
            return images_per_second(fn, x, args.iters, args.warmup)

    print(f"device={args.device} dtype={args.dtype} batch={args.batch_size} "
          f"threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'size':>5} {'surgery img/s':>14} {'plain img/s':>12} {'open_clip img/s':>16} "
          f"{'surgery/plain':>14} {'plain/open_clip':>16}")
    for size in [int(s) for s in args.sizes.split(",")]:
        x = torch.randn(args.batch_size, 3, size, size, device=args.device)
        surgery = timed(lambda im: ours.visual.head(ours.visual.forward_surgery(im)[0]), x)
        plain = timed(ours.encode_image, x)
        line = f"{size:>5} {surgery:>14.2f} {plain:>12.2f} "
        # open_clip's ViT needs its native grid
        if ref is not None and size == VIT_B_16.image_resolution:
            reference = timed(ref.encode_image, x)
            line += f"{reference:>16.2f} {surgery / plain:>14.3f} {plain / reference:>16.3f}"
        else:
            line += f"{'-':>16} {surgery / plain:>14.3f} {'-':>16}"
        print(line)


if __name__ == "__main__":
    main()
