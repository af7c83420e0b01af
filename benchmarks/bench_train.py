"""
1. Training images/s and peak memory of a TagAlign step (frozen ViT-B/16 surgery forward + text
   encoder + projector forward/backward + AdamW) on random weights of the real shapes, for several
   batch sizes; synthetic inputs. Two variants of the same step, in the same run: train.py's (loss
   terms summed on the device, labels built on the device, the finiteness flag kept on the device
   until a log step) and the host-sync loop's (every micro-step reads `isfinite(loss)` and each
   term's `.item()` on the host, multi-hot labels built on the CPU and copied with a blocking copy).
   On a GPU the host reads stall the queue; on a CPU there is no queue to stall.
2. Data loading: images/s of ONE DataLoader worker reading a tar shard of CC12M-like JPEGs (short
   side 400 px, and 800 px) through the authors' augmentation: train.py's pipeline (uint8 crops, big
   JPEGs decoded at reduced size where the crop allows, normalisation and random erasing left to the
   device) against the float32 pipeline a timm user writes without a prefetcher (full decode,
   ToTensor + Normalize + RandomErasing in the worker); the shared memory per image of each; and the
   workers per GPU that a given training rate needs.

Run:
    python benchmarks/bench_train.py                # CPU, fp32, batch 2,4,8; data loading
    python benchmarks/bench_train.py --device cuda --precision bf16 --batch-sizes 64,128,256,512
    python benchmarks/bench_train.py --skip-step    # data loading only
"""
import argparse
import io
import math
import os
import random
import resource
import sys
import tarfile
import tempfile
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
    freq = torch.full((args.tags,), 1.0 / args.tags, device=device)
    amp = torch.bfloat16 if args.precision == "bf16" else None
    print(f"device={args.device} precision={args.precision} tags={args.tags} "
          f"threads={torch.get_num_threads()} "
          f"trainable={sum(p.numel() for p in params) / 1e6:.2f}M")
    print(f"{'batch':>6} {'deferred img/s':>15} {'host-sync img/s':>16} {'ratio':>6} "
          f"{'peak mem GiB':>13}")
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
                if host_sync:  # the host-sync loop: labels on the CPU, one blocking copy
                    labels = torch.zeros(b, args.tags)
                    labels[rows, cols] = 1
                    labels = labels.to(device)
                else:
                    labels = train.multi_hot(rows, cols, b, args.tags, device)
                loss, terms = tagalign.tagalign_loss(model, z, t, labels, tag_emb, labels, tag_emb,
                                                     freq, freq)
            if host_sync:
                assert bool(torch.isfinite(loss))
                values = [v.item() for v in terms.values()]
            else:
                # read later
                values = [v.detach() for v in terms.values()] + [torch.isfinite(loss.detach())]
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
            rates[host_sync] = max(rates.get(host_sync, 0),
                                   b * args.steps / (time.perf_counter() - t0))
        if device.type == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            # process peak RSS (KiB -> GiB)
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        print(f"{b:>6} {rates[False]:>15.2f} {rates[True]:>16.2f} "
              f"{rates[False] / rates[True]:>6.2f} {mem:>13.2f}")


def cc12m_like_jpegs(n, seed=0, short_side=400):
    """JPEGs with CC12M's typical geometry (short side 400, aspect 0.75-1.8, quality 90) and
    photo-like content (smooth gradients, shapes, texture noise: JPEG decode time depends on the
    content)."""
    from PIL import Image, ImageDraw, ImageFilter
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        aspect = rng.uniform(0.75, 1.8)
        w, h = (round(short_side * aspect), short_side) if rng.random() < 0.7 else \
            (short_side, round(short_side * aspect))
        y = torch.linspace(0, 1, h).view(h, 1, 1)
        x = torch.linspace(0, 1, w).view(1, w, 1)
        base = torch.tensor([rng.random() for _ in range(3)]) * 255
        img = (base * (0.5 + 0.5 * x) * (0.6 + 0.4 * y)
               + 25 * torch.randn(h, w, 3)).clamp(0, 255).byte()
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


