"""
Open-vocabulary segmentation benchmarks (docs/evaluation.md; layouts in docs/datasets.md) and
referring segmentation on RefCOCO/+/g (docs/refcoco.md), self-contained: no mmcv, mmseg or
pycocotools.

Run:
    python evaluate.py --checkpoint runs/tagalign/ckpt.pt --dataset voc --data-root data/
    python evaluate.py --checkpoint ckpt.pt --datasets all --data-root data/ --pamr
    torchrun --nproc_per_node=8 evaluate.py --checkpoint ckpt.pt --methods all --datasets all \
        --data-root data/
    python evaluate.py --method naclip --clip ViT-B/16 --dataset ade --data-root data/
        # a training-free baseline
    python evaluate.py --methods baselines --datasets all --data-root data/
        # every baseline, no checkpoint
    python evaluate.py --checkpoint ckpt.pt --dataset refcoco --data-root data/refer/data/

Datasets (folder under --data-root, as mmseg prepares them): voc, voc20 (VOCdevkit/VOC2012),
context, context59 (VOCdevkit/VOC2010), coco_object, coco_stuff (coco_stuff164k; build coco_object's
labels with data/make_coco_object.py), cityscapes (cityscapes), ade (ade/ADEChallengeData2016),
imagenet_s50, imagenet_s300 (ImageNetS/ImageNetS{50,300}); refcoco, refcoco+, refcocog (the refer
layout: --data-root is refer/data); folder (any data in a plain layout: --data-root holds images/,
labels/ and classes.txt).
Scores: per window rule v3 (Eq. 7-8; v1 with --rule v1), averaged over overlapping windows, resized
to the original image; background (class 0 of voc, context, coco_object, imagenet_s*) when the best
score is below the dataset's threshold. mIoU = mean over classes of TP / (TP + FP + FN) summed over
the dataset (classes absent from both prediction and ground truth are skipped, as mmseg does).
RefCOCO/+/g (our protocol; the authors released none): each expression itself is the text query, no
template.
Several methods (--methods a,b,...): each image is decoded once and segmented by every method, all
on the one CLIP; the output is one table, methods x datasets with their mean, printed with the
settings that produced it (per dataset: background threshold, stride, window, short side; run-wide:
rule, clip weight, templates, PAMR, CLIP, checkpoint, --limit, processes, code version, and the
command that reruns it) and written beside results.json (every method's per-class detail) as
results.csv and results.md.
Files, layouts and flags are checked before CLIP is loaded. Under torchrun each process takes GPU
LOCAL_RANK (ddp.init_distributed); images are split over ranks and every collective goes through the
backend's device.
"""
import argparse
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import clip_model
import ddp
import tagalign

HERE = os.path.dirname(os.path.abspath(__file__))

# name: folder under --data-root, image/label dirs and suffixes, split file, class list, label
# conventions, background threshold (None: no background class) and window stride of rule v3
# (docs/evaluation.md).
DATASETS = {
    "voc": dict(root="VOCdevkit/VOC2012", img="JPEGImages", ann="SegmentationClass",
                img_suffix=".jpg", seg_suffix=".png", split="ImageSets/Segmentation/val.txt",
                classes="voc21.txt", bg=0.45, stride=56),
    "voc20": dict(root="VOCdevkit/VOC2012", img="JPEGImages", ann="SegmentationClass",
                  img_suffix=".jpg", seg_suffix=".png", split="ImageSets/Segmentation/val.txt",
                  classes="voc20.txt", reduce_zero=True, stride=56),
    "context": dict(root="VOCdevkit/VOC2010", img="JPEGImages", ann="SegmentationClassContext",
                    img_suffix=".jpg", seg_suffix=".png",
                    split="ImageSets/SegmentationContext/val.txt", classes="context60.txt", bg=0.1,
                    stride=56),
    "context59": dict(root="VOCdevkit/VOC2010", img="JPEGImages", ann="SegmentationClassContext",
                      img_suffix=".jpg", seg_suffix=".png",
                      split="ImageSets/SegmentationContext/val.txt", classes="context59.txt",
                      reduce_zero=True, stride=112),
    "coco_object": dict(root="coco_stuff164k", img="images/val2017", ann="annotations/val2017",
                        img_suffix=".jpg", seg_suffix="_instanceTrainIds.png",
                        classes="coco_object81.txt", bg=0.3, stride=56),
    "coco_stuff": dict(root="coco_stuff164k", img="images/val2017", ann="annotations/val2017",
                       img_suffix=".jpg", seg_suffix="_labelTrainIds.png",
                       classes="coco_stuff171.txt", stride=56),
    "cityscapes": dict(root="cityscapes", img="leftImg8bit/val", ann="gtFine/val",
                       img_suffix="_leftImg8bit.png", seg_suffix="_gtFine_labelTrainIds.png",
                       classes="cityscapes19.txt", stride=56),
    "ade": dict(root="ade/ADEChallengeData2016", img="images/validation",
                ann="annotations/validation", img_suffix=".jpg", seg_suffix=".png",
                classes="ade150.txt", reduce_zero=True, stride=56),
    "imagenet_s50": dict(root="ImageNetS/ImageNetS50", img="validation",
                         ann="validation-segmentation", img_suffix=".JPEG", seg_suffix=".png",
                         classes="imagenet_s50.txt", bg=0.3, stride=56, rgb_label=True, ignore=1000,
                         shrink=1000),
    "imagenet_s300": dict(root="ImageNetS/ImageNetS300", img="validation",
                          ann="validation-segmentation", img_suffix=".JPEG", seg_suffix=".png",
                          classes="imagenet_s300.txt", bg=0.1, stride=56, rgb_label=True,
                          ignore=1000, shrink=1000),
}
STANDARD = list(DATASETS)
# Any dataset in a plain layout: --data-root holds images/*.png, labels/*.png (same stems;
# label = class id) and classes.txt (one name per line; a first line 'background' makes class 0
# the thresholded background).
DATASETS["folder"] = dict(root="", img="images", ann="labels", img_suffix=".png", seg_suffix=".png",
                          classes=None, bg=None, stride=None)
REFER = {"refcoco": ("unc", ["val", "testA", "testB"]),
         "refcoco+": ("unc", ["val", "testA", "testB"]), "refcocog": ("umd", ["val", "test"])}
