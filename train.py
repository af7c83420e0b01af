"""
Train TagAlign (paper Sec. 3-4; docs/training.md): the projector on frozen CLIP Surgery features,
with the multi-tag losses (objects and attributes, Eq. 1-4) and the image-text contrastive loss
(Eq. 5), L = L_tag + lambda L_itc (Eq. 6).

Run:
    # 8 GPUs (paper: batch 512 per GPU, 30,000 steps, lr 1e-3 x global batch / 4096)
    torchrun --nproc_per_node=8 train.py --data 'cc12m/{00000..01242}.tar' --labels tags/ \
        --out runs/tagalign --workers 12
        # 12 x ~260 img/s per worker feed ~3,100 img/s per GPU (docs/training.md)
    # one GPU reaching the same global batch by accumulation (exact for the tag losses and the lr;
    # the contrastive loss sees each micro-batch's negatives only: see the end of --help), or one
    # CPU process
    python train.py --data 'cc12m/{00000..01242}.tar' --labels tags/ --out runs/1gpu \
        --global-batch-size 4096
    python train.py --data-csv pairs.csv --image-root images/ --labels tags/ --out runs/cpu \
        --batch-size 8
    # continue a stopped run exactly where it stopped
    python train.py ... --resume

    # paper Table 3's ablations: switch a term off (its temperature is then frozen, as DDP needs)
    torchrun --nproc_per_node=8 train.py ... --itc-weight 0          # tag losses only
    torchrun --nproc_per_node=8 train.py ... --attribute-weight 0    # objects + ITC

--labels is the folder `parse_tags.py vocab` (or `import`) wrote (vocab.json, labels.pt). A sample
whose key has no row there is skipped, as the authors' dataset does (counted as 'unlisted';
--keep-unlisted trains it on the contrastive loss); a listed sample without tags still trains the
contrastive loss. Every log line gives the share of samples with tags and with their key in
labels.pt; labels that match no sample stop the run. The tag losses average over every image of the
global batch (authors' code; --tag-average tagged: over tagged ones). Non-finite losses are detected
on the device and checked at log and save steps: every rank stops together, naming the step and the
batch keys. Checkpoints (out/ckpt.pt) hold the trainable state, optimizer, step, RNG, data position
and what an exact resume needs (processes, workers, batch sizes, seed, shuffle buffer, file list, a
fingerprint of the labels), all checked on --resume; `tagalign.py --checkpoint out/ckpt.pt` loads
them.
"""
import argparse
import contextlib
import csv
import hashlib
import io
import json
import math
import os
import platform
import random
import sys
import tarfile
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import clip_model
import ddp
import tagalign
from labels import LabelTable, input_files


# --------------------------------------------------------------------------------------------------
# Data: records (key, image, caption) -> shuffle buffer -> decode + augment to uint8, per "role";
# the normalisation and the random erasing run on the device, batched (normalise_and_erase)

# what the data stream skips, counted in every log line
SKIPS = ("image", "tar", "member", "unlisted")


def stable_seed(*parts):
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(),
                                          digest_size=8).digest(), "little") >> 1


def plain_tar(f):
    """Is the open file f an uncompressed tar (seekable to a record)? The POSIX magic of its first
    header."""
    f.seek(0)
    return f.read(512)[257:262] == b"ustar"


def tar_records(path, skipped, offset=0):
    """(key, image bytes, caption, start, next) of an img2dataset tar, streaming from byte `offset`
    (a record's first header) on. start: the record's own offset; next: the offset of the record
    after it (None at the end of the file), where a resume seeks to. A plain tar is seeked; a
    compressed one is decompressed from its start and the records before `offset` passed over. A
    truncated or corrupt tar ends the shard early and is counted in skipped['tar']; members missing
    their image or caption in skipped['member']."""
    current, start, parts = None, None, {}
    try:
        with open(path, "rb") as f:
            plain = plain_tar(f)
            base = offset if plain else 0
            f.seek(base)
            with tarfile.open(fileobj=f, mode="r|" if plain else "r|*") as tar:
                for member in tar:
                    # the member's header, in the file (or decompressed stream)
                    where = base + member.offset
                    if where < offset or not member.isfile():
                        continue
                    key, _, ext = member.name.rpartition(".")
                    if key != current:
                        if "img" in parts and "txt" in parts:
                            yield current, parts["img"], parts["txt"], start, where
                        elif current is not None:
                            skipped["member"] += 1
                        current, start, parts = key, where, {}
                    ext = ext.lower()
                    if ext in ("jpg", "jpeg", "png", "webp"):
                        parts["img"] = tar.extractfile(member).read()
                    elif ext == "txt":
                        parts["txt"] = (tar.extractfile(member).read()
                                        .decode("utf-8", errors="replace"))
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped["tar"] += 1
        print(f"warning: {path}: {type(e).__name__}: {e}; rest of the shard skipped",
              file=sys.stderr)
    if "img" in parts and "txt" in parts:
        yield current, parts["img"], parts["txt"], start, None
    elif current is not None:
        skipped["member"] += 1


CSV_COLUMNS = ("key", "image", "caption")


def csv_records(path, image_root, offset=0):
    """(key, image path, caption, start, next) of the rows of a CSV with columns key, image, caption
    (image relative to image_root), from byte `offset` (a row's start) on; start/next as in
    tar_records."""
    with open(path, "rb") as f:
        header = next(csv.reader([f.readline().decode("utf-8")]))
        column = [header.index(c) for c in CSV_COLUMNS]
        f.seek(max(offset, f.tell()))
        # the reader pulls one line at a time
        lines = iter(lambda: f.readline().decode("utf-8"), "")
        reader, start = csv.reader(lines), f.tell()
        for row in reader:
            end = f.tell()
            if row:
                key, image, caption = (row[i] for i in column)
                yield key, os.path.join(image_root, image), caption, start, end
            start = end


