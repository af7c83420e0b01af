"""
Train TagAlign (SPEC sections 4-5): the projector on frozen CLIP Surgery features, with the multi-tag losses
(objects and attributes, Eq. 1-4) and the image-text contrastive loss (Eq. 5), L = L_tag + lambda L_itc (Eq. 6).

Run:
    # 8 GPUs (paper: batch 512 per GPU, 30,000 steps, lr 1e-3 x global batch / 4096)
    torchrun --nproc_per_node=8 train.py --data 'cc12m/{00000..01242}.tar' --labels tags/ --out runs/tagalign
    # one GPU reaching the same global batch by accumulation, or one CPU process
    python train.py --data 'cc12m/{00000..01242}.tar' --labels tags/ --out runs/1gpu --global-batch-size 4096
    python train.py --data-csv pairs.csv --image-root images/ --labels tags/ --out runs/cpu --batch-size 8
    # continue a stopped run exactly where it stopped
    python train.py ... --resume

--labels is the folder `parse_tags.py vocab` wrote (vocab.json, labels.pt). Samples whose key has no tags are
kept: they still train the contrastive loss. Checkpoints (out/ckpt.pt) hold the trainable state, optimizer,
step, RNG, data position and config; `tagalign.py --checkpoint out/ckpt.pt` loads them for inference.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import platform
import random
import sys
import tarfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import clip_model
import parse_tags
import tagalign


# ----------------------------------------------------------------------------------------------------------
# Data: raw records (key, image bytes, caption) -> shuffle buffer -> decode + augment, per "role"

def stable_seed(*parts):
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def tar_records(path, skipped):
    """(key, image bytes, caption) from an img2dataset tar, streaming. A truncated or corrupt tar ends the shard
    early and is counted in skipped['tar']; members missing their image or caption in skipped['member']."""
    current, parts = None, {}

    def flush():
        if current is not None:
            if "img" in parts and "txt" in parts:
                return current, parts["img"], parts["txt"]
            skipped["member"] += 1
        return None

    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                if key != current:
                    rec = flush()
                    if rec:
                        yield rec
                    current, parts = key, {}
                ext = ext.lower()
                if ext in ("jpg", "jpeg", "png", "webp"):
                    parts["img"] = tar.extractfile(member).read()
                elif ext == "txt":
                    parts["txt"] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped["tar"] += 1
        print(f"warning: {path}: {type(e).__name__}: {e}; rest of the shard skipped", file=sys.stderr)
    rec = flush()
    if rec:
        yield rec


def csv_records(path, image_root):
    """(key, image path, caption) rows of a CSV with columns key, image, caption (image relative to image_root)."""
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            yield row["key"], os.path.join(image_root, row["image"]), row["caption"]


class CaptionImages(torch.utils.data.IterableDataset):
    """Endless stream of (image, tokens, object ids, attribute ids, key, role, position) for one rank.

    The stream is split into world * workers "roles". With at least that many shards a role reads whole shards
    (the shard order reshuffled every epoch), else every role reads all files and keeps every n-th record. Each
    role shuffles raw records in a buffer, then decodes and augments; augmentation is seeded by the sample's key
    and epoch, so a sample looks the same whatever the world size. `start` maps role -> records already consumed,
    which are skipped (without decoding) to resume exactly; `role_offset` rotates roles over DataLoader workers so
    that the resumed loader continues the same round-robin batch order."""

    def __init__(self, files, labels, transform, rank=0, world=1, workers=0, shuffle_buffer=1000, seed=0,
                 image_root=None, start=None, role_offset=0):
        super().__init__()
        self.files, self.labels, self.transform = files, labels, transform
        self.rank, self.world, self.workers = rank, world, max(workers, 1)
        self.shuffle_buffer, self.seed, self.image_root = max(shuffle_buffer, 1), seed, image_root
        self.start, self.role_offset = dict(start or {}), role_offset

    def role(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        return self.rank * self.workers + (worker + self.role_offset) % self.workers

    def raw_stream(self, role, skipped):
        roles = self.world * self.workers
        by_file = len(self.files) >= roles
        epoch = 0
        while True:
            order = list(self.files)
            random.Random(stable_seed(self.seed, "files", epoch)).shuffle(order)
            mine = order[role::roles] if by_file else order
            index = 0
            for path in mine:
                records = csv_records(path, self.image_root) if path.endswith(".csv") else tar_records(path, skipped)
                for rec in records:
                    if by_file or index % roles == role:
                        yield epoch, rec
                    index += 1
            epoch += 1

    def __iter__(self):
        role = self.role()
        skipped = {"image": 0, "tar": 0, "member": 0}
        rng = random.Random(stable_seed(self.seed, "shuffle", role))
        buffer, position = [], 0
        for item in self.raw_stream(role, skipped):
            if len(buffer) < self.shuffle_buffer:  # fill the buffer, then emit a random element per new one
                buffer.append(item)
                continue
            j = rng.randrange(len(buffer))
            item, buffer[j] = buffer[j], item
            position += 1
            if position <= self.start.get(role, 0):
                continue  # consumed before the resume
            sample = self.decode(item, skipped)
            if sample is not None:
                yield (*sample, role, position, dict(skipped))

    def decode(self, item, skipped):
        from PIL import Image
        epoch, (key, image, caption) = item
        try:
            data = open(image, "rb").read() if isinstance(image, str) else image
            img = Image.open(io.BytesIO(data))
            img = img.convert("RGB")  # forces a full decode: truncated files fail here
        except Exception:
            skipped["image"] += 1
            return None
        state = torch.random.get_rng_state()
        torch.manual_seed(stable_seed(self.seed, "augment", key, epoch))
        x = self.transform(img)
        torch.random.set_rng_state(state)
        tags = self.labels.get(key) if self.labels is not None else None
        obj, attr = tags if tags is not None else (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        return x, clip_model.tokenize(caption)[0], obj, attr, key


def collate(batch):
    images, tokens, obj, attr, keys, roles, positions, skipped = zip(*batch)
    return (torch.stack(images), torch.stack(tokens), list(obj), list(attr), list(keys), list(roles),
            list(positions), list(skipped))


def multi_hot(index_lists, K, device):
    """List of index tensors -> (B, K) 0/1 float."""
    out = torch.zeros(len(index_lists), K, device=device)
    rows = torch.cat([torch.full((len(i),), r, dtype=torch.long) for r, i in enumerate(index_lists)])
    cols = torch.cat(index_lists) if index_lists else torch.zeros(0, dtype=torch.long)
    out[rows.to(device), cols.to(device)] = 1
    return out


def train_transform(image_size, augment, min_crop_scale=0.08):
    """SPEC section 5: RandomResizedCrop(0.08-1, bilinear), flip 0.5, RandAugment m9, ImageNet normalisation,
    RandomErasing 0.25. (torchvision's RandAugment has no magnitude std; timm's mstd 0.5 is not reproduced.)"""
    from torchvision import transforms as T
    norm = [T.ToTensor(), T.Normalize(clip_model.IMAGENET_MEAN, clip_model.IMAGENET_STD)]
    if not augment:
        return T.Compose([T.Resize(image_size), T.CenterCrop(image_size)] + norm)
    return T.Compose([T.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=T.InterpolationMode.BILINEAR),
                      T.RandomHorizontalFlip(0.5), T.RandAugment(num_ops=2, magnitude=9)] + norm
                     + [T.RandomErasing(p=0.25)])


# ----------------------------------------------------------------------------------------------------------
# Training

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train TagAlign (torchrun for several processes)")
    p.add_argument("--data", nargs="*", default=[], help="webdataset tar shards (globs and {a..b} braces)")
    p.add_argument("--data-csv", default=None, help="alternative to --data: CSV with columns key,image,caption")
    p.add_argument("--image-root", default=".", help="folder the CSV's image paths are relative to")
    p.add_argument("--labels", required=True, help="folder with vocab.json and labels.pt from parse_tags.py")
    p.add_argument("--clip", default="ViT-B/16", help="frozen CLIP: checkpoint path or model name")
    p.add_argument("--out", required=True, help="run folder: ckpt.pt, log.txt, tag embedding cache")
    p.add_argument("--steps", type=int, default=30000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=512, help="images per process per micro-step")
    p.add_argument("--global-batch-size", type=int, default=0,
                   help="images per optimizer step over all processes (0: batch-size x processes); reached by accumulation")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate at global batch 4096 (scaled linearly)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (not on 1-D params and biases)")
    p.add_argument("--grad-clip", type=float, default=5.0, help="gradient clipping at this global norm")
    p.add_argument("--tag-loss", default="balanced", choices=["balanced", "plain"],
                   help="balanced softmax (paper, Eq. 4) or plain softmax (authors' code)")
    p.add_argument("--attribute-weight", type=float, default=1.0, help="weight of the attribute tag loss (0: objects only)")
    p.add_argument("--itc-weight", type=float, default=1.0, help="lambda of Eq. 6 (0: no contrastive loss)")
    p.add_argument("--surgery-layers", type=int, default=6, help="CLIP Surgery on the last N vision blocks")
    p.add_argument("--image-size", type=int, default=224, help="training crop size")
    p.add_argument("--no-augment", action="store_true", help="resize + centre crop only (no SPEC augmentation)")
    p.add_argument("--min-crop-scale", type=float, default=0.08, help="smallest area share of RandomResizedCrop")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype; auto: bf16 on GPU, fp32 on CPU; fp16 uses a GradScaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("--shuffle-buffer", type=int, default=2000, help="samples in each worker's shuffle buffer")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and init")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from out/ckpt.pt")
    return p.parse_args(argv)


def load_label_data(folder):
    """vocab.json + labels.pt, checked against each other; a clear message if anything is missing or mismatched."""
    vocab_path = os.path.join(folder, "vocab.json")
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"{vocab_path} not found: build it with `python parse_tags.py vocab --out {folder}`")
    vocab = json.load(open(vocab_path, encoding="utf-8"))
    labels = parse_tags.LabelTable(os.path.join(folder, "labels.pt"))
    for kind in ("objects", "attributes"):
        if labels.tags[kind] != [e["tag"] for e in vocab[kind]]:
            raise ValueError(f"{folder}: labels.pt and vocab.json disagree on the {kind} vocabulary; "
                             "rebuild both with `parse_tags.py vocab`")
    if not vocab["objects"]:
        raise ValueError(f"{vocab_path} has no object tags")
    return vocab, labels


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def main(argv=None):
    args = parse_args(argv)
    # ---- one DDP block: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python train.py` is one process
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world, device):
    master = rank == 0
    global_batch = args.global_batch_size or args.batch_size * world
    if global_batch % (args.batch_size * world):
        raise ValueError(f"--global-batch-size {global_batch} must be a multiple of batch-size x processes "
                         f"({args.batch_size} x {world})")
    accum = global_batch // (args.batch_size * world)
    lr = args.lr * global_batch / 4096
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")

    vocab, labels = load_label_data(args.labels)
    files = ([args.data_csv] if args.data_csv else parse_tags.input_files(args.data)) if (args.data or args.data_csv) else None
    if not files:
        raise ValueError("no training data: pass --data SHARDS or --data-csv FILE")

    torch.manual_seed(args.seed)
    clip = clip_model.load(args.clip, device=device)
    raw_model = tagalign.TagAlign(clip, tagalign.TagAlignConfig(surgery_layers=args.surgery_layers)).to(device)
    tags = {k: [e["tag"] for e in vocab[k]] for k in ("objects", "attributes")}
    emb = {k: tagalign.tag_embeddings(clip, tags[k], os.path.join(args.out, f"tag_embeddings_{k}.pt") if master else None).to(device)
           for k in ("objects", "attributes") if tags[k]}
    log_freq = {k: torch.tensor([max(e["freq"], 1e-12) for e in vocab[k]], device=device).log()
                if args.tag_loss == "balanced" and vocab[k] else None for k in ("objects", "attributes")}

    decay = [p for n, p in raw_model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in raw_model.named_parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999), eps=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    step, start, role_offset, skipped_total = 0, {}, 0, {"image": 0, "tar": 0, "member": 0}
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ckpt["data"]["world"] != world or ckpt["data"]["workers"] != args.workers or ckpt["data"]["batch"] != args.batch_size:
            raise ValueError("--resume needs the same number of processes, --workers and --batch-size as the run "
                             f"that wrote {ckpt_path}: {ckpt['data']}")
        raw_model.load_trainable_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, start, role_offset = ckpt["step"], ckpt["data"]["start"], ckpt["data"]["role_offset"]
        skipped_total = ckpt["data"]["skipped"]
        random.setstate(ckpt["rng"]["python"])
        torch.random.set_rng_state(ckpt["rng"]["torch"])
        print0(f"resumed from {ckpt_path} at step {step}")

    model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else raw_model
    if args.compile:
        model = torch.compile(model)

    transform = train_transform(args.image_size, not args.no_augment, args.min_crop_scale)
    dataset = CaptionImages(files, labels, transform, rank, world,
                            args.workers, args.shuffle_buffer, args.seed, args.image_root, start, role_offset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=collate, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
    batches = iter(loader)
    consumed = dict(start)  # role -> records consumed, for the checkpoint
    worker_skipped = {}  # role -> that worker's skip counters since this (re)start
    micro_batches = step * accum  # batches this rank has taken from loaders since the run began (sets role_offset)

    log = open(os.path.join(args.out, "log.txt"), "a", encoding="utf-8") if master else None
    if master:
        head = {"args": vars(args), "world": world, "global_batch": global_batch, "accumulation": accum, "lr": lr,
                "precision": precision, "torch": torch.__version__, "python": platform.python_version(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"}
        log.write(f"# start {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(head)}\n")
        log.flush()
        print0(f"world {world}, global batch {global_batch} ({args.batch_size} x {world} x {accum} accumulation), "
               f"lr {lr:g}, {precision}, {len(tags['objects'])} object and {len(tags['attributes'])} attribute tags")

    def save():
        gathered = [None] * world
        state = {"consumed": consumed, "skipped": worker_skipped}
        if world > 1:
            dist.all_gather_object(gathered, state)
        else:
            gathered = [state]
        if not master:
            return
        all_consumed = {r: n for g in gathered for r, n in g["consumed"].items()}
        total_skipped = {k: skipped_total[k] + sum(s[k] for g in gathered for s in g["skipped"].values())
                         for k in skipped_total}
        tagalign.save_checkpoint(
            ckpt_path, raw_model, args.clip, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
            rng={"python": random.getstate(), "torch": torch.random.get_rng_state()}, args=vars(args),
            data={"start": all_consumed, "role_offset": micro_batches % max(args.workers, 1),
                  "world": world, "workers": args.workers, "batch": args.batch_size, "skipped": total_skipped})

    raw_model.train()
    t_log, images_seen = time.time(), 0
    sums = {}
    while step < args.steps:
        for micro in range(accum):
            images, tokens, obj, attr, keys, roles, positions, skipped = next(batches)
            micro_batches += 1
            for r, pos, s in zip(roles, positions, skipped):
                consumed[r] = max(consumed.get(r, 0), pos)
                worker_skipped[r] = s
            images = images.to(device, non_blocking=True)
            sync = micro == accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else model.no_sync()), \
                    torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                caption_emb = raw_model.encode_text(tokens.to(device))
                _, z = model(images)
                obj_labels = multi_hot(obj, len(tags["objects"]), device)
                attr_labels = multi_hot(attr, len(tags["attributes"]), device) if tags["attributes"] else None
                loss, terms = tagalign.tagalign_loss(
                    raw_model, z, caption_emb, obj_labels, emb["objects"], attr_labels, emb.get("attributes"),
                    log_freq["objects"], log_freq["attributes"], args.attribute_weight, args.itc_weight)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1} (rank {rank}); "
                                         f"batch keys: {keys}")
            scaler.scale(loss / accum).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() / accum
            images_seen += images.shape[0] * world
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(decay + no_decay, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % args.log_every == 0 or step == args.steps:
            values = torch.tensor([sums.get(k, 0.0) for k in ("obj", "attr", "itc")] +
                                  [sum(s[k] for s in worker_skipped.values()) for k in skipped_total], device=device)
            if world > 1:
                dist.all_reduce(values)
            n = step % args.log_every or args.log_every
            obj_l, attr_l, itc_l = (values[:3] / world / n).tolist()
            skipped_now = {k: skipped_total[k] + int(v) for k, v in zip(skipped_total, values[3:].tolist())}
            tau_tag, tau_itc = raw_model.temperatures()
            rate = images_seen / (time.time() - t_log)
            mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
            line = (f"step {step}/{args.steps} obj {obj_l:.4f} attr {attr_l:.4f} itc {itc_l:.4f} "
                    f"tau_tag {tau_tag.item():.2f} tau_itc {tau_itc.item():.2f} lr {lr:.3g} img/s {rate:.1f} "
                    f"gpu_mem {mem:.2f}GiB skipped img {skipped_now['image']} tar {skipped_now['tar']} "
                    f"member {skipped_now['member']}")
            print0(line)
            if master:
                log.write(line + "\n")
                log.flush()
            sums, t_log, images_seen = {}, time.time(), 0
        if step % args.save_every == 0 or step == args.steps:
            save()
    if master:
        log.close()
    return raw_model


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