# The paper's (v3) table: no post-processing / with PAMR.
PAPER = {"voc": (55.3, 57.9), "context": (32.7, 34.3), "coco_object": (35.1, 35.4),
         "imagenet_s50": (52.8, 55.1), "imagenet_s300": (34.4, 35.1), "voc20": (83.8, 88.4),
         "context59": (35.1, 38.6), "coco_stuff": (23.1, 25.8), "cityscapes": (27.3, 27.6),
         "ade": (16.9, 17.3)}
PAPER_REFER = {("refcoco", "val"): 18.75, ("refcoco", "testA"): 20.31, ("refcoco", "testB"): 20.64,
               ("refcoco+", "val"): 19.24, ("refcoco+", "testA"): 20.88,
               ("refcoco+", "testB"): 21.23, ("refcocog", "val"): 23.69}
# Validation images per dataset (the official splits; docs/datasets.md).
EXPECTED_COUNTS = {"voc": 1449, "voc20": 1449, "context": 5105, "context59": 5105,
                   "coco_object": 5000, "coco_stuff": 5000, "cityscapes": 500, "ade": 2000,
                   "imagenet_s50": 752, "imagenet_s300": 4097}


def read_classes(name):
    with open(os.path.join(HERE, "data", name), encoding="utf-8") as f:
        return f.read().splitlines()  # exact strings: ADE20K's 'bed ' keeps its trailing space


# --------------------------------------------------------------------------------------------------
# Files and labels

def find_pairs(spec, root):
    """(image, label) paths by mmseg's pairing rule, plus the images without a label and labels
    without an image."""
    base = os.path.join(root, spec["root"])
    img_dir, ann_dir = os.path.join(base, spec["img"]), os.path.join(base, spec["ann"])
    for d in (img_dir, ann_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d} not found. Expected layout under {base}: images in "
                                    f"{spec['img']}/*{spec['img_suffix']}, labels in "
                                    f"{spec['ann']}/*{spec['seg_suffix']}"
                                    + (f", split file {spec['split']}" if spec.get("split") else "")
                                    + " (see docs/datasets.md)")

    def scan(folder, suffix):
        out = []
        for dirpath, _, names in os.walk(folder):
            out += [os.path.relpath(os.path.join(dirpath, n), folder)[:-len(suffix)]
                    for n in names if n.endswith(suffix)]
        return set(out)

    if spec.get("split"):
        split = os.path.join(base, spec["split"])
        if not os.path.isfile(split):
            raise FileNotFoundError(f"split file {split} not found")
        stems = [line.strip() for line in open(split) if line.strip()]
        images = {s for s in stems if os.path.isfile(os.path.join(img_dir, s + spec["img_suffix"]))}
        labels = {s for s in stems if os.path.isfile(os.path.join(ann_dir, s + spec["seg_suffix"]))}
        missing_image = sorted(set(stems) - images)
    else:
        images, labels = scan(img_dir, spec["img_suffix"]), scan(ann_dir, spec["seg_suffix"])
        missing_image = sorted(labels - images)
    pairs = [(os.path.join(img_dir, s + spec["img_suffix"]),
              os.path.join(ann_dir, s + spec["seg_suffix"])) for s in sorted(images & labels)]
    return pairs, sorted(images - labels), missing_image


def pil_to_long(img):
    """PIL image -> (H, W) or (H, W, C) int64 tensor of its raw values
    (palette indices for 'P' images)."""
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    channels = len(img.getbands())
    return data.view(img.height, img.width, channels).long().squeeze(-1)


def load_label(path, spec, num_classes):
    """Label PNG -> (H, W) long with 255 (or the dataset's ignore id) for ignored pixels, per
    mmseg's conventions. Returns (label, sorted list of values outside the class range, which are
    then ignored)."""
    from PIL import Image
    img = Image.open(path)
    ignore = spec.get("ignore", 255)
    if spec.get("rgb_label"):
        rgb = pil_to_long(img.convert("RGB"))
        # ImageNet-S: id = R + 256 G (widened before the multiply)
        label = rgb[..., 0] + 256 * rgb[..., 1]
    else:
        if img.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"{path}: label PNG has mode {img.mode}; expected an index/grayscale "
                             "PNG (never convert labels to RGB)")
        label = pil_to_long(img) if img.mode in ("P", "L") \
            else torch.tensor(list(img.getdata())).view(img.height, img.width)
    if spec.get("reduce_zero"):
        label = torch.where(label == 0, 255, label - 1)
        label[label == 254] = 255
    valid = label != ignore
    bad = sorted(set(label[valid & ((label < 0) | (label >= num_classes))].unique().tolist()))
    if bad:
        label = label.clone()
        label[valid & ((label < 0) | (label >= num_classes))] = ignore
    return label, bad


def confusion(pred, gt, num_classes, ignore=255):
    """(C, C) counts: rows ground truth, columns prediction; ignored pixels dropped."""
    keep = gt != ignore
    idx = gt[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def iou_from_confusion(cm):
    """Per-class IoU = TP / (TP + FP + FN) (NaN where a class is absent from both),
    mIoU = nanmean, aAcc."""
    cm = cm.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    miou = iou[~iou.isnan()].mean().item() if (~iou.isnan()).any() else float("nan")
    return iou, miou, (tp.sum() / cm.sum().clamp(min=1)).item()


# --------------------------------------------------------------------------------------------------
# Evaluation loops

def gather_dicts(d):
    """Merge a dict from every rank (rank 0's report must also list what the other ranks found); the
    identity in a single process. all_gather_object pickles through the backend's device, which
    init_distributed has set."""
    if not tagalign.distributed():
        return d
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, d)
    return {k: v for part in parts for k, v in sorted(part.items())}