def write_shard(path, jpegs, count):
    """An img2dataset-style tar of `count` samples cycling through `jpegs`."""
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            for ext, data in (("jpg", jpegs[i % len(jpegs)]),
                              ("txt", f"a brown dog number {i} on grass".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


class FloatPipeline(train.CaptionImages):
    """The baseline: what timm's plain (prefetcher-less) pipeline does: decode in full, then
    create_transform's float pipeline with ToTensor, Normalize and RandomErasing in the worker, so
    float32 crops cross shared memory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from timm.data import create_transform
        self.float_transform = create_transform(
            224, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
            interpolation="bilinear", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=None,
            mean=clip_model.IMAGENET_MEAN, std=clip_model.IMAGENET_STD, re_prob=0.25,
            re_mode="pixel", re_count=1)

    def decode(self, item, skipped):
        from PIL import Image
        (epoch, _, _), _, key, image, caption = item
        img = Image.open(io.BytesIO(image)).convert("RGB")
        with train.seeded(train.stable_seed(self.seed, "augment", key, epoch)):
            x = self.float_transform(img)
        return x, (0, 0, 0, 0, 0), clip_model.tokenize(caption)[0], torch.zeros(0), \
            torch.zeros(0), key, False


def loader_rate(dataset, batches, batch_size):
    """img/s of one DataLoader worker delivering `batches` batches (after one warm-up batch), and
    the bytes of one batch's images in shared memory."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=1,
                                         collate_fn=train.collate)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    rate = batches * batch_size / (time.perf_counter() - t0)
    return rate, batch["images"].nelement() * batch["images"].element_size() / batch_size


def bench_data(args):
    torch.set_num_threads(1)
    print(f"\ndata loading: ONE DataLoader worker, tar shard -> decode -> the authors' "
          f"augmentation -> batch of {args.loader_batch}, best of 2 interleaved runs of "
          f"{args.loader_batches} batches")
    print(f"{'JPEG short side':>16} {'float32 in worker':>18} {'uint8 + draft':>14} {'ratio':>6} "
          f"{'shm/img float':>14} {'shm/img uint8':>14} {'device norm+erase':>18}")
    folder = tempfile.mkdtemp()
    for short in [int(s) for s in args.short_sides.split(",")]:
        path = os.path.join(folder, f"{short}.tar")
        write_shard(path, cc12m_like_jpegs(args.images, short_side=short),
                    8 * args.loader_batch * args.loader_batches)
        transform = train.train_transform(224, True)
        rates, sizes = {}, {}
        for name in ("float", "uint8", "float", "uint8"):
            cls = FloatPipeline if name == "float" else train.CaptionImages
            data = cls([path], None, transform, workers=1, shuffle_buffer=64, keep_unlisted=True)
            rate, sizes[name] = loader_rate(data, args.loader_batches, args.loader_batch)
            rates[name] = max(rates.get(name, 0), rate)
        # the part train.py leaves to the device, timed here on this CPU for one batch (a GPU does
        # it in microseconds)
        images = torch.randint(0, 256, (args.loader_batch, 3, 224, 224), dtype=torch.uint8)
        boxes = [(10, 20, 60, 50, i) if i % 4 == 0 else (0, 0, 0, 0, i)
                 for i in range(args.loader_batch)]
        t0 = time.perf_counter()
        train.normalise_and_erase(images, boxes, torch.Generator())
        device_ms = (time.perf_counter() - t0) * 1e3 / args.loader_batch
        print(f"{short:>16} {rates['float']:>14.1f} img/s {rates['uint8']:>8.1f} img/s "
              f"{rates['uint8'] / rates['float']:>6.2f} {sizes['float'] / 1024:>10.0f} KiB "
              f"{sizes['uint8'] / 1024:>10.0f} KiB {device_ms:>11.3f} ms/img (this CPU)")
    for target in (1000, 5000):
        print(f"a GPU training at {target} img/s needs {math.ceil(target / rates['uint8'])} "
              f"workers (cores) at the last row's {rates['uint8']:.0f} img/s per worker")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[1])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="autocast dtype")
    parser.add_argument("--batch-sizes", default="2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--tags", type=int, default=10000,
                        help="object tags K (attributes: the same)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per batch size and variant (after a warm-up)")
    parser.add_argument("--images", type=int, default=64,
                        help="distinct JPEGs per short side (cycled)")
    parser.add_argument("--short-sides", default="400,800",
                        help="JPEG short sides to measure data loading on")
    parser.add_argument("--loader-batch", type=int, default=32,
                        help="batch size of the loader measurement")
    parser.add_argument("--loader-batches", type=int, default=12,
                        help="timed batches per loader run")
    parser.add_argument("--skip-step", action="store_true",
                        help="only the data-loading measurement")
    parser.add_argument("--skip-data", action="store_true",
                        help="only the training-step measurement")
    args = parser.parse_args()
    if not args.skip_step:
        bench_step(args)
    if not args.skip_data:
        bench_data(args)


if __name__ == "__main__":
    main()
