"""
1. Training images/s and peak memory of a TagAlign step (frozen ViT-B/16 surgery forward + text encoder +
   projector forward/backward + AdamW) on random weights of the real shapes, for several batch sizes; synthetic
   inputs. Two variants of the same step, in the same run: train.py's (loss terms summed on the device, labels
   built on the device, the finiteness flag kept on the device until a log step) and the old loop's (every
   micro-step reads `isfinite(loss)` and each term's `.item()` on the host, multi-hot labels built on the CPU and
   copied with a blocking copy). On a GPU the host reads stall the queue; on a CPU there is no queue to stall.
2. Data loading: images/s of ONE DataLoader worker (one thread) for JPEG decode + the full training augmentation
   (train.py's timm transform, SPEC section 5) on JPEGs of CC12M-like sizes (short side 400 px), against
   torchvision's RandAugment pipeline that train.py used before; and the cores per GPU that a given training
   rate needs.

Run:
    python benchmarks/bench_train.py                               # CPU, fp32, batch 2,4,8; data loading
    python benchmarks/bench_train.py --device cuda --precision bf16 --batch-sizes 64,128,256,512
    python benchmarks/bench_train.py --skip-step --images 400      # data loading only
"""
import argparse
import io
import math
import os
import random
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import clip_model  # noqa: E402
import tagalign  # noqa: E402
import train  # noqa: E402
from conftest import VIT_B_16, random_state_dict  # noqa: E402


def bench_step(args):
    device = torch.device(args.device)
    clip = clip_model.build_model(random_state_dict(VIT_B_16)).to(device)
    model = tagalign.TagAlign(clip).to(device)
    for m in model.projector.modules():  # open the gates so the backward pass is the full one
        if isinstance(m, tagalign.GatedConv):
            m.gate.data.fill_(0.1)
    groups = train.param_groups(model, 0.05)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-4, eps=1e-6)
    tag_emb = torch.nn.functional.normalize(torch.randn(args.tags, 512, device=device), dim=-1)
    log_freq = torch.full((args.tags,), 1.0 / args.tags, device=device).log()
    amp = torch.bfloat16 if args.precision == "bf16" else None
    print(f"device={args.device} precision={args.precision} tags={args.tags} threads={torch.get_num_threads()} "
          f"trainable={sum(p.numel() for p in params) / 1e6:.2f}M")
    print(f"{'batch':>6} {'deferred img/s':>15} {'host-sync img/s':>16} {'ratio':>6} {'peak mem GiB':>13}")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        images = torch.randn(b, 3, 224, 224)
        tokens = clip_model.tokenize(["a photo of a brown dog on the grass"] * b)
        g = torch.Generator().manual_seed(0)
        tag_lists = [torch.randint(0, args.tags, (5,), generator=g) for _ in range(b)]
        rows, cols = train.sparse_tags(tag_lists)
        if device.type == "cuda":
            images, tokens, rows, cols = (t.pin_memory() for t in (images, tokens, rows, cols))

        def step(host_sync):
            x = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                t = model.encode_text(tokens.to(device, non_blocking=True))
                _, z = model(x)
                if host_sync:  # the old loop: labels on the CPU, one blocking copy
                    labels = torch.zeros(b, args.tags)
                    labels[rows, cols] = 1
                    labels = labels.to(device)
                else:
                    labels = train.multi_hot(rows, cols, b, args.tags, device)
                loss, terms = tagalign.tagalign_loss(model, z, t, labels, tag_emb, labels, tag_emb, log_freq, log_freq)
            if host_sync:
                assert bool(torch.isfinite(loss))
                values = [v.item() for v in terms.values()]
            else:
                values = [v.detach() for v in terms.values()] + [torch.isfinite(loss.detach())]  # read later
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return values

        rates = {}
        for host_sync in (False, True, False, True):  # interleaved, twice, best of each
            step(host_sync)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(host_sync)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[host_sync] = max(rates.get(host_sync, 0), b * args.steps / (time.perf_counter() - t0))
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process peak RSS (KiB -> GiB)
        print(f"{b:>6} {rates[False]:>15.2f} {rates[True]:>16.2f} {rates[False] / rates[True]:>6.2f} {mem:>13.2f}")