def settings(name, args, classes=None):
    """Everything that changes one dataset's numbers, as keyword arguments of tagalign.segment: the
    evaluation protocol's per-dataset defaults, overridden by flags. The only place that reads
    --window, --short-side, --stride and --bg-threshold, so the run, the printed settings and
    results.json cannot disagree. The `folder` dataset has a background class when classes.txt
    starts with 'background' (threshold 0.5 unless given) and a stride of half the window;
    RefCOCO/+/g (classes None) use the blended cosine map, no background, stride 224. Strides are
    the authors' for ViT-B/16 at 448, scaled to other windows and patch sizes
    (tagalign.scaled_stride); window and short side are set from the backbone by `apply_backbone`
    unless given."""
    common = dict(clip_weight=args.clip_weight, window=args.window, short_side=args.short_side,
                  use_pamr=args.pamr)
    scaled = lambda stride: tagalign.scaled_stride(stride, args.window, args.patch_size)
    if name in REFER:
        return dict(rule="cosine", bg_threshold=None, stride=args.stride or scaled(224), **common)
    spec = DATASETS[name]
    v1 = args.rule == "v1"
    has_bg = spec.get("bg") is not None or (name == "folder" and classes[0] == "background")
    bg = None if not has_bg else 0.4 if v1 else spec.get("bg") or 0.5
    if args.bg_threshold is not None and has_bg:
        bg = args.bg_threshold
    stride = args.stride or (scaled(224) if v1 else scaled(spec["stride"]) if spec["stride"]
                           else tagalign.half_window(args.window, args.patch_size))
    return dict(rule=args.rule, bg_threshold=bg, stride=stride, **common)


def apply_backbone(args, clip):
    """Fill in what follows the CLIP (tagalign.inference_defaults): window and short side twice its
    input size unless given, its patch size for the strides; a window that is not a multiple of the
    patch size is refused."""
    defaults = tagalign.inference_defaults(clip)
    args.window = args.window or defaults["window"]
    args.short_side = args.short_side or defaults["short_side"]
    args.patch_size = clip.visual.patch_size
    tagalign.check_window(args.window, args.patch_size)
    return args


def dataset_classes(name, root):
    spec = DATASETS[name]
    if spec["classes"] is not None:
        return read_classes(spec["classes"])
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the folder layout needs classes.txt beside "
                                "images/ and labels/")
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()  # a last line without its newline is a class too


def evaluate_dataset(name, features, embed_texts, args, rank=0, world=1, save_dir=None):
    """mIoU of one feature source on one benchmark: evaluate_methods with a single method."""
    return evaluate_methods(name, {"prediction": features}, embed_texts, args, rank, world,
                            save_dir)["prediction"]


def evaluate_methods(name, methods, embed_texts, args, rank=0, world=1, save_dir=None):
    """mIoU of several methods on one benchmark, each image decoded (and its label read) once and
    segmented by every method. methods: {name: features}, features: windows -> (f_main, f_clip);
    embed_texts: class names -> (C, D), called once: every method shares the CLIP text encoder.
    Returns {method: result}."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from tqdm import tqdm
    spec = DATASETS[name]
    classes = dataset_classes(name, args.data_root)
    kw = settings(name, args, classes)
    bg = kw["bg_threshold"]
    pairs, no_label, no_image = find_pairs(spec, args.data_root)
    if rank == 0 and (no_label or no_image):
        print(f"{name}: {len(no_label)} images without a label (e.g. {no_label[:3]}), "
              f"{len(no_image)} labels without an image (e.g. {no_image[:3]}); evaluating the "
              f"{len(pairs)} complete pairs", file=sys.stderr)
    expected = EXPECTED_COUNTS.get(name)
    if rank == 0 and expected and len(pairs) != expected:
        print(f"warning: {name}: {len(pairs):,} image/label pairs, the benchmark has {expected:,}: "
              "the numbers will not be comparable with the paper's (`evaluate.py --check` lists "
              "what is missing)", file=sys.stderr)
    if args.limit:
        pairs = pairs[:args.limit]
    prompts = classes[1:] if bg is not None else classes  # background is never a text prompt
    text = embed_texts(prompts)
    C = len(classes)
    ignore = spec.get("ignore", 255)
    # one confusion matrix per method, reduced together
    cms = torch.zeros(len(methods), C, C, dtype=torch.long)
    bad_values = {}
    mine = list(range(rank, len(pairs), world))
    for n, i in enumerate(tqdm(mine, desc=name, disable=rank != 0 or not args.progress)):
        img_path, ann_path = pairs[i]
        img = Image.open(img_path).convert("RGB")
        gt, bad = load_label(ann_path, spec, C)
        if bad:
            bad_values[ann_path] = bad
        shrunk = bool(spec.get("shrink")) and img.width * img.height > spec["shrink"] ** 2
        if shrunk:  # ImageNet-S's large images
            s = spec["shrink"] / max(img.width, img.height)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.BILINEAR)
        pixels = pil_to_tensor(img).to(text.device)  # uint8, moved once for all methods
        preds = {}
        for m, (method, features) in enumerate(methods.items()):
            pred, _ = tagalign.segment(features, pixels, text, window_batch=args.window_batch,
                                       patch=args.patch_size, **kw)
            pred = pred.cpu()
            if pred.shape != gt.shape:  # shrunk image: prediction back to the label size (nearest)
                # an image that was not shrunk has a label of its size, or the label is a wrong file
                if not shrunk:
                    raise ValueError(f"{ann_path}: label {tuple(gt.shape)} but image "
                                     f"{img.height}x{img.width} ({img_path}); run `evaluate.py "
                                     f"--check --datasets {name}` and prepare it again")
                pred = F.interpolate(pred[None, None].float(), size=gt.shape,
                                     mode="nearest")[0, 0].long()
            cms[m] += confusion(pred, gt, C, ignore)
            preds[method] = pred
        if save_dir and i < args.save_predictions:
            save_prediction(save_dir, name, img_path, img, preds, gt, classes, ignore,
                            bg is not None)
    bad_values = gather_dicts(bad_values)
    if rank == 0:
        for path, values in sorted(bad_values.items()):
            print(f"warning: {path}: label values {values} outside 0..{C - 1}; ignored",
                  file=sys.stderr)
    # one collective for all methods; NCCL needs CUDA: all_reduce_sum moves it
    cms = tagalign.all_reduce_sum(cms)
    results = {}
    for method, cm in zip(methods, cms):
        iou, miou, acc = iou_from_confusion(cm)
        results[method] = {
            "dataset": name, "miou": 100 * miou, "aacc": 100 * acc, "images": len(pairs),
            "benchmark_images": expected,
            "per_class_iou": {c: (None if math.isnan(v) else 100 * v)
                              for c, v in zip(classes, iou.tolist())},
            "background_threshold": bg, "stride": kw["stride"], "settings": kw,
            "images_without_label": no_label, "labels_without_image": no_image,
            "bad_label_values": bad_values}
    return results


def save_prediction(folder, name, img_path, img, preds, gt, classes, ignore, has_background):
    """One panel per image: photo | ground truth | one prediction per method
    ({method: (H, W) labels}), each titled with its per-image pixel accuracy, and a legend of the
    classes present in any of them (ignored pixels white). Written to folder/name/<stem>.png: the
    methods stand side by side on the same image."""
    from PIL import Image
    import figures
    colours = figures.colours_for(classes, background=has_background)  # 'blue' drawn blue
    valid = gt != ignore
    tiles = [(img.resize(gt.shape[::-1], Image.BILINEAR), "photo"), (gt, "ground truth")]
    present = set(gt[valid].unique().tolist())
    for method, pred in preds.items():
        accuracy = (pred[valid] == gt[valid]).float().mean().item() if valid.any() else float("nan")
        tiles.append((pred, f"{method} (pixel accuracy {accuracy:.0%})"))
        present |= set(pred.unique().tolist())
    legend = [(classes[c].strip() or repr(classes[c]), colours[c].tolist()) for c in sorted(present)
              if c < len(classes)] + ([("ignored", figures.WHITE)] if (~valid).any() else [])
    stem = os.path.splitext(os.path.basename(img_path))[0]
    fig = figures.figure(figsize=(3 * len(tiles) + 2, 3 * gt.shape[0] / gt.shape[1] + 0.9))
    figures.draw_tiles(fig, [tiles], colours, ignore)
    figures.class_legend(fig, legend)
    fig.suptitle(f"{name}: {stem}", fontsize="large")
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    fig.savefig(os.path.join(folder, name, f"{stem}.png"))


# ---- RefCOCO: COCO masks without pycocotools

def rle_from_string(s):
    """COCO's compressed RLE string -> list of run lengths (5-bit chunks, continuation bit, sign,
    delta from the run two places back)."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1f) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_decode(counts, h, w):
    """Run lengths (column-major, starting with zeros) -> (h, w) uint8 mask."""
    if isinstance(counts, (bytes, str)):
        counts = rle_from_string(counts.decode() if isinstance(counts, bytes) else counts)
    values = torch.arange(len(counts)) % 2
    flat = torch.repeat_interleave(values.to(torch.uint8), torch.tensor(counts, dtype=torch.long))
    if flat.numel() != h * w:
        raise ValueError(f"RLE covers {flat.numel()} pixels, expected {h} x {w}")
    return flat.view(w, h).t().contiguous()


