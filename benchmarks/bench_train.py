"""
Training images/s and peak memory of a TagAlign step (frozen ViT-B/16 surgery forward + text encoder + projector
forward/backward + AdamW) on random weights of the real shapes, for several batch sizes; synthetic inputs, so
data loading is not measured.

Run:
    python benchmarks/bench_train.py                               # CPU, fp32, batch 2,4,8
    python benchmarks/bench_train.py --device cuda --precision bf16 --batch-sizes 64,128,256,512
"""
import argparse
import os
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import clip_model  # noqa: E402
import tagalign  # noqa: E402
from conftest import VIT_B_16, random_state_dict  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast dtype")
    parser.add_argument("--batch-sizes", default="2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--tags", type=int, default=10000, help="object tags K (attributes: the same)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size (after one warm-up)")
    args = parser.parse_args()

    device = torch.device(args.device)
    clip = clip_model.build_model(random_state_dict(VIT_B_16)).to(device)
    model = tagalign.TagAlign(clip).to(device)
    for m in model.projector.modules():  # open the gates so the backward pass is the full one
        if isinstance(m, tagalign.GatedConv):
            m.gate.data.fill_(0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.05)
    tag_emb = torch.nn.functional.normalize(torch.randn(args.tags, 512, device=device), dim=-1)
    log_freq = torch.full((args.tags,), 1.0 / args.tags, device=device).log()
    amp = torch.bfloat16 if args.precision == "bf16" else None
    print(f"device={args.device} precision={args.precision} tags={args.tags} threads={torch.get_num_threads()} "
          f"trainable={sum(p.numel() for p in params) / 1e6:.2f}M")
    print(f"{'batch':>6} {'img/s':>8} {'s/step':>8} {'peak mem GiB':>13}")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        images = torch.randn(b, 3, 224, 224, device=device)
        tokens = clip_model.tokenize(["a photo of a brown dog on the grass"] * b).to(device)
        labels = (torch.rand(b, args.tags, device=device) < 5 / args.tags).float()

        def step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                t = model.encode_text(tokens)
                _, z = model(images)
                loss, _ = tagalign.tagalign_loss(model, z, t, labels, tag_emb, labels, tag_emb, log_freq, log_freq)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            mem = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (KiB -> GiB)
        dt = (time.perf_counter() - t0) / args.steps
        print(f"{b:>6} {b / dt:>8.2f} {dt:>8.2f} {mem:>13.2f}")


if __name__ == "__main__":
    main()