def cc12m_like_jpegs(n, seed=0):
    """JPEGs with CC12M's typical geometry (short side 400, aspect 0.75-1.8, quality 90) and photo-like content
    (smooth gradients, shapes, texture noise: JPEG decode time depends on the content)."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        aspect = rng.uniform(0.75, 1.8)
        w, h = (round(400 * aspect), 400) if rng.random() < 0.7 else (400, round(400 * aspect))
        y = torch.linspace(0, 1, h).view(h, 1, 1)
        x = torch.linspace(0, 1, w).view(1, w, 1)
        base = torch.tensor([rng.random() for _ in range(3)]) * 255
        img = (base * (0.5 + 0.5 * x) * (0.6 + 0.4 * y) + 25 * torch.randn(h, w, 3)).clamp(0, 255).byte()
        pil = Image.fromarray(img.numpy()).filter(ImageFilter.GaussianBlur(1))
        draw = ImageDraw.Draw(pil)
        for _ in range(8):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            draw.ellipse([x0, y0, x0 + rng.randrange(20, 200), y0 + rng.randrange(20, 200)],
                         fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def old_transform(image_size):
    """train.py's previous pipeline (torchvision RandAugment(2, 9), zero-filled RandomErasing): the baseline."""
    from torchvision import transforms as T
    return T.Compose([T.RandomResizedCrop(image_size, scale=(0.08, 1.0)), T.RandomHorizontalFlip(0.5),
                      T.RandAugment(num_ops=2, magnitude=9), T.ToTensor(),
                      T.Normalize(clip_model.IMAGENET_MEAN, clip_model.IMAGENET_STD), T.RandomErasing(p=0.25)])


def bench_data(args):
    from PIL import Image
    torch.set_num_threads(1)  # as in a DataLoader worker
    jpegs = cc12m_like_jpegs(args.images)
    print(f"\ndata loading, one worker (1 thread): {len(jpegs)} JPEGs, short side 400, mean "
          f"{sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB")
    pipelines = {"decode only": None, "decode + train.py augmentation (timm, SPEC 5)": train.train_transform(224, True),
                 "decode + old torchvision augmentation": old_transform(224)}
    rates = {}
    for name, transform in pipelines.items():
        best = 0
        for _ in range(2):
            t0 = time.perf_counter()
            for i, data in enumerate(jpegs):
                img = Image.open(io.BytesIO(data)).convert("RGB")
                if transform is not None:
                    with train.seeded(i):
                        transform(img)
            best = max(best, len(jpegs) / (time.perf_counter() - t0))
        rates[name] = best
        print(f"{name:50s} {best:8.1f} img/s per worker")
    ours = rates["decode + train.py augmentation (timm, SPEC 5)"]
    print(f"ratio train.py / old augmentation: {ours / rates['decode + old torchvision augmentation']:.2f}")
    for target in (1000, 5000):
        print(f"a training step at {target} img/s per GPU needs {math.ceil(target / ours)} decoding cores per GPU "
              f"(at {ours:.0f} img/s per core)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="autocast dtype")
    parser.add_argument("--batch-sizes", default="2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--tags", type=int, default=10000, help="object tags K (attributes: the same)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size and variant (after a warm-up)")
    parser.add_argument("--images", type=int, default=200, help="JPEGs for the data-loading measurement")
    parser.add_argument("--skip-step", action="store_true", help="only the data-loading measurement")
    parser.add_argument("--skip-data", action="store_true", help="only the training-step measurement")
    args = parser.parse_args()
    if not args.skip_step:
        bench_step(args)
    if not args.skip_data:
        bench_data(args)


if __name__ == "__main__":
    main()