def polygon_rle(xy, h, w):
    """A COCO polygon [x0, y0, x1, y1, ...] -> run lengths, rasterised as COCO's API does (boundary
    traced at 5x resolution, then the pixels whose centres fall inside are kept)."""
    scale = 5.0
    k = len(xy) // 2
    x = [int(scale * xy[2 * j] + 0.5) for j in range(k)] + [int(scale * xy[0] + 0.5)]
    y = [int(scale * xy[2 * j + 1] + 0.5) for j in range(k)] + [int(scale * xy[1] + 0.5)]
    u, v = [], []
    for j in range(k):  # dense boundary points of each edge
        xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            s = (ye - ys) / dx if dx else 0.0
            for d in range(dx + 1):
                t = dx - d if flip else d
                u.append(t + xs)
                v.append(int(ys + s * t + 0.5))
        else:
            s = (xe - xs) / dy if dy else 0.0
            for d in range(dy + 1):
                t = dy - d if flip else d
                v.append(t + ys)
                u.append(int(xs + s * t + 0.5))
    px, py = [], []
    for j in range(1, len(u)):  # where the boundary crosses a pixel column, back at 1x
        if u[j] == u[j - 1]:
            continue
        xd = (min(u[j], u[j - 1]) + 0.5) / scale - 0.5
        if math.floor(xd) != xd or xd < 0 or xd > w - 1:
            continue
        yd = (min(v[j], v[j - 1]) + 0.5) / scale - 0.5
        yd = math.ceil(min(max(yd, 0.0), float(h)))
        px.append(int(xd))
        py.append(int(yd))
    a = sorted([xx * h + yy for xx, yy in zip(px, py)] + [h * w])
    runs, prev = [], 0
    for t in a:
        runs.append(t - prev)
        prev = t
    b = [runs[0]]
    j = 1
    while j < len(runs):  # merge zero-length runs
        if runs[j] > 0:
            b.append(runs[j])
            j += 1
        else:
            j += 1
            if j < len(runs):
                b[-1] += runs[j]
                j += 1
    return b


def annotation_mask(segmentation, h, w):
    """A COCO annotation's segmentation (polygons, uncompressed or compressed RLE) -> (h, w) bool
    mask; several polygon parts are united (refer sums them and keeps == 1; we keep > 0, see
    docs/refcoco.md)."""
    if isinstance(segmentation, list):
        mask = torch.zeros(h, w, dtype=torch.bool)
        for poly in segmentation:
            mask |= rle_decode(polygon_rle(poly, h, w), h, w).bool()
        return mask
    return rle_decode(segmentation["counts"], *segmentation["size"]).bool()


def refer_paths(name, root):
    """(refs pickle, instances.json, image folder) of a refer-layout dataset;
    a clear error when one is missing."""
    split_by = REFER[name][0]
    paths = (os.path.join(root, name, f"refs({split_by}).p"),
             os.path.join(root, name, "instances.json"),
             os.path.join(root, "images", "mscoco", "images", "train2014"))
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found. Expected the refer layout under {root}: "
                                    f"{name}/refs({split_by}).p, {name}/instances.json, "
                                    "images/mscoco/images/train2014/ (see docs/refcoco.md)")
    return paths


def evaluate_refer(name, features, embed_expressions, args, rank=0, world=1):
    """RefCOCO/+/g scores of one feature source: evaluate_refer_methods with a single method."""
    return evaluate_refer_methods(name, {"prediction": features}, embed_expressions, args, rank,
                                  world)["prediction"]