def check_csv(path, image_root):
    """Before anything expensive: the CSV exists, has the columns key, image, caption (parse_tags.py
    keys its rows by the same 'key' column), and its first image is where --image-root says."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data-csv {path} not found")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} lacks the column(s) {missing} (has {reader.fieldnames}); "
                             "train.py reads key,image,caption, and parse_tags.py keys CSV rows by "
                             "the same 'key' column")
        first = next(reader, None)
    if first is None:
        raise ValueError(f"{path} has no rows")
    image = os.path.join(image_root, first["image"])
    if not os.path.isfile(image):
        raise FileNotFoundError(f"the first image of {path}, {image}, does not exist: "
                                "check --image-root")


class CaptionImages(torch.utils.data.IterableDataset):
    """Endless stream of (uint8 image, erase box, tokens, object ids, attribute ids, key, found,
    where) for one rank.

    The stream is split into world * workers "roles". With at least that many shards a role reads
    whole shards (the shard order reshuffled every epoch), else every role reads all files and keeps
    every n-th record. A sample whose key has no row in labels.pt is skipped (counted as 'unlisted')
    unless keep_unlisted. Each role shuffles raw records in a buffer (the slot emitted at position p
    is a hash of (seed, role, p)), then decodes and augments; augmentation is seeded by the sample's
    key and epoch, so a sample looks the same whatever the world size. A record's location is
    (epoch, file number, byte offset). Each sample carries `where`: the buffer slots refilled since
    the last sample, the stream's next read position and the skip counts; from it StreamPositions
    (in the main process) knows each role's buffer as locations. `start` maps role -> that state: a
    resume reads again only the records in the buffer, then seeks to the next read position
    (constant time at any step). `role_offset` rotates roles over DataLoader workers so that the
    resumed loader continues the same round-robin batch order."""

    MAX_FAILURES = 1000  # consecutive undecodable images: the data is wrong, not a few files
    # samples without a labels.pt row before any with one: a warning that says why
    MAX_UNLISTED = 10000

    def __init__(self, files, labels, transform, rank=0, world=1, workers=0, shuffle_buffer=1000,
                 seed=0, image_root=None, start=None, role_offset=0, csv_input=False,
                 keep_unlisted=False):
        super().__init__()
        self.csv_input, self.keep_unlisted = csv_input, keep_unlisted
        self.files, self.labels, self.transform = files, labels, transform
        self.rank, self.world, self.workers = rank, world, max(workers, 1)
        self.shuffle_buffer, self.seed, self.image_root = max(shuffle_buffer, 1), seed, image_root
        self.start, self.role_offset = dict(start or {}), role_offset

    def role(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        return self.rank * self.workers + (worker + self.role_offset) % self.workers

    def records(self, file, offset, skipped):
        path = self.files[file]
        if self.csv_input:
            return csv_records(path, self.image_root, offset)
        return tar_records(path, skipped, offset)

    def raw_stream(self, role, skipped, at=(0, 0, 0, 0)):
        """This role's records from the read position at = (epoch, file in the epoch's order, byte
        offset, records seen in the epoch) on: ((epoch, file, offset) of the record, the next read
        position, key, image, caption)."""
        roles = self.world * self.workers
        by_file = len(self.files) >= roles
        epoch, k, offset, index = at
        found_any = False  # a sample with a labels row since this (re)start
        while True:
            order = list(range(len(self.files)))
            random.Random(stable_seed(self.seed, "files", epoch)).shuffle(order)
            mine = order[role::roles] if by_file else order
            whole_pass, kept, unlisted = (k, offset, index) == (0, 0, 0), 0, None
            while k < len(mine):
                for key, image, caption, start, after in self.records(mine[k], offset, skipped):
                    index += 1
                    if not (by_file or (index - 1) % roles == role):
                        continue
                    if (not self.keep_unlisted and self.labels is not None
                            and self.labels.row(key) is None):
                        skipped["unlisted"] += 1
                        unlisted = unlisted or key
                        # says so, goes on
                        if not found_any and skipped["unlisted"] == self.MAX_UNLISTED:
                            print(f"warning: worker {role}: " + self.no_labels_message(
                                f"the first {self.MAX_UNLISTED} read since the start", unlisted)
                                + "; a whole pass without one stops the run", file=sys.stderr)
                        continue
                    kept += 1
                    found_any = True
                    next_at = ((epoch, k, after, index) if after is not None
                               else (epoch, k + 1, 0, index))
                    yield (epoch, mine[k], start), next_at, key, image, caption
                k, offset = k + 1, 0
            if whole_pass and kept == 0:
                # else this loop would spin forever and training would wait
                if unlisted:
                    raise ValueError(self.no_labels_message(
                        f"a whole pass over {len(mine)} file(s)", unlisted))
                raise RuntimeError(f"a whole pass over {len(mine)} file(s) gave worker {role} "
                                   f"no complete sample (skipped so far: {skipped}); "
                                   "check the data files")
            epoch, k, offset, index = epoch + 1, 0, 0, 0

    def no_labels_message(self, what, data_key):
        return (f"no sample of {what} has its key in labels.pt: data keys look like {data_key!r}, "
                f"labels.pt keys like {example_label_key(self.labels)!r}. Parse the same files you "
                "train on (tar keys are img2dataset's sample keys; CSV rows are keyed by their "
                "'key' column), or pass --keep-unlisted to train them on the contrastive loss")

    def read_at(self, locations):
        """The records at these locations (epoch, file, offset), read again for a resumed shuffle
        buffer, in their order. A plain tar or a CSV is seeked to each; a compressed tar is
        decompressed once, from its first location on."""
        skipped = dict.fromkeys(SKIPS, 0)  # counted when they were first read
        found = {}
        for file in sorted({f for _, f, _ in locations}):
            wanted = sorted({o for _, f, o in locations if f == file})
            with open(self.files[file], "rb") as f:
                seekable = self.csv_input or plain_tar(f)
            if seekable:
                found.update(((file, o), next(self.records(file, o, skipped))) for o in wanted)
                continue
            missing = set(wanted)
            for record in self.records(file, wanted[0], skipped):
                if record[3] in missing:
                    found[(file, record[3])] = record
                    missing.discard(record[3])
                    if not missing:
                        break
        return [(tuple(loc), None, *found[(loc[1], loc[2])][:3]) for loc in locations]

    def __iter__(self):
        role = self.role()
        # since this (re)start; the checkpoint holds the earlier total
        skipped = dict.fromkeys(SKIPS, 0)
        state = self.start.get(role)
        if state is None:
            position, stream = 0, self.raw_stream(role, skipped)
            buffer = [item for _, item in zip(range(self.shuffle_buffer), stream)]
        else:  # the only records read twice: the ones still in the buffer
            position, stream = state["position"], self.raw_stream(role, skipped, state["next"])
            buffer = self.read_at(state["buffer"])
        init, trail, failures = [item[0] for item in buffer], [], 0
        for new in stream:
            j = stable_seed(self.seed, "shuffle", role, position) % len(buffer)
            item, buffer[j] = buffer[j], new
            position += 1
            trail.append((j, new[0]))
            sample = self.decode(item, skipped)
            if sample is None:
                failures += 1
                if failures >= self.MAX_FAILURES:
                    raise RuntimeError(f"{failures} images in a row could not be decoded "
                                       f"(last: key {item[2]!r}); "
                                       "check the data (or --image-root for a CSV)")
                continue
            failures = 0
            where = {"role": role, "position": position, "init": init, "trail": trail,
                     "next": new[1], "skipped": dict(skipped)}
            init, trail = None, []
            yield (*sample, where)

    def decode(self, item, skipped):
        from PIL import Image
        (epoch, _, _), _, key, image, caption = item
        crop, augment = self.transform
        # the same augmentation at any world size
        with seeded(stable_seed(self.seed, "augment", key, epoch)):
            try:
                data = open(image, "rb").read() if isinstance(image, str) else image
                img = decode_and_crop(Image.open(io.BytesIO(data)), crop)
            except Exception:  # a corrupt, truncated, huge or missing image: PIL raises many kinds
                skipped["image"] += 1
                return None
            x = augment(img)  # (3, S, S) uint8
            box = erase_box(*x.shape[1:]) if crop is not None else (0, 0, 0, 0)
        # the noise's seed, for the device
        box = (*box, stable_seed(self.seed, "erase", key, epoch))
        tags = self.labels.get(key) if self.labels is not None else None
        empty = torch.zeros(0, dtype=torch.long)
        obj, attr = tags if tags is not None else (empty, empty)
        return x, box, clip_model.tokenize(caption)[0], obj, attr, key, tags is not None


def decode_and_crop(img, crop=None):
    """Decode a lazily opened image to RGB and apply timm's RandomResizedCrop `crop` (None: decode
    only). The box is drawn first, with timm's own random calls; a JPEG whose box is at least twice
    the output's size in each dimension is decoded at 1/2, 1/4 or 1/8 of its size (PIL's draft:
    libjpeg's DCT scaling; 1.4x the img/s on 800-px JPEGs), the box scaled with it; otherwise crop
    and resize are timm's exactly."""
    from PIL import Image
    if crop is None:
        img.load()  # a full decode: truncated files fail here
        return img if img.mode == "RGB" else img.convert("RGB")
    top, left, h, w = crop.get_params(img, crop.scale, crop.ratio)
    (out_h, out_w), (W, H) = crop.size, img.size
    reduce = min(w // out_w, h // out_h)
    if reduce >= 2 and img.format == "JPEG":
        # the smallest DCT scale keeping this size
        img.draft("RGB", (-(-W // reduce), -(-H // reduce)))
        sx, sy = W / img.width, H / img.height
        box = (left / sx, top / sy, (left + w) / sx, (top + h) / sy)
    else:
        box = None
    img.load()
    img = img if img.mode == "RGB" else img.convert("RGB")
    if box is not None:
        return img.resize((out_w, out_h), Image.BILINEAR, box=box)
    return img.crop((left, top, left + w, top + h)).resize((out_w, out_h), Image.BILINEAR)


class StreamPositions:
    """Where each data role of this rank stands, for the checkpoint, rebuilt in the main process
    from the `where` each sample carries: the role's shuffle buffer as record locations, its next
    read position and sample count, and its skip counts since this (re)start. Only this rank's roles
    (rank * workers + w): a copy of the others' would be stale and overwrite their real positions at
    the next save."""

    def __init__(self, start, rank, workers):
        self.roles = {r: {**s, "buffer": list(s["buffer"])} for r, s in start.items()
                      if r // workers == rank}
        self.skipped = {}  # role -> its skip counts since this (re)start

    def update(self, where):
        state = self.roles.setdefault(where["role"], {})
        # the role's first sample since the (re)start: its whole buffer
        if where["init"] is not None:
            state["buffer"] = list(where["init"])
        for slot, location in where["trail"]:  # the slots refilled since the role's previous sample
            state["buffer"][slot] = location
        state["position"], state["next"] = where["position"], where["next"]
        self.skipped[where["role"]] = where["skipped"]


@contextlib.contextmanager
def seeded(seed):
    """Seed every generator an augmentation draws from (timm uses Python's random and NumPy's,
    torchvision torch's CPU one), restoring them afterwards (CUDA generators are not touched)."""
    import numpy as np
    states = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


ERASE = {"p": 0.25, "area": (0.02, 1 / 3), "log_aspect": (math.log(0.3), math.log(1 / 0.3))}


def erase_box(height, width, p=ERASE["p"], area=ERASE["area"], log_aspect=ERASE["log_aspect"]):
    """The box of timm's RandomErasing (one box, the authors' re_prob 0.25), drawn from Python's
    random in timm's order so that the same seed erases the same box: (top, left, h, w), h = 0 for
    none."""
    if random.random() > p:
        return 0, 0, 0, 0
    for _ in range(10):
        target = random.uniform(*area) * height * width
        aspect = math.exp(random.uniform(*log_aspect))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if w < width and h < height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    return 0, 0, 0, 0


def normalise_and_erase(images, boxes, generator):
    """On the device, for a batch: uint8 (B, 3, S, S) -> ImageNet-normalised float (timm's ToTensor
    and Normalize), then each sample's erase box filled with N(0, 1) noise (timm's pixel-mode
    RandomErasing, in normalised space). boxes: a host list of (top, left, h, w, noise seed) per
    sample, h = 0 for none; the noise is seeded per sample, so a sample looks the same at any world
    size (generator None: torch's default one, unseeded). Shipping uint8 crops from the workers
    costs a quarter of float32's shared memory."""
    x = images.float().div(255)
    x = torch.stack([(x[:, c] - m) / s for c, (m, s) in  # Python scalars: no host-to-device copy
                     enumerate(zip(clip_model.IMAGENET_MEAN, clip_model.IMAGENET_STD))],
                    1)  # (B, 3, S, S)
    for i, (top, left, h, w, seed) in enumerate(boxes):  # host values: no device read
        if h:
            if generator is not None:
                generator.manual_seed(seed)
            x[i, :, top:top + h, left:left + w] = torch.randn((3, h, w), generator=generator,
                                                              device=x.device)
    return x


def sparse_tags(index_lists):
    """Per-sample tag indices -> (rows, cols) of the ones of the (B, K) multi-hot matrix: two flat
    int64 tensors that DataLoader pins and that go to the GPU without a blocking copy (multi_hot
    builds the matrix there)."""
    rows = torch.cat([torch.full((len(i),), r, dtype=torch.long)
                      for r, i in enumerate(index_lists)])
    cols = torch.cat(list(index_lists)).long() if index_lists else torch.zeros(0, dtype=torch.long)
    return rows, cols


def collate(batch):
    images, boxes, tokens, obj, attr, keys, found, where = zip(*batch)
    return {"images": torch.stack(images), "boxes": list(boxes), "tokens": torch.stack(tokens),
            "keys": list(keys), "obj": sparse_tags(obj), "attr": sparse_tags(attr),
            # host-side counts (no GPU read needed): images with object / attribute tags, keys found
            # in labels.pt
            "n_obj": sum(len(o) > 0 for o in obj), "n_attr": sum(len(a) > 0 for a in attr),
            "n_tagged": sum(len(o) + len(a) > 0 for o, a in zip(obj, attr)), "n_found": sum(found),
            "where": list(where)}


def multi_hot(rows, cols, batch, K, device):
    """(rows, cols) of the ones -> (batch, K) 0/1 float, built on `device` (non-blocking copies of
    the indices)."""
    out = torch.zeros(batch, K, device=device)
    index = (rows.to(device, non_blocking=True), cols.to(device, non_blocking=True))
    # a host 1 would be copied with a sync
    return out.index_put_(index, torch.ones((), device=device))


def train_transform(image_size, augment, min_crop_scale=0.08, auto_augment="rand-m9-mstd0.5-inc1"):
    """The authors' `img_aug` exactly, as (crop, rest): timm's create_transform(is_training=True)
    with RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bilinear) (`crop`, applied by
    decode_and_crop while it decodes), then flip 0.5, RandAugment 'rand-m9-mstd0.5-inc1' (2 ops from
    timm's 15 'increasing' ops, each applied with probability 0.5, magnitude ~ N(9, 0.5) on a 0-10
    scale, geometric ops filled with the mean colour) up to a uint8 tensor (`rest`); ImageNet
    normalisation and RandomErasing p 0.25 with per-pixel N(0, 1) values follow on the device
    (normalise_and_erase, the box drawn by erase_box after `rest`). auto_augment: another timm
    policy string, or "none". Without augmentation: (None, resize + centre crop), nothing erased."""
    from torchvision import transforms as T
    if not augment:
        return None, T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    from timm.data import create_transform
    transform = create_transform(image_size, is_training=True, scale=(min_crop_scale, 1.0),
                                 ratio=(3 / 4, 4 / 3), hflip=0.5, interpolation="bilinear",
                                 auto_augment=None if auto_augment == "none" else auto_augment,
                                 color_jitter=None,
                                 use_prefetcher=True)  # uint8 out, as timm's own prefetcher
    return transform.transforms[0], T.Compose(transform.transforms[1:])


# --------------------------------------------------------------------------------------------------
# Training

ACCUMULATION = (
    "Gradient accumulation (--global-batch-size > batch-size x processes) reproduces, for the "
    "global batch: the learning rate (scaled to the global batch), the tag losses exactly (they "
    "average over the whole step's images, so their gradient is that of one big batch), clipping "
    "and the optimizer step. It does NOT reproduce the contrastive loss: each micro-batch's "
    "InfoNCE sees only its own batch-size x processes negatives, and the step's ITC is the mean "
    "of the micro-batches' values. The step's micro-batches are held in host memory together "
    "(accumulation x batch-size images).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train TagAlign (torchrun for several processes)",
                                epilog=ACCUMULATION)
    p.add_argument("--data", nargs="*", default=[],
                   help="webdataset tar shards (globs and {a..b} braces)")
    p.add_argument("--data-csv", default=None,
                   help="alternative to --data: CSV with columns key,image,caption (parse_tags.py "
                        "keys its rows by the same 'key' column)")
    p.add_argument("--image-root", default=".", help="folder the CSV's image paths are relative to")
    p.add_argument("--keep-unlisted", action="store_true",
                   help="also train samples whose key has no row in labels.pt (contrastive loss "
                        "only); by default they are skipped, as the authors' dataset does, and "
                        "counted ('unlisted' in the log)")
    p.add_argument("--labels", required=True,
                   help="folder with vocab.json and labels.pt from parse_tags.py")
    p.add_argument("--clip", default="ViT-B/16",
                   help="frozen CLIP: a checkpoint path (OpenAI or open_clip) or a "
                        f"model name ({', '.join(clip_model.MODELS)})")
    p.add_argument("--clip-act", default="auto", choices=sorted(clip_model.ACTIVATIONS),
                   help=clip_model.ACTIVATION_HELP)
    p.add_argument("--out", required=True, help="run folder: ckpt.pt, log.txt, tag embedding cache")
    p.add_argument("--steps", type=int, default=30000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=512, help="images per process per micro-step")
    p.add_argument("--global-batch-size", type=int, default=0,
                   help="images per optimizer step over all processes (0: batch-size x processes); "
                        "reached by accumulation, which is exact for the tag losses but not for "
                        "the contrastive negatives (see the note at the end of --help)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="learning rate at global batch 4096 (scaled linearly); "
                        "a new value takes effect on --resume")
    p.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (authors: not on 1-D params and biases; the 0-d gates "
                        "and temperatures are decayed)")
    p.add_argument("--no-decay-scalars", action="store_true",
                   help="exempt the 0-d gates and temperatures from weight decay too "
                        "(the authors decay them)")
    p.add_argument("--grad-clip", type=float, default=5.0,
                   help="gradient clipping at this global norm")
    p.add_argument("--dist-timeout", type=float, default=60,
                   help="minutes a process may wait in a collective for the others "
                        "(torch's NCCL default is 10): the first process of a node downloads the "
                        "CLIP while the others wait")
    p.add_argument("--tag-loss", default="balanced", choices=tagalign.TAG_LOSSES,
                   help="balanced softmax (paper, Eq. 4), plain softmax (authors' code), or paper "
                        "Table 6's long-tail alternatives: weighted softmax, focal, asymmetric "
                        "(tagalign.tag_loss)")
    p.add_argument("--tag-average", default="batch", choices=["batch", "tagged"],
                   help="average the tag losses over every image of the global batch, untagged "
                        "ones adding 0 (authors' code, default) or over the tagged images only")
    p.add_argument("--object-weight", type=float, default=1.0,
                   help="weight of the object tag loss (0: off)")
    p.add_argument("--attribute-weight", type=float, default=1.0,
                   help="weight of the attribute tag loss (0: objects only)")
    p.add_argument("--itc-weight", type=float, default=1.0,
                   help="lambda of Eq. 6 (0: no contrastive loss)")
    p.add_argument("--surgery-layers", type=int, default=None,
                   help="CLIP Surgery on the last N vision blocks "
                        "(default: the last half, 6 of ViT-B's 12)")
    p.add_argument("--image-size", type=int, default=None,
                   help="training crop size "
                        "(default: the CLIP's input size, 224; 336 for ViT-L/14@336px)")
    p.add_argument("--no-augment", action="store_true",
                   help="resize + centre crop only (no augmentation)")
    p.add_argument("--min-crop-scale", type=float, default=0.08,
                   help="smallest area share of RandomResizedCrop")
    p.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1",
                   help="timm RandAugment policy (authors' default), or 'none' (e.g. for data "
                        "whose captions name colours that colour-changing ops would contradict, "
                        "as in demo.py)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast dtype; auto: bf16 on GPU, fp32 on CPU; fp16 uses a GradScaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA check: any host-device synchronisation inside a training step raises "
                        "(log and save steps excluded; benchmarks/gpu_check.sh uses it)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")
    p.add_argument("--shuffle-buffer", type=int, default=2000,
                   help="samples in each worker's shuffle buffer")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and init")
    p.add_argument("--log-every", type=int, default=10,
                   help="steps between log lines (and non-finite checks)")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from out/ckpt.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh even if out/ckpt.pt exists (it is replaced)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "log_every", "save_every", "shuffle_buffer", "image_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or args.global_batch_size < 0:
        p.error("--workers and --global-batch-size cannot be negative")
    if min(args.object_weight, args.attribute_weight, args.itc_weight) < 0:
        p.error("loss weights cannot be negative")
    if not (args.object_weight or args.attribute_weight or args.itc_weight):
        p.error("every loss weight is 0: nothing to train")
    if args.data and args.data_csv:
        p.error("pass --data (tar shards) or --data-csv, not both")
    return args


def load_label_data(folder):
    """vocab.json + labels.pt, checked against each other; a clear message if anything is missing or
    mismatched."""
    vocab_path = os.path.join(folder, "vocab.json")
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"{vocab_path} not found: "
                                f"build it with `python parse_tags.py vocab --out {folder}`")
    vocab = json.load(open(vocab_path, encoding="utf-8"))
    labels = LabelTable(os.path.join(folder, "labels.pt"))
    for kind in ("objects", "attributes"):
        if labels.tags[kind] != [e["tag"] for e in vocab[kind]]:
            raise ValueError(f"{folder}: labels.pt and vocab.json disagree on the {kind} "
                             "vocabulary; rebuild both with `parse_tags.py vocab`")
    if not vocab["objects"]:
        raise ValueError(f"{vocab_path} has no object tags")
    return vocab, labels


def labels_fingerprint(folder):
    """sha256 of vocab.json + labels.pt: a resumed run must train on the very same labels."""
    h = hashlib.sha256()
    for name in ("vocab.json", "labels.pt"):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:16]


def example_label_key(labels):
    """One key of labels.pt, for messages."""
    keys = getattr(labels, "keys", None)
    if torch.is_tensor(keys):
        return f"{int(keys[0])} (numeric keys)" if len(keys) else "<none>"
    return next(iter(keys), "<none>") if keys is not None else "<unknown>"


def param_groups(model, weight_decay, decay_scalars=True):
    """AdamW groups, the authors' rule (their utils/optimizer.py): no weight decay on 1-D parameters
    (LayerNorm affines, biases) and names ending in '.bias'; everything else is decayed: the convs
    and proj, and also the 0-d gates and the two log-temperatures. Decoupled decay shrinks those by
    lr x wd per step (5e-5 at the paper's settings), pulling each gate tanh(g) towards 0 (the
    projector towards the identity) and each tau = exp(s) towards 1 wherever their gradients do not
    hold them. decay_scalars=False exempts the 0-d parameters as well. Frozen parameters are left
    out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = lambda n, p: p.ndim == 1 or n.endswith(".bias") or (p.ndim == 0 and not decay_scalars)
    return [{"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0}]


def clip_source(clip):
    """--clip as it is recorded: a model name or URL as given, a file by its absolute path (so
    evaluate.py and tagalign.py find it from any folder)."""
    return clip if clip in clip_model.MODELS or "://" in clip else os.path.abspath(clip)


def clip_identity(clip):
    """What a resume compares: a model name or URL itself; a file by its size and SHA-256, so the
    same file under another path is the same CLIP and another file behind the same path is not."""
    if clip in clip_model.MODELS or "://" in clip or not os.path.isfile(clip):
        return clip
    with open(clip, "rb") as f:
        return (f"{os.path.getsize(clip)} bytes, "
                f"sha256 {hashlib.file_digest(f, 'sha256').hexdigest()[:16]}")


def scaled_lr(lr, global_batch):
    """The authors' linear rule: lr x global batch / 4096 (1e-3 at 8 GPUs x 512)."""
    return lr * global_batch / 4096


RESUME_FIELDS = ("world", "workers", "batch", "global_batch", "seed", "shuffle_buffer", "files",
                 "labels", "clip", "precision", "tag_loss", "tag_average", "trained_terms",
                 "loss_weights", "augmentation", "grad_clip", "image_root", "decay_scalars",
                 "keep_unlisted")
# What follows the backbone, compared as resolved (a default of None or 'auto' equals what it
# resolved to then).
RESOLVED_FIELDS = ("surgery_layers", "image_size", "clip_quick_gelu")


def resolved_of(ckpt):
    """The resolved backbone settings a checkpoint was trained with."""
    return {"surgery_layers": ckpt["config"]["surgery_layers"],
            "image_size": ckpt["data"]["image_size"],
            "clip_quick_gelu": tagalign.recorded_activation(ckpt)}


def check_resume(saved, current, path, fields=RESUME_FIELDS):
    """Refuse to resume when anything that decides the data order or the labels differs, naming the
    field."""
    for field in fields:
        if field not in saved:
            raise ValueError(f"--resume: {path} records no '{field}': "
                             "it is not a checkpoint of this train.py")
        if saved[field] != current[field]:
            old, new = saved[field], current[field]
            if field == "files":
                diff = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b),
                            min(len(old), len(new)))
                old = f"{len(old)} files, #{diff} = {old[diff] if diff < len(old) else None}"
                new = f"{len(new)} files, #{diff} = {new[diff] if diff < len(new) else None}"
            raise ValueError(f"--resume: '{field}' differs from the run that wrote {path} "
                             f"({old} there, {new} now). "
                             "An exact resume needs the same processes, --workers, --batch-size, "
                             "--global-batch-size, --seed, --shuffle-buffer, data files, labels, "
                             "CLIP and its activation, surgery layers, crop size, precision, tag "
                             "loss, loss weights, augmentation, gradient clipping and image root; "
                             "start a new --out to change them (only --lr and --weight-decay may "
                             "change)")