def evaluate_refer_methods(name, methods, embed_expressions, args, rank=0, world=1):
    """mIoU (mean of per-expression IoU) and oIoU (sum I / sum U) per split, for each method
    ({name: features}); every image, its masks and its expressions' embeddings are made once and
    shared by the methods. Our protocol (the authors released none): the text query is the
    expression itself (`raw`, no class template: embed_expressions gets the sentences verbatim); its
    mask is the 'cosine' map (the rule-v3 blend of cosines) min-max normalised over the image, above
    --ref-threshold. Returns {method: result}."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from tqdm import tqdm
    refs_path, inst_path, image_dir = refer_paths(name, args.data_root)
    with open(refs_path, "rb") as f:
        refs = pickle.load(f)
    with open(inst_path, encoding="utf-8") as f:
        instances = json.load(f)
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    kw = settings(name, args)
    results = {method: {} for method in methods}
    for split in REFER[name][1]:
        by_image = {}
        for ref in refs:
            if ref["split"] == split:
                by_image.setdefault(ref["image_id"], []).append(ref)
        image_ids = sorted(by_image)
        if args.limit:  # the same first N images whatever the number of ranks
            image_ids = image_ids[:args.limit]
        # per method: sum I, sum U, sum IoU, expressions
        totals = torch.zeros(len(methods), 4, dtype=torch.float64)
        for image_id in tqdm(image_ids[rank::world], desc=f"{name} {split}",
                             disable=rank != 0 or not args.progress):
            info = images[image_id]
            # not ref['file_name']
            img = Image.open(os.path.join(image_dir, info["file_name"])).convert("RGB")
            sentences, masks = [], []
            for ref in by_image[image_id]:
                gt = annotation_mask(anns[ref["ann_id"]]["segmentation"], info["height"],
                                     info["width"])
                for sent in ref["sentences"]:
                    sentences.append(sent["raw"].strip())  # the tokenizer lower-cases
                    masks.append(gt)
            text = embed_expressions(sentences)
            pixels = pil_to_tensor(img).to(text.device)  # uint8, moved once for all methods
            for m, features in enumerate(methods.values()):
                _, scores = tagalign.segment(features, pixels, text, patch=args.patch_size,
                                             window_batch=args.window_batch, **kw)
                lo = scores.flatten(1).min(1).values.view(-1, 1, 1)
                hi = scores.flatten(1).max(1).values.view(-1, 1, 1)
                preds = ((scores - lo) / (hi - lo).clamp(min=1e-8) > args.ref_threshold).cpu()
                for pred, gt in zip(preds, masks):
                    inter, union = (pred & gt).sum().item(), (pred | gt).sum().item()
                    totals[m] += torch.tensor([inter, union, inter / union if union else 0.0, 1],
                                              dtype=torch.float64)
        # one collective per split for all methods, on the backend's device
        totals = tagalign.all_reduce_sum(totals)
        for method, t in zip(methods, totals.tolist()):
            results[method][split] = {"miou": 100 * t[2] / max(t[3], 1),
                                      "oiou": 100 * t[0] / max(t[1], 1), "expressions": int(t[3])}
    return {method: {"dataset": name, "splits": splits, "threshold": args.ref_threshold,
                     "stride": kw["stride"], "settings": kw, "protocol": "ours"}
            for method, splits in results.items()}


# --------------------------------------------------------------------------------------------------
# Command line

def results_table(results, pamr, labels=None):
    """The methods x datasets table as (header, rows); values are mIoU in % (None: no number). A row
    per method, in the order met, named by labels[method]; columns: the segmentation datasets as
    evaluated, 'mean' over them, then one column per RefCOCO split (mean per-expression IoU; the
    protocol is ours*); last a row with the paper's TagAlign numbers (its PAMR ones under --pamr)
    and their mean over the same datasets."""
    labels = labels or {}
    methods, columns, cell = [], [], {}  # columns: a dataset name, or a (dataset, split) of RefCOCO
    for r in results:
        method = r.get("method", "")
        methods += [method] if method not in methods else []
        scores = [((r["dataset"], s), v["miou"]) for s, v in r["splits"].items()] if "splits" in r \
            else [(r["dataset"], r["miou"])]
        for key, miou in scores:
            columns += [key] if key not in columns else []
            cell[method, key] = miou
    seg = [c for c in columns if isinstance(c, str)]
    refer = [c for c in columns if not isinstance(c, str)]
    header = ["method", *seg, *(["mean"] if seg else []),
              *[f"{d} {s} (our protocol*)" for d, s in refer]]
    paper = {**{d: v[1 if pamr else 0] for d, v in PAPER.items()}, **PAPER_REFER}
    sources = [(labels.get(m, m), lambda key, m=m: cell.get((m, key))) for m in methods]
    rows = []
    for label, value in sources + [("paper (TagAlign)", paper.get)]:
        values = [value(key) for key in seg]
        mean = [sum(values) / len(values) if None not in values else None] if seg else []
        rows.append([label, *values, *mean, *[value(key) for key in refer]])
    # e.g. a folder dataset only: the paper has nothing to say
    if all(v is None for v in rows[-1][1:]):
        rows.pop()
    return header, rows


def markdown_table(header, rows):
    """results_table's (header, rows) in Markdown: 2 decimals, '-' where there is no number."""
    cells = lambda row: "| " + " | ".join(v if isinstance(v, str) else "-" if v is None
                                         else f"{v:.2f}" for v in row) + " |"
    return "\n".join([cells(header), "|" + "---|" * len(header)] + [cells(row) for row in rows])


def write_csv(path, header, rows):
    """The table for spreadsheets: 4 decimals, an empty cell where there is no number."""
    import csv
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(header)
        out.writerows([row[0], *("" if v is None else f"{v:.4f}" for v in row[1:])] for row in rows)


def code_version():
    """The git commit of this checkout (with '-dirty' when tracked files have
    uncommitted changes), or 'unknown'."""
    try:
        git = lambda *a: subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True,
                                        timeout=30, check=True).stdout.strip()
        return git("rev-parse", "--short", "HEAD") \
            + ("-dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(args, methods, names, per_dataset, surgery_layers, clip, quick_gelu):
    """A command that reruns this evaluation: every flag that changes a number, with its effective
    value (defaults written out, so that a later change of a default does not change what the
    command does). Per-dataset values (threshold, stride) come from the code's table unless a flag
    overrode them."""
    argv = ["python3", "evaluate.py"] \
        + (["--checkpoint", args.checkpoint] if args.checkpoint else []) \
        + ["--clip", clip, "--clip-act", "quickgelu" if quick_gelu else "gelu"]
    if surgery_layers is not None and not args.checkpoint:
        argv += ["--surgery-layers", str(surgery_layers)]
    argv += ["--methods", ",".join(methods), "--datasets", ",".join(names),
             "--data-root", args.data_root, "--rule", args.rule,
             "--clip-weight", str(args.clip_weight), "--templates", args.templates]
    for flag, key in (("--window", "window"), ("--short-side", "short_side")):
        values = {s[key] for s in per_dataset.values()}
        # one value for every dataset (always so today): one flag gives it back
        if len(values) == 1:
            argv += [flag, str(values.pop())]
    if args.stride:
        argv += ["--stride", str(args.stride)]
    if args.bg_threshold is not None:
        argv += ["--bg-threshold", str(args.bg_threshold)]
    if any(n in REFER for n in names):
        argv += ["--ref-threshold", str(args.ref_threshold)]
    argv += (["--pamr"] if args.pamr else []) + (["--limit", str(args.limit)] if args.limit else [])
    return shlex.join(argv + ["--out", args.out])


def run_settings(args, methods, names, results, model, world):
    """What produced the numbers, for results.json and the report: per dataset the segment()
    settings and the number of images (expressions for RefCOCO), and the run-wide ones."""
    per_dataset = {}
    # every method of a dataset ran with the same settings: the first record says them
    for r in results:
        if r["dataset"] not in per_dataset:
            count = r["images"] if "images" in r \
                else sum(s["expressions"] for s in r["splits"].values())
            per_dataset[r["dataset"]] = {"images" if "images" in r else "expressions": count,
                                         **r["settings"]}
            if r.get("benchmark_images"):
                per_dataset[r["dataset"]]["benchmark_images"] = r["benchmark_images"]
    cfg = model.clip.cfg
    # the CLIP used: --clip, else the checkpoint's, else load_model's default (written out in
    # the command)
    clip = args.clip or (tagalign.read_checkpoint(args.checkpoint)["clip"] if args.checkpoint
                         else "ViT-B/16")
    # the methods that use them
    surgery_methods = [m for m in methods if m in ("tagalign", "surgery")]
    surgery_layers = model.cfg.surgery_layers if surgery_methods else None
    return {"command": command_line(args, methods, names, per_dataset, surgery_layers, clip,
                                    cfg.quick_gelu),
            "datasets": per_dataset,
            "rule": args.rule, "clip_weight": args.clip_weight, "templates": args.templates,
            "template_count": len(tagalign.load_templates(args.templates)), "pamr": args.pamr,
            "ref_threshold": args.ref_threshold if any(n in REFER for n in names) else None,
            "clip": clip,
            "clip_architecture": clip_model.describe(model.clip), "clip_blocks": cfg.vision_layers,
            "checkpoint": args.checkpoint,
            "surgery_layers": surgery_layers, "surgery_methods": surgery_methods,
            "limit": args.limit, "processes": world, "code": code_version()}


REFER_NOTE = ("* referring protocol is ours, not the paper's (the authors released none): the "
              "expression itself is the text query, its blended cosine map is min-max normalised "
              "and thresholded at --ref-threshold; the paper row is the paper's own, unknown, "
              "protocol. Cells are mIoU (mean per-expression IoU); oIoU is in results.json.")


def report(header, rows, s):
    """The Markdown printed after a run and written as results.md: the table, what its mean and
    stars mean, and the settings s (run_settings) with the command that reproduces them."""
    refer = any(h.endswith("(our protocol*)") for h in header)
    seg = [h for h in header[1:] if h != "mean" and not h.endswith("(our protocol*)")]
    lines = [f"**LIMITED RUN: only the first {s['limit']} images of each dataset "
             f"(--limit {s['limit']}); not comparable with full-benchmark numbers.**",
             ""] if s["limit"] else []
    off = {name: d for name, d in s["datasets"].items()
           if not s["limit"] and d.get("benchmark_images") not in (None, d.get("images"))}
    if off:
        fewer = all(d["images"] < d["benchmark_images"] for d in off.values())
        counts = ", ".join(f"{name} {d['images']:,} of {d['benchmark_images']:,}"
                           for name, d in off.items())
        lines += [f"**{'INCOMPLETE DATA' if fewer else 'DATA DIFFERS FROM THE BENCHMARK'}: "
                  f"{counts} images found; not comparable with full-benchmark numbers "
                  "(`evaluate.py --check` lists what differs).**", ""]
    lines += [markdown_table(header, rows), ""]
    if seg:
        lines.append(f"mean: over the {len(seg)} segmentation dataset(s) of this run"
                     + ("; the RefCOCO columns are not in it." if refer else "."))
    if refer:
        lines.append(REFER_NOTE)
    lines += ["", "## Settings", "", "    " + s["command"], "",
              "| dataset | images | background threshold | stride | window | short side | rule |",
              "|---|---|---|---|---|---|---|"]
    for name, d in s["datasets"].items():
        count = d["images"] if "images" in d else f"{d['expressions']} expressions"
        if "images" in d and d.get("benchmark_images") not in (None, d["images"]):
            count = f"{d['images']:,} of {d['benchmark_images']:,}"
        bg = "none" if d["bg_threshold"] is None else d["bg_threshold"]
        lines.append(f"| {name} | {count} | {bg} | {d['stride']} | {d['window']} | "
                     f"{d['short_side']} | {d['rule']} |")
    inference = [f"rule {s['rule']}, clip weight a = {s['clip_weight']}",
                 f"templates {s['templates']} ({s['template_count']}; "
                 "RefCOCO: the expression itself)",
                 f"PAMR {'on (each window, on its patch grid)' if s['pamr'] else 'off'}"]
    inference += [f"RefCOCO threshold {s['ref_threshold']}"] \
        if s["ref_threshold"] is not None else []
    model = [f"CLIP {s['clip']} ({s['clip_architecture']})",
             f"checkpoint {s['checkpoint'] or 'none'}"]
    if s["surgery_layers"] is not None:
        model.append(f"surgery layers {s['surgery_layers']} "
                     f"(the last of {s['clip_blocks']} blocks; "
                     + " and ".join("tagalign" if m == "tagalign" else "the surgery baseline"
                                    for m in s["surgery_methods"]) + ")")
    run = [f"images: the first {s['limit']} per dataset" if s["limit"] else "images: all",
           f"processes {s['processes']}", f"code {s['code']}"]
    lines += [""] + ["- " + "; ".join(part) for part in (inference, model, run)]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate TagAlign (or a training-free baseline) "
                                            "on the benchmarks")
    p.add_argument("--methods", default=None,
                   help="comma-separated feature sources, scored on the same decoded images and "
                        "printed as one table: tagalign (needs --checkpoint beside others), "
                        f"{', '.join(tagalign.BASELINES)}; "
                        "'baselines' (all of these) or 'all' (tagalign and the baselines)")
    p.add_argument("--method", default=None,
                   help="one feature source: the same as --methods NAME (default tagalign)")
    p.add_argument("--dist-timeout", type=float, default=60,
                   help="minutes a process may wait in a collective for the others (NCCL's default "
                        "is 10): the first process of a node downloads the CLIP while the others "
                        "wait")
    p.add_argument("--dataset", default=None,
                   help="one dataset: " + ", ".join(STANDARD + list(REFER)))
    p.add_argument("--datasets", default=None,
                   help="comma-separated datasets, or 'all' (the ten) or 'refer'")
    p.add_argument("--data-root", required=True,
                   help="folder holding the datasets' folders (see the docstring)")
    p.add_argument("--window-batch", type=int, default=16, help="windows per forward")
    tagalign.add_inference_flags(p, per_dataset=True)
    p.add_argument("--ref-threshold", type=float, default=0.5,
                   help="RefCOCO: threshold on the min-max normalised map")
    p.add_argument("--limit", type=int, default=0,
                   help="evaluate only the first N images per dataset (0: all)")
    p.add_argument("--out", default="out/eval", help="folder for results.json and prediction PNGs")
    p.add_argument("--save-predictions", type=int, default=0,
                   help="write PNGs (photo | truth | each method's prediction) of the first N "
                        "images")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    p.add_argument("--check", action="store_true",
                   help="check the prepared datasets (counts, label values, missing files) without "
                   "a model, then exit; status 1 when something is wrong")
    return p.parse_args(argv)