def pinned(t, device):
    """A host tensor on `device` without blocking the host (pinned memory, asynchronous copy)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def main(argv=None):
    args = parse_args(argv)
    # the one DDP block (torchrun, or one process)
    rank, world, device = ddp.init_distributed(args.dist_timeout)
    try:
        train(args, rank, world, device)
    except BaseException:
        ddp.end_distributed(finished=False)
        raise
    ddp.end_distributed()


def train(args, rank, world, device):
    """One training run (paper Sec. 4). Each step takes `accum` micro-batches (the global batch),
    runs the frozen CLIP Surgery and the projector, the losses of Eq. 1-6 in fp32, a backward per
    micro-batch, then one clipped AdamW step. Set-up and resume (start_run), data bookkeeping
    (account), non-finite checks (Watch), logs (StepLog) and checkpoints (save_run) are below the
    loop."""
    # inputs checked first, then CLIP, model, optimizer, data, resume
    r = start_run(args, rank, world, device)
    model, raw_model, optimizer, scaler = r.model, r.raw_model, r.optimizer, r.scaler
    accum, tags, emb, freq = r.accum, r.tags, r.emb, r.freq
    watch, log, batches = Watch(rank, world, accum), StepLog(args, r), iter(r.loader)
    raw_model.train()
    while r.step < args.steps:
        # the whole step: the tag losses average over it
        step_batches = [next(batches) for _ in range(accum)]
        # data positions and counts; the first step must find its labels
        account(args, r, step_batches, log)
        # the tag losses' denominators (Eq. 1-2)
        tag_counts = images_averaged(args, r, step_batches, device)
        if args.sync_debug:  # from here to the optimizer step nothing may wait for the GPU
            torch.cuda.set_sync_debug_mode("error")
        for micro, b in enumerate(step_batches):
            images = normalise_and_erase(b["images"].to(device, non_blocking=True), b["boxes"],
                                         r.erase_noise)
            # DDP all-reduces the gradients on the last one only
            sync = micro == accum - 1 or world == 1
            with contextlib.nullcontext() if sync else model.no_sync():
                with torch.autocast(device.type, dtype=r.amp_dtype,
                                    enabled=r.amp_dtype is not None):
                    caption_emb = raw_model.encode_text(b["tokens"].to(device, non_blocking=True)) \
                        if args.itc_weight else None  # (B, D): the frozen text tower (Eq. 5)
                    _, z = model(images)  # (B, D): the mean of the projected patch tokens (Eq. 1)
                # the losses in fp32: a 10,000-way softmax at tau ~ 100 needs more than bf16's 8
                # bits of mantissa
                obj_labels = multi_hot(*b["obj"], len(images), len(tags["objects"]), device) \
                    if args.object_weight else None  # (B, K) 0/1
                attr_labels = multi_hot(*b["attr"], len(images), len(tags["attributes"]), device) \
                    if args.attribute_weight and tags["attributes"] else None
                loss, terms = tagalign.tagalign_loss(
                    raw_model, z.float(), caption_emb, obj_labels, emb["objects"],
                    attr_labels=attr_labels, attr_emb=emb.get("attributes"),
                    obj_freq=freq["objects"], attr_freq=freq["attributes"],
                    attribute_weight=args.attribute_weight, itc_weight=args.itc_weight,
                    object_weight=args.object_weight, tag_average=args.tag_average,
                    tag_counts=tag_counts, accumulation=accum, tag_loss_kind=args.tag_loss)  # Eq. 6
            # read at the next check, not now (no host sync)
            watch.loss(loss, r.step + 1, b["keys"])
            scaler.scale(loss).backward()  # each micro-batch's loss is its share of the step's loss
            log.add(terms, images.shape[0] * world)
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(r.trainable, args.grad_clip)
        watch.gradient(norm, scaler)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if args.sync_debug:
            torch.cuda.set_sync_debug_mode("default")
        r.step += 1
        log_now = r.step % args.log_every == 0 or r.step == args.steps
        save_now = r.step % args.save_every == 0 or r.step == args.steps
        if log_now or save_now:
            watch.check()  # before anything is logged or saved
        if log_now:
            log.write(r)
        if save_now:
            save_run(args, r)
    log.close()
    return raw_model


# --------------------------------------------------------------------------------------------------
# What the loop relies on: the run's set-up and resume, its data bookkeeping, non-finite checks,
# logs and checkpoints (safe to skip on a first read)

def start_run(args, rank, world, device):
    """Everything the loop needs, as a namespace. Whatever can be wrong with the inputs is checked
    before CLIP is loaded (or downloaded); with --resume, the checkpoint's run record must match
    this run's."""
    r = SimpleNamespace(master=rank == 0, step=0)
    r.global_batch = args.global_batch_size or args.batch_size * world
    if r.global_batch % (args.batch_size * world):
        raise ValueError(f"--global-batch-size {r.global_batch} must be a multiple of "
                         f"batch-size x processes ({args.batch_size} x {world})")
    r.accum = r.global_batch // (args.batch_size * world)
    r.lr = scaled_lr(args.lr, r.global_batch)
    if args.precision != "auto":
        r.precision = args.precision
    elif device.type == "cuda":
        # bf16 where the GPU has it (Ampere and later), else fp16 with a GradScaler
        r.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        r.precision = "fp32"
    r.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[r.precision]
    r.ckpt_path = os.path.join(args.out, "ckpt.pt")

    vocab, labels = load_label_data(args.labels)
    if not (args.data or args.data_csv):
        raise ValueError("no training data: pass --data SHARDS or --data-csv FILE")
    if args.sync_debug and (device.type != "cuda" or world > 1 or r.precision == "fp16"):
        raise ValueError("--sync-debug checks one CUDA process in bf16 or fp32 (fp16's GradScaler "
                         "and DDP's first bucket rebuild read the GPU by design)")
    if args.data_csv:
        check_csv(args.data_csv, args.image_root)
    files = [os.path.abspath(f)
             for f in ([args.data_csv] if args.data_csv else input_files(args.data))]
    r.record = run_record(args, r, world, files)
    ckpt = None
    if args.resume:
        if not os.path.isfile(r.ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {r.ckpt_path}")
        ckpt = torch.load(r.ckpt_path, map_location="cpu", weights_only=False)
        check_resume(ckpt["data"], r.record, r.ckpt_path)
    elif os.path.isfile(r.ckpt_path) and not args.overwrite:
        raise FileExistsError(f"{r.ckpt_path} exists: pass --resume to continue that run, or "
                              "--overwrite to start afresh and replace it, or choose another --out")
    os.makedirs(args.out, exist_ok=True)

    torch.manual_seed(args.seed)
    r.clip_name = clip_source(args.clip)  # recorded in the checkpoint
    tagalign.fetch_clip_once(r.clip_name)  # one download per node, not one per rank
    clip = clip_model.load(r.clip_name, device=device,
                           quick_gelu=clip_model.ACTIVATIONS[args.clip_act])
    # what follows the backbone: crop size (its input size), surgery blocks (its last half),
    # projector width
    image_size = args.image_size or clip.cfg.image_resolution
    if image_size % clip.visual.patch_size:
        raise ValueError(f"--image-size {image_size} is not a multiple of the CLIP's patch size "
                         f"{clip.visual.patch_size}")
    r.raw_model = tagalign.TagAlign(
        clip, tagalign.TagAlignConfig(surgery_layers=args.surgery_layers)).to(device)
    print0(f"CLIP {r.clip_name}: {clip_model.describe(clip)}; surgery on the last "
           f"{r.raw_model.cfg.surgery_layers} blocks, crops of {image_size} px")
    if ckpt is not None:
        resolved = {"surgery_layers": r.raw_model.cfg.surgery_layers, "image_size": image_size,
                    "clip_quick_gelu": clip.cfg.quick_gelu}
        check_resume(resolved_of(ckpt), resolved, r.ckpt_path, fields=RESOLVED_FIELDS)
    # with the data state (surgery and activation are in the config)
    r.record.update(image_size=image_size)
    r.tags = {k: [e["tag"] for e in vocab[k]] for k in ("objects", "attributes")}
    r.emb = {k: tagalign.tag_embeddings(clip, r.tags[k],
                                        os.path.join(args.out, f"tag_embeddings_{k}.pt")
                                        if r.master else None).to(device)
             for k in ("objects", "attributes") if r.tags[k]}
    r.freq = {k: torch.tensor([e["freq"] for e in vocab[k]], device=device)
              for k in ("objects", "attributes")}
    # A switched-off term leaves its temperature without a gradient, which DDP refuses (it waits for
    # every trainable parameter's gradient): freeze what the enabled terms do not use (paper
    # Table 3's ablations).
    if not (args.object_weight or (args.attribute_weight and r.tags["attributes"])):
        r.raw_model.logit_scale_tag.requires_grad_(False)
    if not args.itc_weight:
        r.raw_model.logit_scale_itc.requires_grad_(False)

    groups = param_groups(r.raw_model, args.weight_decay, not args.no_decay_scalars)
    r.trainable = [p for g in groups for p in g["params"]]
    r.optimizer = torch.optim.AdamW(groups, lr=r.lr, betas=(0.9, 0.999), eps=1e-6)
    r.scaler = torch.amp.GradScaler(device.type, enabled=r.precision == "fp16")
    start, role_offset, r.skipped_total = {}, 0, dict.fromkeys(SKIPS, 0)
    if ckpt is not None:
        start, role_offset = restore(args, r, ckpt)

    r.model = DDP(r.raw_model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else r.raw_model
    if args.compile:
        r.model = torch.compile(r.model)
    transform = train_transform(image_size, not args.no_augment, args.min_crop_scale,
                                args.auto_augment)
    dataset = CaptionImages(files, labels, transform, rank, world, args.workers,
                            args.shuffle_buffer, args.seed, args.image_root, start, role_offset,
                            csv_input=bool(args.data_csv), keep_unlisted=args.keep_unlisted)
    r.loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                           num_workers=args.workers, collate_fn=collate,
                                           pin_memory=device.type == "cuda",
                                           persistent_workers=args.workers > 0)
    r.positions = StreamPositions(start, rank, dataset.workers)
    r.erase_noise = torch.Generator(device)  # reseeded per erased sample (normalise_and_erase)
    # batches this rank took from loaders since the run began (role_offset)
    r.micro_batches = r.step * r.accum
    r.labels, r.world, r.rank, r.device, r.first = labels, world, rank, device, True
    return r


def run_record(args, r, world, files):
    """What an exact resume needs unchanged (RESUME_FIELDS), saved with the data state."""
    # the temperatures of switched-off terms are frozen: resuming must keep the same set
    trained_terms = [k for k, w in (("obj", args.object_weight), ("attr", args.attribute_weight),
                                    ("itc", args.itc_weight)) if w]
    return {"world": world, "workers": args.workers, "batch": args.batch_size,
            "global_batch": r.global_batch, "seed": args.seed,
            "shuffle_buffer": args.shuffle_buffer, "files": files,
            "labels": labels_fingerprint(args.labels), "clip": clip_identity(args.clip),
            "precision": r.precision, "tag_loss": args.tag_loss, "tag_average": args.tag_average,
            "trained_terms": trained_terms,
            "loss_weights": [args.object_weight, args.attribute_weight, args.itc_weight],
            "augmentation": ([False] if args.no_augment
                             else [True, args.min_crop_scale, args.auto_augment]),
            "grad_clip": args.grad_clip, "decay_scalars": not args.no_decay_scalars,
            "keep_unlisted": args.keep_unlisted,
            "image_root": os.path.abspath(args.image_root) if args.data_csv else None}


def restore(args, r, ckpt):
    """A checkpoint's trainable state, optimizer, scaler, step, RNG and skip counts into the run;
    --lr and --weight-decay may change on resume (said in the log). Returns (data start positions,
    role offset)."""
    r.raw_model.load_trainable_state_dict(ckpt["model"])
    r.optimizer.load_state_dict(ckpt["optimizer"])
    saved_lr, saved_wd = (r.optimizer.param_groups[0]["lr"],
                          r.optimizer.param_groups[0]["weight_decay"])
    for group, wd in zip(r.optimizer.param_groups, (args.weight_decay, 0.0)):  # today's flags win
        group["lr"], group["weight_decay"] = r.lr, wd
    r.scaler.load_state_dict(ckpt["scaler"])
    r.step = ckpt["step"]
    r.skipped_total.update(ckpt["data"]["skipped"])
    random.setstate(ckpt["rng"]["python"])
    torch.random.set_rng_state(ckpt["rng"]["torch"])
    print0(f"resumed from {r.ckpt_path} at step {r.step}")
    if saved_lr != r.lr:
        print0(f"lr changed on resume: {saved_lr:g} -> {r.lr:g} (--lr {args.lr:g} x global batch "
               f"{r.global_batch} / 4096)")
    if saved_wd != args.weight_decay:
        print0(f"weight decay changed on resume: {saved_wd:g} -> {args.weight_decay:g}")
    return ckpt["data"]["start"], ckpt["data"]["role_offset"]


def account(args, r, step_batches, log):
    """The step's data bookkeeping: each data role's stream position (an exact resume starts there),
    the log's counts, and on the first step a collective check that some sample has its key in
    labels.pt (a label file that matches no sample would train on nothing but the contrastive
    loss)."""
    for b in step_batches:
        r.micro_batches += 1
        for where in b["where"]:
            r.positions.update(where)
        log.count(b)
    if r.first:
        found = tagalign.all_reduce_sum(
            torch.tensor([float(sum(b["n_found"] for b in step_batches))]))
        if found.item() == 0:
            raise ValueError(
                f"none of the {r.global_batch} samples of the first step has its key in "
                f"{args.labels}/labels.pt: data keys look like {step_batches[0]['keys'][0]!r}, "
                f"labels.pt keys like {example_label_key(r.labels)!r}. Parse the same files you "
                "train on (tar keys are img2dataset's sample keys; CSV rows are keyed by their "
                "'key' column)")
        r.first = False


def images_averaged(args, r, step_batches, device):
    """The images each tag loss averages over (tag_loss's count) for the whole step: with
    --tag-average tagged the step's tagged images over all ranks and micro-batches, else every image
    (the authors')."""
    if args.tag_average != "tagged":
        return r.global_batch, r.global_batch
    counts = torch.tensor([float(sum(b["n_obj"] for b in step_batches)),
                           float(sum(b["n_attr"] for b in step_batches))])
    counts = tagalign.all_reduce_sum(pinned(counts, device))
    return counts[0], counts[1]


def save_run(args, r):
    """Collective: every rank's data positions and skip counts go to rank 0, which writes the
    checkpoint (trainable state, optimizer, scaler, step, RNG, run record) atomically."""
    gathered = [None] * r.world
    state = {"roles": r.positions.roles, "skipped": r.positions.skipped}
    if r.world > 1:
        dist.all_gather_object(gathered, state)
    else:
        gathered = [state]
    if not r.master:
        return
    # disjoint: each rank's roles
    all_roles = {role: s for g in gathered for role, s in g["roles"].items()}
    skipped = {k: r.skipped_total[k] + sum(s[k] for g in gathered for s in g["skipped"].values())
               for k in r.skipped_total}
    tagalign.save_checkpoint(
        r.ckpt_path, r.raw_model, r.clip_name, optimizer=r.optimizer.state_dict(),
        scaler=r.scaler.state_dict(), step=r.step,
        rng={"python": random.getstate(), "torch": torch.random.get_rng_state()}, args=vars(args),
        data={**r.record, "start": all_roles, "role_offset": r.micro_batches % max(args.workers, 1),
              "skipped": skipped})


class Watch:
    """Non-finite losses and gradients, kept on the device and checked at log and save steps.
    check() is a collective: every rank learns whether any rank saw one, so all stop together (a
    rank that raised alone would leave the others waiting in the next all-reduce forever), naming
    the step, rank(s) and batch keys."""

    def __init__(self, rank, world, accum):
        self.rank, self.world, self.accum = rank, world, accum
        # per micro-step, per step, (step, keys)
        self.finite, self.finite_grad, self.keys = [], [], []

    def loss(self, loss, step, keys):
        self.finite.append(torch.isfinite(loss.detach()))
        self.keys.append((step, keys))

    def gradient(self, norm, scaler):
        # a finite loss can still give non-finite gradients (fp16's GradScaler skips such steps by
        # itself)
        self.finite_grad.append(torch.ones_like(norm, dtype=torch.bool) if scaler.is_enabled()
                                else torch.isfinite(norm))

    def check(self):
        # (micro + steps,) bool
        local = torch.cat([~torch.stack(self.finite), ~torch.stack(self.finite_grad)])
        bad = tagalign.all_reduce_sum(local.float()).nonzero()  # the one host read of the interval
        if len(bad):
            i = int(bad[0])
            loss_bad = i < len(self.finite)
            # a gradient: its last micro-step
            j = i if loss_bad else (i - len(self.finite) + 1) * self.accum - 1
            keys = (self.keys[j][1] if loss_bad
                    else [k for _, ks in self.keys[j + 1 - self.accum:j + 1] for k in ks])
            mine = {"rank": self.rank, "bad": bool(local[i]) or not loss_bad, "keys": keys}
            everyone = [None] * self.world
            if self.world > 1:
                dist.all_gather_object(everyone, mine)
            else:
                everyone = [mine]
            ranks = ", ".join(str(e["rank"]) for e in everyone if e["bad"])
            keys = [k for e in everyone if e["bad"] for k in e["keys"]]
            what = f"loss at step {self.keys[j][0]} (rank {ranks}" if loss_bad else \
                f"gradient at step {self.keys[j][0]} (the losses were finite"
            raise FloatingPointError(f"non-finite {what}; all {self.world} processes stop); "
                                     f"batch keys: {keys[:64]}. The last checkpoint is intact: "
                                     "inspect these samples, or lower --lr / use --precision bf16 "
                                     "or fp32")
        self.finite.clear()
        self.finite_grad.clear()
        self.keys.clear()


class StepLog:
    """The log line of every --log-every steps (console and out/log.txt): the loss terms averaged
    since the last line, temperatures, lr, img/s, GPU memory, and the data counts summed over ranks
    (tagged, found in labels.pt, skipped images, tars, members and unlisted samples). Loss sums stay
    on the device until then."""

    def __init__(self, args, r):
        self.args, self.world, self.device = args, r.world, r.device
        self.sums, self.seen = {}, {"samples": 0, "found": 0, "tagged": 0}
        self.t, self.images, self.last_step, self.samples_total, self.warned = (
            time.time(), 0, r.step, 0, False)
        self.file = (open(os.path.join(args.out, "log.txt"), "a", encoding="utf-8")
                     if r.master else None)
        if r.master:
            device = r.device
            head = {"args": vars(args), "world": r.world, "global_batch": r.global_batch,
                    "accumulation": r.accum, "lr": r.lr, "precision": r.precision,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                    else platform.processor() or "cpu"}
            self.file.write(f"# start {time.strftime('%Y-%m-%d %H:%M:%S')} {json.dumps(head)}\n")
            self.file.flush()
            print0(f"world {r.world}, global batch {r.global_batch} "
                   f"({args.batch_size} x {r.world} x {r.accum} accumulation), lr {r.lr:g}, "
                   f"{r.precision}, {len(r.tags['objects'])} object and "
                   f"{len(r.tags['attributes'])} attribute tags")

    def count(self, b):
        self.seen["samples"] += len(b["keys"])
        self.seen["found"] += b["n_found"]
        self.seen["tagged"] += b["n_tagged"]

    def add(self, terms, images):
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
        self.images += images

    def write(self, r):
        """Collective (two all-reduces): every rank calls it at the same steps."""
        names, device = ("obj", "attr", "itc"), self.device
        losses = torch.stack([self.sums[k] if k in self.sums else torch.zeros((), device=device)
                              for k in names])
        counts = torch.tensor([float(self.seen[k]) for k in self.seen] + [
            float(sum(s[k] for s in r.positions.skipped.values())) for k in r.skipped_total],
            dtype=torch.float64)
        losses, counts = tagalign.all_reduce_sum(losses), tagalign.all_reduce_sum(counts)
        # steps since the last line
        losses = (losses / self.world / (r.step - self.last_step)).tolist()
        shown = [f"{v:.4f}" if k in self.sums else "off" for k, v in zip(names, losses)]
        samples, found, tagged = counts[:3].tolist()
        self.samples_total += samples
        skipped = {k: r.skipped_total[k] + int(v)
                   for k, v in zip(r.skipped_total, counts[3:].tolist())}
        tau_tag, tau_itc = r.raw_model.temperatures()
        rate = self.images / (time.time() - self.t)
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else 0.0
        line = (f"step {r.step}/{self.args.steps} obj {shown[0]} attr {shown[1]} itc {shown[2]} "
                f"tau_tag {tau_tag.item():.2f} tau_itc {tau_itc.item():.2f} "
                f"lr {r.optimizer.param_groups[0]['lr']:.3g} img/s {rate:.1f} gpu_mem {mem:.2f}GiB "
                f"tagged {100 * tagged / max(samples, 1):.1f}% "
                f"found {100 * found / max(samples, 1):.1f}% "
                f"skipped img {skipped['image']} tar {skipped['tar']} member {skipped['member']} "
                f"unlisted {skipped['unlisted']}")
        print0(line)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()
        unlisted_since = int(counts[3 + SKIPS.index("unlisted")])  # since this (re)start
        if (found < 0.5 * samples or unlisted_since > self.samples_total) and not self.warned:
            print0(f"warning: {100 * found / max(samples, 1):.1f}% of the samples trained have "
                   f"their key in labels.pt, and {unlisted_since} were skipped for having none: do "
                   "the labels belong to these files? ('found' and 'unlisted' in every log line)")
            self.warned = True
        self.sums, self.t, self.images, self.last_step = {}, time.time(), 0, r.step
        self.seen = dict.fromkeys(self.seen, 0)

    def close(self):
        if self.file:
            self.file.close()


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