def requested_methods(args):
    """--methods (or --method) -> list of method names, in the given order, each once. tagalign
    without --checkpoint is its untrained model (identity projector = CLIP Surgery on
    --surgery-layers blocks): allowed alone, as the 'before training' measurement (demo.py), and
    labelled untrained in the table; refused beside other methods, where its row would pass for
    TagAlign in the comparison."""
    if args.method and args.methods:
        raise ValueError("give --method or --methods, not both")
    groups = {"all": ["tagalign", *tagalign.BASELINES], "baselines": list(tagalign.BASELINES)}
    given = [n.strip() for n in (args.methods or args.method or "tagalign").split(",") if n.strip()]
    # a method named twice runs once
    names = list(dict.fromkeys(m for n in given for m in groups.get(n, [n])))
    unknown = [n for n in names if n not in ("tagalign",) + tagalign.BASELINES]
    if not names or unknown:
        raise ValueError(f"unknown or no method {unknown}; choose from tagalign, "
                         f"{', '.join(tagalign.BASELINES)}, baselines, all")
    if "tagalign" in names and len(names) > 1 and not args.checkpoint:
        raise ValueError("method tagalign needs --checkpoint when compared with other methods "
                         "(without one it is the untrained projector, i.e. CLIP Surgery); pass "
                         "--checkpoint, or drop tagalign (--methods baselines)")
    return names


def requested_datasets(args):
    names = (args.datasets or args.dataset or "").split(",")
    # a dataset named twice runs once
    names = STANDARD if names == ["all"] else list(REFER) if names == ["refer"] else \
        list(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in names if n not in DATASETS and n not in REFER]
    if not names or unknown:
        raise ValueError(f"unknown or no dataset {unknown}; choose from "
                         f"{', '.join(STANDARD + list(REFER))}, all, refer")
    return names


def check_inputs(args, names):
    """Everything a run needs that can be checked in a second, before CLIP is loaded (or downloaded)
    and before any process group starts: flag values, the checkpoint and CLIP files, every requested
    dataset's layout. Raises ValueError or FileNotFoundError with a one-line message."""
    for flag in ("window", "short_side", "window_batch"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                             f"got {getattr(args, flag)}")
    if args.stride is not None and args.stride <= 0:
        raise ValueError(f"--stride must be positive, got {args.stride}")
    for flag in ("limit", "save_predictions"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if not 0 <= args.clip_weight <= 1:
        raise ValueError(f"--clip-weight must be in [0, 1], got {args.clip_weight}")
    if not 0 <= args.ref_threshold < 1:
        raise ValueError(f"--ref-threshold must be in [0, 1), got {args.ref_threshold}")
    # (load_model checks --surgery-layers)
    tagalign.check_model_files(args.checkpoint, args.clip, args.window)
    if not os.path.isdir(args.data_root):
        raise FileNotFoundError(f"--data-root {args.data_root} is not a folder")
    for name in names:
        if name in REFER:
            refer_paths(name, args.data_root)
            continue
        dataset_classes(name, args.data_root)
        pairs, _, _ = find_pairs(DATASETS[name], args.data_root)
        if not pairs:
            spec = DATASETS[name]
            raise FileNotFoundError(f"{name}: no image/label pairs under "
                                    f"{os.path.join(args.data_root, spec['root'])} "
                                    f"({spec['img']}/*{spec['img_suffix']} with "
                                    f"{spec['ann']}/*{spec['seg_suffix']})")


# ---- --check: the prepared data alone, no model

# Datasets that read exactly the files of another: with reduce_zero_label a raw value is valid for
# the alias when it is for the other (voc: 0..20 or 255; voc20: raw 0 and 255 ignored,
# 1..20 -> 0..19), so --check reads them once.
SAME_FILES = {"voc20": "voc", "context59": "context"}


def check_data(names, root, progress=True, listed=20):
    """Check prepared datasets without a model: the image/label pairs found against the official
    split's count, images without a label and labels without an image, each label's mode, size (that
    of its image) and values (inside the dataset's class range or its ignore id, after mmseg's
    reduce_zero_label). Prints one line per dataset, then every problem (at most `listed` files per
    kind and dataset); returns the list of problems. A dataset reading the files of one checked just
    before (SAME_FILES: voc20 after voc, context59 after context) is not read again: its line
    repeats that outcome."""
    from PIL import Image
    from tqdm import tqdm
    # outcome: name -> True when its files were checked and nothing was wrong
    problems, outcome = [], {}
    for name in names:
        found = []
        same = SAME_FILES.get(name)
        # e.g. voc20 after voc: the same pairs, and the same label values are valid in both
        if same in outcome:
            spec, n = DATASETS[name], len(read_classes(DATASETS[name]["classes"]))
            print(f"{name:14s} {'OK' if outcome[same] else 'FAIL':6s} same files as {same} "
                  f"(checked above); labels 0..{n - 1}, ignore {spec.get('ignore', 255)}")
            continue
        try:
            if name in REFER:
                refer_paths(name, root)
                print(f"{name:14s} OK     files present (expressions are not checked)")
                continue
            spec, classes = DATASETS[name], dataset_classes(name, root)
            pairs, no_label, no_image = find_pairs(spec, root)
        except FileNotFoundError as e:
            print(f"{name:14s} FAIL   not found")
            problems.append(f"{name}: {e}")
            continue
        expected = EXPECTED_COUNTS.get(name)
        if expected is not None and len(pairs) != expected:
            found.append(f"{len(pairs)} image/label pairs, the official split has {expected:,}")
        found += [f"image without label: {s}" for s in no_label[:listed]]
        found += [f"label without image: {s}" for s in no_image[:listed]]
        for kind, rest in (("images without label", no_label[listed:]),
                           ("labels without image", no_image[listed:])):
            if rest:
                found.append(f"... and {len(rest)} more {kind}")
        bad_files = []
        for img_path, ann_path in tqdm(pairs, desc=f"check {name}", disable=not progress,
                                       leave=False):
            try:
                label, bad = load_label(ann_path, spec, len(classes))
            except (OSError, ValueError) as e:
                bad_files.append(f"{ann_path}: unreadable label ({e})")
                continue
            try:
                with Image.open(img_path) as img:  # reads the header only
                    size = img.size
            except (OSError, ValueError) as e:
                bad_files.append(f"{img_path}: unreadable image ({e})")
                continue
            if bad:
                bad_files.append(f"{ann_path}: values {bad} outside 0..{len(classes) - 1}"
                                 + (" after reduce_zero_label (raw value - 1)"
                                    if spec.get("reduce_zero") else ""))
            if (label.shape[1], label.shape[0]) != size:
                bad_files.append(f"{ann_path}: {label.shape[1]}x{label.shape[0]}, "
                                 f"its image is {size[0]}x{size[1]}")
        found += bad_files[:listed] + ([f"... and {len(bad_files) - listed} more bad labels"]
                                       if len(bad_files) > listed else [])
        count = f"{len(pairs)} pairs" \
            + (f" (official {expected:,})" if expected is not None else "")
        values = f"labels 0..{len(classes) - 1}, ignore {spec.get('ignore', 255)}"
        print(f"{name:14s} {'FAIL' if found else 'OK':6s} {count}; {values}"
              + (f"; {len(found)} problem(s)" if found else ""))
        problems += [f"{name}: {p}" for p in found]
        outcome[name] = not found
    if problems:
        print("\nWhat is wrong:")
        for p in problems:
            print(f"  {p}")
    return problems


def main(argv=None):
    args = parse_args(argv)
    if args.check:  # data only: no checkpoint, no CLIP, no process group
        try:
            names = requested_datasets(args)
        except ValueError as e:
            sys.exit(f"error: {e}")
        sys.exit(1 if check_data(names, args.data_root, args.progress) else 0)
    # bad input fails here, in a second, on every rank alike (no rank waits in a collective
    # for another)
    try:
        names = requested_datasets(args)
        methods = requested_methods(args)
        check_inputs(args, names)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # RuntimeError: an unreadable checkpoint
        sys.exit(f"error: {e}")
    try:
        # GPU LOCAL_RANK set before NCCL starts; the timeout covers rank 0 downloading a CLIP for
        # the node
        rank, world, device = ddp.init_distributed(args.dist_timeout)
        model = tagalign.load_model(args.checkpoint, args.clip, args.surgery_layers, device,
                                    clip_model.ACTIVATIONS[args.clip_act])
        apply_backbone(args, model.clip)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:
        results = run(args, names, methods, model, rank, world, device)
    except BaseException:
        # e.g. a bad label file on one rank: no final barrier, which the others may never reach
        ddp.end_distributed(finished=False)
        raise
    ddp.end_distributed()
    return results


def run(args, names, methods, model, rank, world, device):
    """Every requested method on every requested dataset; rank 0 prints and writes
    the table and settings."""
    if rank == 0:
        print(f"CLIP: {clip_model.describe(model.clip)}", file=sys.stderr)
    templates = tagalign.load_templates(args.templates)
    features = {m: tagalign.feature_fn(model, m) for m in methods}  # all of them on the one CLIP
    labels = {m: m for m in methods}
    # alone (requested_methods): say what it really is
    if "tagalign" in methods and not args.checkpoint:
        labels["tagalign"] = (f"tagalign (untrained = CLIP Surgery, "
                              f"surgery_layers={model.cfg.surgery_layers})")
        if rank == 0:
            print(f"note: no --checkpoint: evaluating {labels['tagalign']}", file=sys.stderr)
    embed_classes = lambda names_: tagalign.text_embeddings(model.clip, names_,
                                                            templates).to(device)
    embed_expressions = lambda sentences: tagalign.text_embeddings(model.clip, sentences,
                                                                   ["{}"]).to(device)
    results = []  # one record per (dataset, method), as evaluated
    t0 = time.time()
    for name in names:
        if name in REFER:
            by_method = evaluate_refer_methods(name, features, embed_expressions, args, rank, world)
        else:
            by_method = evaluate_methods(name, features, embed_classes, args, rank, world, args.out)
        results += [{"method": m, **r} for m, r in by_method.items()]
    if rank == 0:
        header, rows = results_table(results, args.pamr, labels)
        setup = run_settings(args, methods, names, results, model, world)
        text = report(header, rows, setup)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"command": setup["command"], "settings": setup, "methods": labels,
                       "table": {"header": header, "rows": rows}, "results": results,
                       "args": vars(args), "seconds": time.time() - t0}, f, indent=1)
        write_csv(os.path.join(args.out, "results.csv"), header, rows)
        with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(text)
        print(f"\ntable also in {os.path.join(args.out, 'results.csv')} and results.md; "
              "per-class IoU in results.json")
    return results


if __name__ == "__main__":
    main()
