"""evaluate.py: mIoU against hand-computed values and an independent per-class computation; every dataset as a tiny
fixture in its exact on-disk layout and label encoding, scored end to end with an oracle whose predictions are
known; RefCOCO masks against pycocotools; one process vs two gloo processes; bad input."""
import argparse
import json
import math
import os
import pickle
import random
import subprocess
import sys
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clip_model
import ddp
import evaluate
import tagalign
from conftest import ROOT, TINY

# Fixture images are 448 x 448 (no resize, one window) made of 64-pixel blocks of flat colours; the oracle reads
# each patch's colour, so its prediction is exact.
COLOURS = [(230, 30, 30), (30, 200, 40), (40, 60, 230), (240, 230, 40), (230, 40, 220), (40, 220, 230),
           (130, 130, 130), (250, 250, 250), (10, 10, 10)]
BACKGROUND = 8  # colour index the oracle maps to no class (orthogonal to every text embedding)
# One embedding dimension per class name of any benchmark (+1 for "no class"): the oracle and the text embedder
# agree on names, so a prompt list in the wrong order or with an extra entry shows up as wrong predictions.
NAMES = sorted({n for name in evaluate.STANDARD for n in evaluate.read_classes(evaluate.DATASETS[name]["classes"])}
               | {"Yellow square", "the yellow one", "MAGENTA box"})
DIM = {n: i for i, n in enumerate(NAMES)}
D = len(NAMES) + 1


def oracle(colour_to_prompt, threshold=None, n_prompts=None):
    """features(windows) for the inference path: the unit vector of the prompt index of each patch's colour
    (background colours: a direction orthogonal to every prompt, so the v3 score is uniform, 1/C).
    With a background threshold the class score t is calibrated so that (t + 1/C) / 2 = threshold: the score
    map, linearly interpolated between patch centres, then crosses the threshold exactly on the region
    boundary, and the predictor is perfect also where background meets a class."""
    a = 1.0
    if threshold is not None:
        target = 2 * threshold - 1 / n_prompts  # softmax(30 a) of the class among n_prompts, the others at cos 0
        a = math.log(target * (n_prompts - 1) / (1 - target)) / 30
    mean = torch.tensor(clip_model.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(clip_model.IMAGENET_STD).view(1, 3, 1, 1)
    palette = torch.tensor(COLOURS, dtype=torch.float)

    def features(windows):
        rgb = (windows * std + mean) * 255
        centres = rgb[:, :, 8::16, 8::16].permute(0, 2, 3, 1)  # (n, h, w, 3)
        nearest = torch.cdist(centres.reshape(-1, 3), palette).argmin(1).view(centres.shape[:3])
        dims = torch.tensor([DIM[colour_to_prompt[c]] if c in colour_to_prompt else D - 1
                             for c in range(len(COLOURS))])[nearest]
        f = torch.nn.functional.one_hot(dims, D).float()
        is_class = (dims != D - 1).unsqueeze(-1)
        f = torch.where(is_class, a * f + math.sqrt(1 - a * a) * torch.nn.functional.one_hot(torch.tensor(D - 1), D), f)
        return f, f
    return features


def embed_identity(names):
    return torch.stack([torch.nn.functional.one_hot(torch.tensor(DIM[n]), D).float() for n in names])


def args_for(root, **kw):
    base = dict(data_root=str(root), rule="v3", clip_weight=0.5, bg_threshold=None, stride=None, window=448, short_side=448,
                patch_size=16, window_batch=4, pamr=False, limit=0, save_predictions=0, progress=False, ref_threshold=0.5)
    base.update(kw)
    return argparse.Namespace(**base)


def block_layout(seed, class_colours):
    """Seven 64-pixel horizontal bands of colour indices -> (448, 448) colour index map. Bands, not a
    checkerboard: where three regions meet, bilinear upsampling of the 16-pixel patch maps lets the two
    neighbours outvote a corner pixel, so only 1-D boundaries (on the patch grid) come out exact."""
    rng = random.Random(seed)
    colours = class_colours + [rng.choice(class_colours) for _ in range(7 - len(class_colours))]
    rng.shuffle(colours)
    return torch.tensor(colours).repeat_interleave(64).view(448, 1).expand(448, 448).clone()


def save_image(path, cmap, fmt=None):
    from PIL import Image
    rgb = torch.tensor(COLOURS, dtype=torch.uint8)[cmap]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rgb.numpy()).save(path, quality=100, subsampling=0) if fmt == "jpeg" else Image.fromarray(rgb.numpy()).save(path)


def save_label(path, label, mode):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "rgb":  # ImageNet-S: id = R + 256 G
        rgb = torch.stack([label % 256, label // 256, torch.zeros_like(label)], -1).to(torch.uint8)
        Image.fromarray(rgb.numpy(), "RGB").save(path)
    else:
        img = Image.fromarray(label.to(torch.uint8).numpy(), "L")
        if mode == "P":  # VOC: a palette PNG whose indices are the class ids
            img = img.convert("P")
            img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
        img.save(path)


# dataset -> (raw label of each used colour; None = the colour is not a class), special raw values to paint
FIXTURES = {
    "voc": ({0: 1, 1: 15, 2: 20, BACKGROUND: 0}, 255, "P"),
    "voc20": ({0: 1, 1: 15, 2: 20, BACKGROUND: 0}, 255, "P"),
    "context": ({0: 1, 1: 33, 2: 59, BACKGROUND: 0}, None, "L"),
    "context59": ({0: 1, 1: 33, 2: 59, BACKGROUND: 0}, None, "L"),
    "coco_object": ({0: 1, 1: 45, 2: 80, BACKGROUND: 0}, None, "L"),
    "coco_stuff": ({0: 0, 1: 90, 2: 170}, 255, "L"),
    "cityscapes": ({0: 0, 1: 11, 2: 18}, 255, "L"),
    "ade": ({0: 1, 1: 8, 2: 150, BACKGROUND: 0}, None, "L"),
    "imagenet_s50": ({0: 1, 1: 25, 2: 50, BACKGROUND: 0}, 1000, "rgb"),
    "imagenet_s300": ({0: 1, 1: 256, 2: 300, BACKGROUND: 0}, 1000, "rgb"),
}


def build_fixture(root, name, n_images=3):
    """Write the dataset's files in its exact layout; return colour -> the class name the colour shows."""
    spec = evaluate.DATASETS[name]
    colour_raw, ignore_raw, mode = FIXTURES[name]
    base = root / spec["root"]
    stems = []
    for i in range(n_images):
        stem = {"cityscapes": f"frankfurt/frankfurt_{i:06d}_000019", "imagenet_s50": f"n01443537/ILSVRC2012_val_{i:08d}",
                "imagenet_s300": f"n01443537/ILSVRC2012_val_{i:08d}", "voc": f"2007_{i:06d}",
                "voc20": f"2007_{i:06d}"}.get(name, f"{i:012d}")
        stems.append(stem)
        cmap = block_layout(i + zlib.crc32(name.encode()) % 100, list(colour_raw))  # stable across runs
        label = torch.zeros_like(cmap)
        for c, v in colour_raw.items():
            label[cmap == c] = v
        if ignore_raw is not None:
            label[:32, :] = ignore_raw  # an ignored band (VOC's boundary 255, ImageNet-S's 1000)
        save_image(str(base / spec["img"] / (stem + spec["img_suffix"])), cmap,
                   "jpeg" if spec["img_suffix"].lower() in (".jpg", ".jpeg") else None)
        save_label(str(base / spec["ann"] / (stem + spec["seg_suffix"])), label, mode)
    if spec.get("split"):
        split = base / spec["split"]
        os.makedirs(split.parent, exist_ok=True)
        split.write_text("\n".join(stems) + "\n")
    classes, named = evaluate.read_classes(spec["classes"]), {}
    for c, raw in colour_raw.items():
        if c == BACKGROUND:  # raw 0: ignored (reduce_zero) or decided by the threshold, never a prompt
            continue
        named[c] = classes[raw - 1 if spec.get("reduce_zero") else raw]
    return named


# ---------------------------------------------------------------------------------------------- metric

def test_iou_hand_computed():
    gt = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1]])
    cm = evaluate.confusion(pred, gt, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    iou, miou, acc = evaluate.iou_from_confusion(cm)
    # class 0: TP 2, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1 -> 2/3; class 2: TP 1, FN 1 -> 1/2
    assert iou.tolist() == pytest.approx([0.5, 2 / 3, 0.5])
    assert miou == pytest.approx((0.5 + 2 / 3 + 0.5) / 3) and acc == pytest.approx(5 / 7)
    iou, miou, _ = evaluate.iou_from_confusion(evaluate.confusion(pred, gt, 4))
    assert math.isnan(iou[3]) and miou == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)  # absent class skipped


def test_iou_against_independent_computation_on_random_maps():
    g = torch.Generator().manual_seed(0)
    C = 7
    cm = torch.zeros(C, C, dtype=torch.long)
    tp, fp, fn = torch.zeros(C), torch.zeros(C), torch.zeros(C)
    for _ in range(5):
        gt = torch.randint(0, C, (40, 50), generator=g)
        gt[torch.rand(40, 50, generator=g) < 0.2] = 255
        pred = torch.where(torch.rand(40, 50, generator=g) < 0.6, gt.clamp(max=C - 1), torch.randint(0, C, (40, 50), generator=g))
        cm += evaluate.confusion(pred, gt, C)
        valid = gt != 255
        for c in range(C):  # per class with boolean masks, the textbook definition
            tp[c] += ((pred == c) & (gt == c) & valid).sum()
            fp[c] += ((pred == c) & (gt != c) & valid).sum()
            fn[c] += ((pred != c) & (gt == c) & valid).sum()
    iou, miou, _ = evaluate.iou_from_confusion(cm)
    expected = tp / (tp + fp + fn)
    assert torch.allclose(iou.float(), expected, atol=1e-6) and miou == pytest.approx(expected.mean().item(), abs=1e-6)


def test_a_label_of_another_size_than_its_image_is_an_error_and_a_last_class_without_newline_counts(tmp_path):
    """Only ImageNet-S shrinks images, so only there is a prediction resized to its label; elsewhere a label of
    another size is a wrongly prepared file, which must stop the run rather than be scored after a resize."""
    to_prompt = build_fixture(tmp_path, "voc")
    spec = evaluate.DATASETS["voc"]
    path = tmp_path / spec["root"] / spec["ann"] / ("2007_000001" + spec["seg_suffix"])
    save_label(str(path), torch.zeros(100, 60, dtype=torch.long), "P")
    with pytest.raises(ValueError, match=r"2007_000001.png: label \(100, 60\) but image 448x448 .*evaluate.py --check --datasets voc"):
        evaluate.evaluate_dataset("voc", calibrated("voc", to_prompt), embed_identity, args_for(tmp_path))
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue")  # no newline after the last class
    assert evaluate.dataset_classes("folder", str(tmp_path)) == ["red", "green", "blue"]
    for name in {spec["classes"] for spec in evaluate.DATASETS.values() if spec.get("classes")}:  # shipped lists
        with open(os.path.join(evaluate.HERE, "data", name), encoding="utf-8") as f:
            assert evaluate.read_classes(name) == f.read().split("\n")[:-1]  # unchanged by the new reader


# ---------------------------------------------------------------------------------------------- every dataset

def calibrated(name, to_prompt):
    spec = evaluate.DATASETS[name]
    n = len(evaluate.read_classes(spec["classes"])) - 1
    return oracle(to_prompt, spec["bg"], n) if spec.get("bg") is not None else oracle(to_prompt)


@pytest.mark.parametrize("name", list(FIXTURES))
def test_perfect_predictor_scores_100_on_every_dataset(tmp_path, name):
    to_prompt = build_fixture(tmp_path, name)
    result = evaluate.evaluate_dataset(name, calibrated(name, to_prompt), embed_identity, args_for(tmp_path))
    assert result["images"] == 3 and not result["bad_label_values"]
    assert result["miou"] == pytest.approx(100.0, abs=1e-6), result["per_class_iou"]
    scored = [c for c, v in result["per_class_iou"].items() if v is not None]
    expected = {"voc": 4, "voc20": 3, "context": 4, "context59": 3, "coco_object": 4, "coco_stuff": 3,
                "cityscapes": 3, "ade": 3, "imagenet_s50": 4, "imagenet_s300": 4}[name]
    assert len(scored) == expected, scored  # background counts where it is a class, is ignored where reduced


def test_swapped_class_gives_the_computed_miou(tmp_path):
    to_prompt = build_fixture(tmp_path, "voc")
    from PIL import Image
    counts = torch.zeros(21, dtype=torch.long)
    for stem in (tmp_path / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split():
        label = evaluate.pil_to_long(Image.open(tmp_path / f"VOCdevkit/VOC2012/SegmentationClass/{stem}.png"))
        counts += torch.bincount(label[label != 255], minlength=256)[:21]
    swapped = {**to_prompt, 1: to_prompt[2]}  # class 15's colour predicted as class 20
    result = evaluate.evaluate_dataset("voc", calibrated("voc", swapped), embed_identity, args_for(tmp_path))
    # background and class 1 perfect; class 15: IoU 0; class 20: TP = n20, union = n20 + n15
    expected = (1 + 1 + 0 + counts[20] / (counts[20] + counts[15])) / 4
    assert result["miou"] == pytest.approx(100 * expected.item(), abs=1e-4)


def test_background_threshold_and_rule_v1(tmp_path):
    to_prompt = build_fixture(tmp_path, "voc")
    # threshold 1.01: every pixel is background -> only the background class has TP
    result = evaluate.evaluate_dataset("voc", oracle(to_prompt), embed_identity, args_for(tmp_path, bg_threshold=1.01))
    assert result["per_class_iou"]["background"] > 0 and result["per_class_iou"]["aeroplane"] == 0
    v1 = evaluate.evaluate_dataset("voc", oracle(to_prompt), embed_identity, args_for(tmp_path, rule="v1"))
    # v1: classes score 0.7 s(7.5) + 0.3 s(7.5) = 0.9994, background 0.076; the 0.4 crossing sits 5 pixels
    # into the background band at each class/background boundary
    assert v1["stride"] == 224 and v1["background_threshold"] == 0.4
    assert v1["per_class_iou"]["aeroplane"] < 100 and v1["miou"] > 95


def test_imagenet_s_large_image_is_shrunk_and_scored_at_label_size(tmp_path):
    to_prompt = build_fixture(tmp_path, "imagenet_s50", n_images=0)  # only the large image below
    spec = evaluate.DATASETS["imagenet_s50"]
    stem = "n01443537/ILSVRC2012_val_00000009"
    # 1008 x 1120 pixels (area > 1000^2) in 192-pixel bands, about 85 pixels after the shrink and the resize
    cmap = torch.tensor([0, 1, 2, 0, 1, 2]).repeat_interleave(192)[:1120].view(1120, 1).expand(1120, 1008).clone()
    save_image(str(tmp_path / spec["root"] / spec["img"] / (stem + ".JPEG")), cmap, "jpeg")
    label = torch.tensor([1, 25, 50])[cmap]
    save_label(str(tmp_path / spec["root"] / spec["ann"] / (stem + ".png")), label, "rgb")
    result = evaluate.evaluate_dataset("imagenet_s50", calibrated("imagenet_s50", to_prompt), embed_identity,
                                       args_for(tmp_path, stride=448))
    # the bands survive the shrink (1120 -> 1000 px) and the resize (-> 448 short side) with their boundaries off
    # the patch grid: a few pixel rows per boundary go wrong, some of them to background (absent from the truth,
    # so its IoU is 0); the prediction is scored at the label's 1008 x 1120
    iou = result["per_class_iou"]
    assert result["images"] == 1 and iou["background"] == 0
    assert all(85 < iou[c] < 100 for c in ("goldfish", "clog", "agaric")), iou


# SPEC section 7's table, written out here: (background threshold or None, window stride) of rule v3
SPEC_TABLE = {"voc": (0.45, 56), "context": (0.1, 56), "coco_object": (0.3, 56), "imagenet_s50": (0.3, 56),
              "imagenet_s300": (0.1, 56), "voc20": (None, 56), "context59": (None, 112), "coco_stuff": (None, 56),
              "cityscapes": (None, 56), "ade": (None, 56)}


def spec7_input(path):
    """SPEC section 7's input: the image file, short side resized to 448 (long side <= 2048; sizes rounded as
    mmcv's rescale does, int(x + 0.5)), ImageNet-normalised -> (1, 3, H, W), and the original (H0, W0)."""
    from PIL import Image
    import numpy as np
    rgb = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)
    img = rgb.permute(2, 0, 1)[None]  # (1, 3, H0, W0)
    H0, W0 = img.shape[-2:]
    s = min(448 / min(H0, W0), 2048 / max(H0, W0))
    x = torch.nn.functional.interpolate(img, size=(int(H0 * s + 0.5), int(W0 * s + 0.5)), mode="bilinear",
                                        align_corners=False)
    x = (x - torch.tensor(clip_model.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(clip_model.IMAGENET_STD).view(3, 1, 1)
    return x, (H0, W0)


def spec7_transcription(model, path, text, bg, stride, a=0.5, window=448):
    """SPEC section 7 written out for one image file, independently of tagalign's inference code: the input of
    spec7_input, mmseg's slide grid, per window P = (1 - a) softmax(30 cos_main) + a softmax(30 cos_clip)
    bilinearly resized to the window, averaged where windows overlap, bilinearly resized to the original size,
    background where the best score is below the threshold, else argmax (prompt k is label k + 1 when there is
    a background class). Returns (labels (H0, W0), scores (C, H0, W0))."""
    x, (H0, W0) = spec7_input(path)
    H, W = x.shape[-2:]
    C = text.shape[0]
    total, hits = torch.zeros(C, H, W), torch.zeros(H, W)
    rows = max(H - window + stride - 1, 0) // stride + 1
    cols = max(W - window + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + window, H), min(c * stride + window, W)
            y1, x1 = max(y2 - window, 0), max(x2 - window, 0)
            with torch.no_grad():
                f_main, f_clip = model.dense_features(x[:, :, y1:y2, x1:x2])  # (1, h, w, D) each
            cos_main = torch.einsum("bhwd,cd->bchw", f_main / f_main.norm(dim=-1, keepdim=True), text)
            cos_clip = torch.einsum("bhwd,cd->bchw", f_clip / f_clip.norm(dim=-1, keepdim=True), text)
            p = (1 - a) * torch.softmax(30 * cos_main, 1) + a * torch.softmax(30 * cos_clip, 1)  # (1, C, h, w)
            p = torch.nn.functional.interpolate(p, size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)
            total[:, y1:y2, x1:x2] += p[0]
            hits[y1:y2, x1:x2] += 1
    probs = torch.nn.functional.interpolate((total / hits)[None], size=(H0, W0), mode="bilinear",
                                            align_corners=False)[0]
    best, idx = probs.max(0)
    if bg is None:
        return idx, probs
    return torch.where(best < bg, torch.zeros_like(idx), idx + 1), probs


@pytest.fixture(scope="module")
def tiny_tagalign(tiny_state_dict):
    """The small random CLIP cut to its first 2 vision blocks, 1 of them surgery (the windows are 448 pixels,
    784 tokens), under a TagAlign whose projector gates are open (f_main != f_clip)."""
    torch.manual_seed(0)
    two_blocks = {k: v for k, v in tiny_state_dict.items()
                  if not any(k.startswith(f"visual.transformer.resblocks.{i}.") for i in range(2, TINY.vision_layers))}
    config = tagalign.TagAlignConfig(surgery_layers=1)
    model = tagalign.TagAlign(clip_model.build_model(two_blocks), config).eval()
    for module in model.projector.modules():
        if isinstance(module, tagalign.GatedConv):
            module.gate.data.fill_(0.5)
    return model


@pytest.mark.parametrize("name", ["voc", "context", "coco_object", "context59", "cityscapes"]  # every setting
                         + [pytest.param(n, marks=pytest.mark.slow) for n in ("imagenet_s50", "imagenet_s300", "voc20",
                                                                              "coco_stuff", "ade")])  # repeats
def test_evaluation_matches_a_transcription_of_spec_section_7(tmp_path, monkeypatch, tiny_tagalign, name):
    """One 215 x 190 image (short side 190 -> 448: 507 x 448, three overlapping windows at stride 56, two at
    112) through evaluate_dataset with the dataset's defaults; segment()'s labels and scores must equal the
    transcription's. The 'text embeddings' are the image's own patch features at random places, so that scores
    are peaked in some places and flat in others and the threshold decides some pixels either way (a random
    text encoder gives near-identical prompts: every pixel would be background)."""
    spec = evaluate.DATASETS[name]
    bg, stride = SPEC_TABLE[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    blocks = torch.randint(0, 256, (5, 7, 3), generator=g, dtype=torch.uint8)  # coarse blocks, then noise
    rgb = blocks.repeat_interleave(38, 0).repeat_interleave(38, 1)[:190, :215]
    rgb = (rgb.int() + torch.randint(-20, 21, rgb.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    stem = {"cityscapes": "frankfurt/frankfurt_000000_000019", "imagenet_s50": "n01443537/ILSVRC2012_val_00000001",
            "imagenet_s300": "n01443537/ILSVRC2012_val_00000001"}.get(name, "2008_000001")
    base = tmp_path / spec["root"]
    img_path = base / spec["img"] / (stem + spec["img_suffix"])
    os.makedirs(img_path.parent)
    from PIL import Image
    Image.fromarray(rgb.numpy()).save(img_path)  # JPEG or PNG by the suffix; both paths read this same file
    raw = FIXTURES[name][0][0]  # any valid raw label: the labels are not what this test checks
    save_label(str(base / spec["ann"] / (stem + spec["seg_suffix"])), torch.full((190, 215), raw), FIXTURES[name][2])
    if spec.get("split"):
        os.makedirs((base / spec["split"]).parent)
        (base / spec["split"]).write_text(stem + "\n")
    classes = evaluate.read_classes(spec["classes"])
    prompts = classes[1:] if bg is not None else classes  # background is never a prompt
    with torch.no_grad():
        f_main, f_clip = tiny_tagalign.dense_features(spec7_input(img_path)[0][:, :, :, :448])  # (1, 28, 28, D)
    places = torch.randperm(28 * 28, generator=g)[:len(prompts)]
    text = torch.nn.functional.normalize(torch.nn.functional.normalize(f_main.flatten(0, 2)[places], dim=-1)
                                         + torch.nn.functional.normalize(f_clip.flatten(0, 2)[places], dim=-1), dim=-1)

    def embed(names):
        assert names == prompts
        return text

    calls, segment = [], tagalign.segment
    monkeypatch.setattr(tagalign, "segment", lambda *a, **k: calls.append(segment(*a, **k)) or calls[-1])
    features = tagalign.feature_fn(tiny_tagalign)
    result = evaluate.evaluate_dataset(name, features, embed, args_for(tmp_path, window_batch=2))
    assert (result["stride"], result["background_threshold"]) == (stride, bg) and len(calls) == 1
    labels, scores = calls[0]
    ref_labels, ref_scores = spec7_transcription(tiny_tagalign, img_path, text, bg, stride)
    assert len(tagalign.window_boxes(448, 507, 448, stride)) == {56: 3, 112: 2}[stride]
    assert labels.shape == (190, 215)
    assert torch.allclose(scores[1:] if bg is not None else scores, ref_scores, atol=1e-5)
    assert (labels == ref_labels).float().mean() > 0.9999  # ties within float noise only
    used = labels.unique().tolist()
    assert len(used) > 1 and (bg is None or 0 in used), used  # the threshold does decide some pixels


def test_bad_input_is_reported(tmp_path, capsys):
    to_prompt = build_fixture(tmp_path, "voc")
    base = tmp_path / "VOCdevkit/VOC2012"
    with open(base / "ImageSets/Segmentation/val.txt", "a") as f:
        f.write("2007_999999\n")  # listed in the split, no files
    from PIL import Image
    label = evaluate.pil_to_long(Image.open(base / "SegmentationClass/2007_000000.png"))
    label[100:110, 100:110] = 42  # outside 0..20
    save_label(str(base / "SegmentationClass/2007_000000.png"), label, "P")
    (base / "JPEGImages/2007_000001.jpg").unlink()
    result = evaluate.evaluate_dataset("voc", oracle(to_prompt), embed_identity, args_for(tmp_path))
    assert result["images"] == 2 and result["labels_without_image"] == ["2007_000001", "2007_999999"]
    assert result["bad_label_values"] == {str(base / "SegmentationClass/2007_000000.png"): [42]}
    assert "label values [42] outside 0..20" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="Expected layout under .*ADEChallengeData2016"):
        evaluate.evaluate_dataset("ade", oracle(to_prompt), embed_identity, args_for(tmp_path))


# Two methods per run in the two-process test: a perfect and a swapped oracle (their mIoUs differ, so a method
# whose confusion matrix or totals went to the other's row shows); RefCOCO likewise with the shapes swapped.
REFER_ORACLES = {"right": {3: "Yellow square", 4: "MAGENTA box"}, "swapped": {3: "MAGENTA box", 4: "Yellow square"}}


def _eval_worker(rank, world, init_file, root, to_prompt, swapped, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    methods = {"swapped": calibrated("context", swapped), "perfect": calibrated("context", to_prompt)}
    r = evaluate.evaluate_methods("context", methods, embed_identity, args_for(root), rank, world)
    refer = evaluate.evaluate_refer_methods("refcoco", {m: oracle(o) for m, o in REFER_ORACLES.items()},
                                            embed_expression, args_for(root / "refer" / "data"), rank, world)
    if rank == 0:
        torch.save((r, refer), out)
    ddp.end_distributed()  # a plain destroy_process_group here aborted 6 runs in 30 at exit (SIGABRT)


def test_one_process_and_two_gloo_processes_agree(tmp_path):
    """Two methods scored together by two gloo processes (images split over the ranks, the methods' confusion
    matrices and RefCOCO totals reduced in one collective) give each method exactly what it gets alone in one
    process."""
    to_prompt = build_fixture(tmp_path, "context", n_images=3)
    # a bad label value in image 1, which rank 1 evaluates: rank 0's report must still list it
    from PIL import Image
    bad_path = tmp_path / "VOCdevkit/VOC2010/SegmentationClassContext/000000000001.png"
    label = evaluate.pil_to_long(Image.open(bad_path))
    label[200:210, 10:20] = 77  # outside 0..59
    save_label(str(bad_path), label, "L")
    root = build_refer_fixture(tmp_path)
    swapped = {**to_prompt, 1: to_prompt[2]}
    single = {m: evaluate.evaluate_dataset("context", calibrated("context", p), embed_identity, args_for(tmp_path))
              for m, p in (("swapped", swapped), ("perfect", to_prompt))}
    refer = {m: evaluate.evaluate_refer("refcoco", oracle(o), embed_expression, args_for(root))
             for m, o in REFER_ORACLES.items()}
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), tmp_path, to_prompt, swapped, str(tmp_path / "r.pt")),
             nprocs=2)
    double, double_refer = torch.load(tmp_path / "r.pt", weights_only=False)
    assert 0 < single["swapped"]["miou"] < single["perfect"]["miou"] == pytest.approx(100)
    for m in single:
        assert double[m]["per_class_iou"] == single[m]["per_class_iou"] and double[m]["miou"] == single[m]["miou"]
        assert double[m]["bad_label_values"] == single[m]["bad_label_values"] == {str(bad_path): [77]}
    assert refer["right"]["splits"]["val"]["expressions"] == 2
    assert refer["right"]["splits"]["val"]["miou"] > 97 and refer["swapped"]["splits"]["val"]["miou"] == 0
    for m in refer:
        assert double_refer[m]["splits"] == refer[m]["splits"]


def test_every_collective_tensor_goes_through_comm_device(tmp_path, monkeypatch):
    """NCCL reduces only tensors on the rank's GPU, so every collective's tensor must be on the device
    tagalign.comm_device() names. Distribution is faked in one process and comm_device() names 'meta', a device
    none of our tensors lives on: each all_reduce must receive a meta tensor. A meta tensor has no data to go on
    with, so the fake all_reduce stops the run once it has seen its tensor (one all_reduce per dataset, and per
    RefCOCO split, for all methods together, is all there is)."""
    to_prompt = build_fixture(tmp_path, "voc", n_images=2)
    root = build_refer_fixture(tmp_path)
    seen = []

    class Seen(Exception):
        pass

    def fake_all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Seen

    def fake_all_gather_object(out, obj, *args, **kwargs):
        seen.append("object")  # pickled by torch through the backend's device; no tensor of ours
        out[:] = [obj] * len(out)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
    monkeypatch.setattr(dist, "get_backend", lambda *args, **kwargs: "nccl")
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    monkeypatch.setattr(tagalign, "comm_device", lambda: torch.device("meta"))
    two = {"a": calibrated("voc", to_prompt), "b": oracle(to_prompt)}  # both methods' matrices: one collective
    with pytest.raises(Seen):
        evaluate.evaluate_methods("voc", two, embed_identity, args_for(tmp_path))
    assert seen == ["object", torch.device("meta")]
    seen.clear()
    with pytest.raises(Seen):
        evaluate.evaluate_refer_methods("refcoco", {m: oracle(o) for m, o in REFER_ORACLES.items()},
                                        embed_expression, args_for(root))
    assert seen == [torch.device("meta")]


def test_make_coco_object_converter(tmp_path):
    raw = torch.tensor([[0, 1, 90, 89], [91, 181, 255, 12]])  # person, bicycle, raw 90 unused, toothbrush...
    folder = tmp_path / "annotations" / "val2017"
    save_label(str(folder / "000000000001.png"), raw, "L")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_coco_object.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    out = evaluate.pil_to_long(Image.open(folder / "000000000001_instanceTrainIds.png"))
    # raw 0 person -> 1, raw 1 bicycle -> 2, raw 90 unused -> 0, raw 89 toothbrush -> 80, stuff and 255 -> 0,
    # raw 12 (stop sign, after the unused 11) -> 12
    assert out.tolist() == [[1, 2, 0, 80], [0, 0, 0, 12]]
    classes = evaluate.read_classes("coco_object81.txt")
    assert classes[80] == "toothbrush" and classes[12] == "stop sign"


# ---------------------------------------------------------------------------------------------- RefCOCO

def test_rle_and_polygons_match_pycocotools():
    mask_api = pytest.importorskip("pycocotools.mask")
    rng = random.Random(1)
    for _ in range(100):
        h, w = rng.randint(5, 60), rng.randint(5, 60)
        poly = [v for _ in range(rng.randint(3, 8)) for v in (rng.uniform(-2, w + 2), rng.uniform(-2, h + 2))]
        rle = mask_api.frPyObjects([poly], h, w)[0]
        ref = torch.from_numpy(mask_api.decode(rle)).bool()
        assert torch.equal(evaluate.annotation_mask([poly], h, w), ref)
        assert torch.equal(evaluate.annotation_mask({"counts": rle["counts"], "size": [h, w]}, h, w), ref)
    import numpy as np
    m = (torch.rand(9, 13) > 0.5).numpy().astype(np.uint8)
    enc = mask_api.encode(np.asfortranarray(m))
    assert torch.equal(evaluate.rle_decode(enc["counts"], 9, 13), torch.from_numpy(m))


def build_refer_fixture(root):
    """refer/data under root with one COCO image: a yellow square (ref 1, two 'val' expressions) and a magenta
    rectangle (ref 2, one 'testA' expression). Returns the --data-root."""
    root = root / "refer" / "data"
    cmap = block_layout(5, [0, 1, 2])
    cmap[64:192, 64:192] = 3  # a yellow square: ref 1
    cmap[256:384, 320:448] = 4  # a magenta rectangle: ref 2
    save_image(str(root / "images/mscoco/images/train2014/COCO_train2014_000000000042.jpg"), cmap, "jpeg")
    square = [64, 64, 192, 64, 192, 192, 64, 192]  # corners: see block_layout (IoU a little below 1)
    rect = [320, 256, 448, 256, 448, 384, 320, 384]
    instances = {"images": [{"id": 42, "file_name": "COCO_train2014_000000000042.jpg", "height": 448, "width": 448}],
                 "annotations": [{"id": 7, "image_id": 42, "category_id": 1, "segmentation": [square]},
                                 {"id": 8, "image_id": 42, "category_id": 2, "segmentation": [rect]}],
                 "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    sent = lambda s, i: {"raw": s, "sent": s.lower(), "tokens": s.lower().split(), "sent_id": i}
    refs = [{"ref_id": 1, "ann_id": 7, "image_id": 42, "category_id": 1, "split": "val", "sent_ids": [1, 2],
             "file_name": "COCO_train2014_000000000042_7.jpg", "sentences": [sent("Yellow square", 1), sent("the yellow one", 2)]},
            {"ref_id": 2, "ann_id": 8, "image_id": 42, "category_id": 2, "split": "testA", "sent_ids": [3],
             "file_name": "COCO_train2014_000000000042_8.jpg", "sentences": [sent("MAGENTA box", 3)]}]
    os.makedirs(root / "refcoco")
    with open(root / "refcoco/instances.json", "w") as f:
        json.dump(instances, f)
    with open(root / "refcoco/refs(unc).p", "wb") as f:
        pickle.dump(refs, f)
    return root


def embed_expression(sentences):
    return embed_identity(["Yellow square" if "yellow" in s.lower() else "MAGENTA box" for s in sentences])


def test_refcoco_fixture_end_to_end(tmp_path):
    root = build_refer_fixture(tmp_path)
    embed = embed_expression
    result = evaluate.evaluate_refer("refcoco", oracle({3: "Yellow square", 4: "MAGENTA box"}), embed, args_for(root))
    splits = result["splits"]
    # both val expressions point at the square: equal IoUs, so mIoU == oIoU; corners cost a few pixels
    assert splits["val"]["expressions"] == 2 and 97 < splits["val"]["miou"] < 100
    assert splits["val"]["oiou"] == pytest.approx(splits["val"]["miou"], abs=1e-9)
    assert splits["testA"]["expressions"] == 1 and splits["testA"]["miou"] > 97 and splits["testB"]["expressions"] == 0
    swapped = evaluate.evaluate_refer("refcoco", oracle({3: "MAGENTA box", 4: "Yellow square"}), embed,
                                      args_for(root))["splits"]
    assert swapped["val"]["miou"] == 0 and swapped["val"]["oiou"] == 0  # each query finds the other shape
    table = evaluate.markdown_table(*evaluate.results_table([{"method": "oracle", **result}], pamr=False))
    # the paper's numbers stand in their own row, but every RefCOCO column says the referring protocol is ours (the
    # footnote that explains the star is checked on main()'s report)
    assert table.splitlines()[0] == ("| method | refcoco val (our protocol*) | refcoco testA (our protocol*) | "
                                     "refcoco testB (our protocol*) |")
    assert "| paper (TagAlign) | 18.75 | 20.31 | 20.64 |" in table
    voc = evaluate.results_table([{"method": "oracle", "dataset": "voc", "miou": 50.0}], pamr=False)
    assert "our protocol" not in evaluate.markdown_table(*voc)


# ---------------------------------------------------------------------------------------------- command line

def test_refcoco_text_query_is_the_expression_itself(tmp_path, monkeypatch, capsys, tiny_state_dict):
    """The text encoder receives each RefCOCO expression verbatim (no 'a photo of a {}.'), through main(), which
    sets up distribution with ddp.init_distributed."""
    root = build_refer_fixture(tmp_path)
    torch.save(tiny_state_dict, tmp_path / "clip.pt")
    prompts, inits = [], []
    tokenize, init_distributed = clip_model.tokenize, ddp.init_distributed
    recording = lambda texts, *a, **k: prompts.extend(texts) or tokenize(texts, *a, **k)
    monkeypatch.setattr(clip_model, "tokenize", recording)
    monkeypatch.setattr(ddp, "init_distributed", lambda minutes: inits.append(1) or init_distributed(minutes))
    results = evaluate.main(["--dataset", "refcoco", "--data-root", str(root), "--clip", str(tmp_path / "clip.pt"),
                             "--short-side", "64", "--window", "64", "--out", str(tmp_path / "out"), "--no-progress"])
    assert prompts == ["Yellow square", "the yellow one", "MAGENTA box"]  # val's two, then testA's one
    assert inits == [1] and results[0]["protocol"] == "ours"
    out = capsys.readouterr().out
    assert "| refcoco val (our protocol*) |" in out and evaluate.REFER_NOTE in out
    # its settings row: RefCOCO's stride 224 of a 448 window, scaled to this 64 window: 32 (2 patches of 16)
    assert "| refcoco | 3 expressions | none | 32 | 64 | 64 | cosine |" in out


def test_bad_input_fails_before_clip_is_loaded(tmp_path, monkeypatch):
    """Files, layouts and flags are checked first: a one-line 'error:' naming the problem, no CLIP load."""
    monkeypatch.setattr(clip_model, "load", lambda *a, **k: pytest.fail("CLIP loaded before the inputs were checked"))
    build_fixture(tmp_path, "voc", n_images=1)
    root = str(tmp_path)
    cases = [(["--dataset", "nope", "--data-root", root], "unknown or no dataset ['nope']"),
             (["--dataset", "voc", "--data-root", "/nonexistent"], "/nonexistent"),
             (["--dataset", "ade", "--data-root", root], "ADEChallengeData2016"),
             (["--datasets", "voc,context", "--data-root", root], "VOC2010"),  # the second dataset's layout
             (["--dataset", "folder", "--data-root", root], "classes.txt"),
             (["--dataset", "refcoco", "--data-root", root], "refs(unc).p"),
             (["--dataset", "voc", "--data-root", root, "--checkpoint", str(tmp_path / "missing.pt")], "missing.pt"),
             (["--dataset", "voc", "--data-root", root, "--clip", str(tmp_path / "nope.pt")], "nope.pt"),
             (["--dataset", "voc", "--data-root", root, "--stride", "-56"], "--stride"),
             (["--dataset", "voc", "--data-root", root, "--window", "0"], "--window"),
             (["--dataset", "voc", "--data-root", root, "--limit", "-1"], "--limit"),
             (["--dataset", "voc", "--data-root", root, "--clip-weight", "1.5"], "--clip-weight"),
             # a named CLIP's patch size is known before its download: L/14's 14 does not divide 100
             (["--dataset", "voc", "--data-root", root, "--clip", "ViT-L/14", "--window", "100"],
              "--window 100 is not a multiple of the CLIP's patch size 14; use 98 or 112"),
             # beside other methods, tagalign without a checkpoint would be CLIP Surgery passing for TagAlign
             (["--dataset", "voc", "--data-root", root, "--methods", "tagalign,surgery"], "needs --checkpoint"),
             (["--dataset", "voc", "--data-root", root, "--methods", "all"], "--methods baselines"),
             (["--dataset", "voc", "--data-root", root, "--methods", "sclip,nope"], "unknown or no method ['nope']"),
             (["--dataset", "voc", "--data-root", root, "--method", "sclip", "--methods", "naclip"], "not both")]
    for argv, what in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv + ["--no-progress"])
        message = str(e.value.code)
        assert message.startswith("error: ") and what in message and "\n" not in message, (argv, message)


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--dataset", "voc", "--data-root",
                          str(tmp_path / "nonexistent")], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: --data-root ") and "nonexistent" in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1, run.stderr


def test_saved_prediction_panel_shows_photo_truth_prediction_and_legend(tmp_path, monkeypatch):
    """--save-predictions: one panel per image with the photo, the truth and the prediction in the legend's
    colours (ignored pixels white), on the perfect predictor, so truth and prediction tiles are identical."""
    import numpy as np
    from PIL import Image
    import figures
    drawn = {}  # the matplotlib figures by the PNG they were saved to: tiles and legend are read back
    def recording(real=figures.figure, **kw):
        fig = real(**kw)
        save = fig.savefig
        fig.savefig = lambda path, **k: drawn.update({os.path.basename(path): fig}) or save(path, **k)
        return fig
    monkeypatch.setattr(figures, "figure", recording)
    to_prompt = build_fixture(tmp_path, "voc")
    args = args_for(tmp_path, save_predictions=2)
    evaluate.evaluate_dataset("voc", calibrated("voc", to_prompt), embed_identity, args, save_dir=str(tmp_path / "pred"))
    panels = sorted(os.listdir(tmp_path / "pred" / "voc"))
    assert len(panels) == 2 and sorted(drawn) == panels
    stem = panels[0][:-4]
    label = evaluate.pil_to_long(Image.open(tmp_path / f"VOCdevkit/VOC2012/SegmentationClass/{stem}.png"))
    classes = open(os.path.join(ROOT, "data", "voc21.txt")).read().splitlines()
    colours = figures.colours_for(classes, background=True)
    # a class named by a colour word is drawn in that colour, in the panels as in the demo's figure
    named = figures.colours_for(["background", "yellow", "blue"], background=True).tolist()
    assert named[1:] == [list(figures.COLOUR_WORDS["yellow"]), list(figures.COLOUR_WORDS["blue"])]
    present = {tuple(colours[c].tolist()) for c in label[label != 255].unique().tolist()}
    white = {figures.WHITE} if (label == 255).any() else set()
    fig = drawn[panels[0]]
    assert fig.get_suptitle() == f"voc: {stem}"
    titles = ["photo", "ground truth", "prediction (pixel accuracy 100%)"]
    assert [ax.get_title() for ax in fig.axes] == titles
    legend = fig.legends[0]
    swatches = {tuple(round(255 * v) for v in h.get_facecolor()[:3]) for h in legend.legend_handles}
    assert swatches == present | white and len(legend.get_texts()) == len(present | white)
    truth, prediction = (torch.from_numpy(np.asarray(ax.images[0].get_array())).view(-1, 3)
                         for ax in fig.axes[1:])
    scored = (truth != 255).any(1)  # white: ignored in the truth (the prediction is drawn there too)
    assert scored.float().mean() > 0.5
    assert torch.equal(truth[scored], prediction[scored])  # the perfect predictor
    # the PNG: the truth tile, cut out where matplotlib drew it, holds exactly the legend's colours
    panel = Image.open(tmp_path / "pred" / "voc" / panels[0]).convert("RGB")
    x0, y0, x1, y1 = fig.axes[1].images[0].get_window_extent().extents
    H = panel.height  # matplotlib counts pixels from the bottom; 2 pixels in from the tile's edges
    tile = panel.crop((round(x0) + 2, H - round(y1) + 2, round(x1) - 2, H - round(y0) - 2))
    assert tile.width > 100 and {c for _, c in tile.getcolors(1 << 20)} == present | white
    # two methods: one panel per image with one more tile, the second method's prediction
    drawn.clear()
    two = {"perfect": calibrated("voc", to_prompt), "swapped": calibrated("voc", {**to_prompt, 1: to_prompt[2]})}
    evaluate.evaluate_methods("voc", two, embed_identity, args, save_dir=str(tmp_path / "two"))
    assert sorted(os.listdir(tmp_path / "two" / "voc")) == panels
    both = drawn[panels[0]]
    titles = ["photo", "ground truth", "perfect", "swapped"]
    assert [ax.get_title().split(" (")[0] for ax in both.axes] == titles
    assert np.array_equal(both.axes[2].images[0].get_array(), fig.axes[2].images[0].get_array())
    assert Image.open(tmp_path / "two" / "voc" / panels[0]).width > panel.width


# ---------------------------------------------------------------------------------------------- methods x datasets

def write_small_datasets(root):
    """Small images, so that main() runs in a second: voc (3 JPEGs of 80 x 64 in colour bands, palette labels,
    background threshold 0.45, stride 56) and a folder dataset without background (2 PNGs of 64 x 48, stride
    half the window)."""
    voc = root / "VOCdevkit" / "VOC2012"
    colour_raw = FIXTURES["voc"][0]
    stems = [f"2007_{i:06d}" for i in range(3)]
    for i, stem in enumerate(stems):
        cmap = torch.tensor(random.Random(i).choices(list(colour_raw), k=4)).repeat_interleave(16)
        cmap = cmap.view(64, 1).expand(64, 80).clone()
        label = torch.tensor([colour_raw.get(c, 0) for c in range(len(COLOURS))])[cmap]
        label[:4] = 255
        save_image(str(voc / "JPEGImages" / f"{stem}.jpg"), cmap, "jpeg")
        save_label(str(voc / "SegmentationClass" / f"{stem}.png"), label, "P")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(stems) + "\n")
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    for i in range(2):
        cmap = torch.tensor([0, 1, 2, i % 3]).repeat_interleave(16).view(1, 64).expand(48, 64).clone()
        save_image(str(root / "images" / f"{i:05d}.png"), cmap)
        save_label(str(root / "labels" / f"{i:05d}.png"), cmap, "L")


def run_main(argv):
    """evaluate.main(argv) -> (its records, what it printed)."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()) as out:
        results = evaluate.main(argv + ["--no-progress"])
    return results, out.getvalue()


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_state_dict):
    """One main() run of three methods (tagalign from a checkpoint of the tiny CLIP with its projector gates
    open, and two baselines) on voc and a folder dataset, with every PIL Image.open recorded."""
    from PIL import Image
    root = tmp_path_factory.mktemp("compared")
    write_small_datasets(root)
    torch.save(tiny_state_dict, root / "clip.pt")
    torch.manual_seed(0)
    model = tagalign.TagAlign(clip_model.build_model(tiny_state_dict), tagalign.TagAlignConfig(surgery_layers=2))
    for module in model.projector.modules():
        if isinstance(module, tagalign.GatedConv):
            module.gate.data.fill_(0.5)
    tagalign.save_checkpoint(str(root / "ckpt.pt"), model, str(root / "clip.pt"))
    base = ["--checkpoint", str(root / "ckpt.pt"), "--datasets", "voc,folder", "--data-root", str(root),
            "--window", "64", "--short-side", "64"]
    opened, real_open = [], Image.open
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "open", lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
        results, printed = run_main(base + ["--methods", "tagalign,surgery,naclip", "--out", str(root / "out")])
    with open(root / "out" / "results.json") as f:
        saved = json.load(f)
    return argparse.Namespace(root=root, base=base, results=results, printed=printed, opened=opened, saved=saved,
                              methods=["tagalign", "surgery", "naclip"], datasets=["voc", "folder"])


def test_flags_that_a_checkpoint_settles_and_datasets_named_twice(compared):
    """--surgery-layers against a checkpoint trained with others is an error (it would be ignored); a
    dataset named twice is evaluated once."""
    with pytest.raises(SystemExit) as e:
        evaluate.main(compared.base + ["--surgery-layers", "3", "--no-progress"])
    assert str(e.value.code) == (f"error: --surgery-layers 3, but {compared.root / 'ckpt.pt'} was trained with 2: "
                                 "drop the flag (the checkpoint's is used)")
    assert evaluate.requested_datasets(argparse.Namespace(datasets="voc, voc,folder", dataset=None)) == ["voc",
                                                                                                          "folder"]
    # the checkpoint is read early for these checks: a damaged one is a one-line error too
    (compared.root / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", str(compared.root / "bad.pt"), "--datasets", "voc", "--data-root",
                       str(compared.root), "--window", "64", "--no-progress"])
    assert str(e.value.code).startswith(f"error: could not read TagAlign checkpoint {compared.root / 'bad.pt'}")


def test_methods_scored_together_equal_separate_runs(compared):
    """Each method's numbers from the three-method run equal those of a run of that method alone (--method)."""
    together = {(r["method"], r["dataset"]): r for r in compared.results}
    assert sorted(together) == sorted((m, d) for m in compared.methods for d in compared.datasets)
    for method in compared.methods:
        alone, _ = run_main(compared.base + ["--method", method, "--out", str(compared.root / f"alone_{method}")])
        assert [r["method"] for r in alone] == [method, method]
        for r in alone:
            t = together[method, r["dataset"]]
            assert (t["miou"], t["aacc"], t["per_class_iou"]) == (r["miou"], r["aacc"], r["per_class_iou"])
    folder = [together[m, "folder"]["miou"] for m in compared.methods]
    assert len(set(folder)) == 3 and all(0 < v < 100 for v in folder), folder  # the methods do differ


def test_each_image_is_decoded_once_per_dataset(compared):
    root = compared.root
    images = sorted(str(p) for p in (root / "VOCdevkit/VOC2012/JPEGImages").iterdir()) \
        + sorted(str(p) for p in (root / "images").iterdir())
    labels = sorted(str(p) for p in (root / "VOCdevkit/VOC2012/SegmentationClass").iterdir()) \
        + sorted(str(p) for p in (root / "labels").iterdir())
    assert len(images) == 5 and [compared.opened.count(p) for p in images + labels] == [1] * 10
    assert sorted(compared.opened) == sorted(images + labels)  # nothing else read either


def test_table_files_hold_the_numbers_of_results_json(compared):
    """results.csv, results.md, the printed table and results.json's table agree with the per-dataset records:
    a row per method, a column per dataset, the mean is the mean of the row, the paper's row has VOC's number."""
    import csv
    out = compared.root / "out"
    miou = {(r["method"], r["dataset"]): r["miou"] for r in compared.saved["results"]}
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.reader(f))
    md = (out / "results.md").read_text().splitlines()
    md_rows = [[c.strip() for c in line.strip("|").split("|")] for line in md if line.startswith("| ")][:5]
    header = ["method", "voc", "folder", "mean"]
    assert csv_rows[0] == md_rows[0] == compared.saved["table"]["header"] == header
    assert [r[0] for r in csv_rows[1:]] == [r[0] for r in md_rows[1:]] == compared.methods + ["paper (TagAlign)"]
    for method, c, m, j in zip(compared.methods, csv_rows[1:], md_rows[1:], compared.saved["table"]["rows"]):
        values = [miou[method, "voc"], miou[method, "folder"]]
        mean = sum(values) / 2
        assert j[1:] == pytest.approx(values + [mean], abs=1e-12)
        assert [float(v) for v in c[1:]] == pytest.approx(values + [mean], abs=5e-5)
        assert [float(v) for v in m[1:]] == pytest.approx(values + [mean], abs=5e-3)
    assert csv_rows[4] == ["paper (TagAlign)", "55.3000", "", ""]  # no paper number for folder, so no mean
    assert md_rows[4] == ["paper (TagAlign)", "55.30", "-", "-"]
    assert "\n".join(md) in compared.printed  # what was printed is what was written
    assert compared.saved["methods"] == {m: m for m in compared.methods}


def test_settings_are_printed_and_the_command_reproduces_the_table(compared):
    """The settings that change results stand under the table (printed, results.md, results.json), per dataset
    and run-wide; the command printed with them, run again, writes the same table."""
    import shlex
    root, s = compared.root, compared.saved["settings"]
    printed = compared.printed
    # SPEC section 7's VOC row; its stride, 56 of a 448 window, is an eighth of the window: one 16-px patch at 64
    assert "| voc | 3 of 1,449 | 0.45 | 16 | 64 | 64 | v3 |" in printed  # a fixture: 3 of VOC's images
    assert printed.startswith("**INCOMPLETE DATA: voc 3 of 1,449 images found; not comparable")
    assert "folder 2 of" not in printed  # a user's folder has no benchmark size
    assert "| folder | 2 | none | 32 | 64 | 64 | v3 |" in printed  # no background; stride half the window
    assert "- rule v3, clip weight a = 0.5; templates single (1; RefCOCO: the expression itself); PAMR off" in printed
    assert (f"- CLIP {root / 'clip.pt'} (ViT with patch 16, 64 px, 8 blocks of width 128 (2 heads), embedding 64, "
            f"QuickGELU (recorded in the TagAlign checkpoint)); checkpoint {root / 'ckpt.pt'}; surgery layers 2 (the last "
            "of 8 blocks; tagalign and the surgery baseline)") in printed
    assert "- images: all; processes 1; code " in printed and "LIMITED" not in printed
    assert s["datasets"]["voc"] == {"images": 3, "benchmark_images": 1449, "rule": "v3", "bg_threshold": 0.45, "stride": 16, "clip_weight": 0.5,
                                    "window": 64, "short_side": 64, "use_pamr": False}
    command = shlex.split(s["command"])
    assert compared.saved["command"] == s["command"] and f"    {s['command']}" in printed.splitlines()
    assert command[:2] == ["python3", "evaluate.py"]
    assert command[command.index("--methods") + 1] == "tagalign,surgery,naclip"
    rerun = command[2:command.index("--out")] + ["--out", str(root / "rerun")]
    run_main(rerun)
    assert (root / "rerun" / "results.csv").read_text() == (root / "out" / "results.csv").read_text()


def test_a_failed_run_ends_the_process_group_without_the_final_barrier(compared, monkeypatch):
    """A rank that fails (e.g. on a bad label file) must not wait in a barrier the others never reach."""
    ended = []
    monkeypatch.setattr(ddp, "end_distributed", lambda finished=True: ended.append(finished))
    monkeypatch.setattr(evaluate, "run", lambda *a: (_ for _ in ()).throw(ValueError("a bad label")))
    root = compared.root
    with pytest.raises(ValueError, match="a bad label"):
        evaluate.main(["--clip", str(root / "clip.pt"), "--dataset", "folder", "--data-root", str(root),
                       "--window", "64", "--short-side", "64", "--out", str(root / "failed")])
    assert ended == [False]


def test_the_collective_timeout_reaches_init_distributed(compared, monkeypatch):
    """evaluate.py --dist-timeout (default 60 minutes, NCCL's own is 10): rank 0 may download a CLIP while the
    other ranks of its node wait in a barrier."""
    seen = []

    def fake_init(timeout_minutes=None):
        seen.append(timeout_minutes)
        raise RuntimeError("stop here")
    monkeypatch.setattr(ddp, "init_distributed", fake_init)
    root = compared.root
    argv = ["--clip", str(root / "clip.pt"), "--dataset", "folder", "--data-root", str(root), "--window", "64"]
    for extra, minutes in (([], 60), (["--dist-timeout", "90"], 90)):
        with pytest.raises(SystemExit, match="stop here"):
            evaluate.main(argv + extra)
        assert seen[-1] == minutes


def test_tagalign_alone_without_checkpoint_is_labelled_untrained_and_a_limited_run_is_marked(compared):
    """Without --checkpoint, tagalign alone (demo.py's 'before training' run) is the identity projector, i.e.
    CLIP Surgery: its row says so; --limit marks the report; the command carries --surgery-layers and --limit."""
    root = compared.root
    results, printed = run_main(["--clip", str(root / "clip.pt"), "--surgery-layers", "1", "--dataset", "folder",
                                 "--data-root", str(root), "--window", "64", "--short-side", "64", "--limit", "1",
                                 "--out", str(root / "untrained")])
    assert [(r["method"], r["images"]) for r in results] == [("tagalign", 1)]
    md = (root / "untrained" / "results.md").read_text()
    label = "tagalign (untrained = CLIP Surgery, surgery_layers=1)"
    assert md.startswith("**LIMITED RUN: only the first 1 images of each dataset (--limit 1)")
    assert f"| {label} | " in md and "- images: the first 1 per dataset" in md and md in printed
    assert "--surgery-layers 1 --methods tagalign" in md and "--limit 1" in md
    assert json.loads((root / "untrained" / "results.json").read_text())["methods"] == {"tagalign": label}


# ---------------------------------------------------------------------------------------------- --check

def run_check(root, datasets, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--check", "--datasets", datasets, "--data-root", str(root), "--no-progress"])
    return e.value.code, capsys.readouterr().out


def test_check_passes_on_complete_data(tmp_path, capsys, monkeypatch):
    build_fixture(tmp_path, "voc")
    build_fixture(tmp_path, "cityscapes")
    monkeypatch.setitem(evaluate.EXPECTED_COUNTS, "voc", 3)
    monkeypatch.setitem(evaluate.EXPECTED_COUNTS, "cityscapes", 3)
    code, out = run_check(tmp_path, "voc,cityscapes", capsys)
    assert code == 0, out
    assert out.splitlines() == ["voc            OK     3 pairs (official 3); labels 0..20, ignore 255",
                                "cityscapes     OK     3 pairs (official 3); labels 0..18, ignore 255"]


def test_check_catches_wrong_count_bad_value_and_missing_label(tmp_path, capsys, monkeypatch):
    build_fixture(tmp_path, "voc")
    build_fixture(tmp_path, "cityscapes")
    build_fixture(tmp_path, "imagenet_s50", n_images=2)
    monkeypatch.setitem(evaluate.EXPECTED_COUNTS, "cityscapes", 3)
    monkeypatch.setitem(evaluate.EXPECTED_COUNTS, "imagenet_s50", 2)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    os.remove(voc / "SegmentationClass" / "2007_000001.png")  # a missing label
    city = tmp_path / "cityscapes" / "gtFine" / "val" / "frankfurt" / "frankfurt_000002_000019_gtFine_labelTrainIds.png"
    save_label(str(city), torch.full((448, 448), 19), "L")  # trainId 19 does not exist
    ins = tmp_path / "ImageNetS" / "ImageNetS50" / "validation-segmentation" / "n01443537" / "ILSVRC2012_val_00000001.png"
    save_label(str(ins), torch.full((448, 448), 51), "rgb")  # class 51 of 0..50
    code, out = run_check(tmp_path, "voc,cityscapes,imagenet_s50,ade", capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("voc            FAIL   2 pairs (official 1,449)")  # the real count, and one label gone
    assert lines[1].startswith("cityscapes     FAIL   3 pairs (official 3)")
    assert lines[2].startswith("imagenet_s50   FAIL   2 pairs (official 2)")
    assert lines[3] == "ade            FAIL   not found"
    assert "  voc: 2 image/label pairs, the official split has 1,449" in lines
    assert "  voc: image without label: 2007_000001" in lines
    assert f"  cityscapes: {city}: values [19] outside 0..18" in lines
    assert f"  imagenet_s50: {ins}: values [51] outside 0..50" in lines
    assert any(line.startswith("  ade: ") and "not found" in line for line in lines)


def test_check_catches_size_mismatch_label_without_image_and_unreadable_image(tmp_path, capsys, monkeypatch):
    build_fixture(tmp_path, "ade")
    monkeypatch.setitem(evaluate.EXPECTED_COUNTS, "ade", 1)
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    small = ade / "annotations" / "validation" / "000000000000.png"
    save_label(str(small), torch.ones(10, 12), "L")  # 12x10 where its image is 448x448
    os.remove(ade / "images" / "validation" / "000000000001.jpg")  # a label without its image
    broken = ade / "images" / "validation" / "000000000002.jpg"
    broken.write_bytes(b"not a jpeg")  # the image is unreadable, its label is fine
    code, out = run_check(tmp_path, "ade", capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith("ade            FAIL   2 pairs (official 1)")
    assert "  ade: 2 image/label pairs, the official split has 1" in lines
    assert "  ade: label without image: 000000000001" in lines
    assert f"  ade: {small}: 12x10, its image is 448x448" in lines
    bad = [line for line in lines if "000000000002" in line]
    assert len(bad) == 1 and bad[0].startswith(f"  ade: {broken}: unreadable image (")  # the image, not the label


def test_check_applies_reduce_zero_label(tmp_path, capsys, monkeypatch):
    build_fixture(tmp_path, "ade")  # raw 0 (background) and 1..150
    monkeypatch.setitem(evaluate.EXPECTED_COUNTS, "ade", 3)
    code, out = run_check(tmp_path, "ade", capsys)
    assert code == 0, out  # raw 0 is ignored (255) and 150 is class 149: nothing outside 0..149
    assert out.splitlines() == ["ade            OK     3 pairs (official 3); labels 0..149, ignore 255"]
    label = tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "validation" / "000000000001.png"
    save_label(str(label), torch.full((448, 448), 151), "L")  # raw 151 -> 150, one past ADE's 150 classes
    code, out = run_check(tmp_path, "ade", capsys)
    assert code == 1
    assert f"  ade: {label}: values [150] outside 0..149 after reduce_zero_label (raw value - 1)" in out.splitlines()


def test_check_reads_files_shared_by_two_datasets_once(tmp_path, capsys, monkeypatch):
    build_fixture(tmp_path, "voc")  # voc20 reads the same files (reduce_zero_label gives the same valid set)
    for name in ("voc", "voc20"):
        monkeypatch.setitem(evaluate.EXPECTED_COUNTS, name, 3)
    opened = []
    real = evaluate.load_label
    monkeypatch.setattr(evaluate, "load_label", lambda path, *a: (opened.append(path), real(path, *a))[1])
    code, out = run_check(tmp_path, "voc,voc20", capsys)
    assert code == 0, out
    assert out.splitlines() == ["voc            OK     3 pairs (official 3); labels 0..20, ignore 255",
                                "voc20          OK     same files as voc (checked above); labels 0..19, ignore 255"]
    assert len(opened) == 3
    code, out = run_check(tmp_path, "voc20", capsys)  # alone, it is checked itself
    assert code == 0 and out.startswith("voc20          OK     3 pairs (official 3); labels 0..19, ignore 255"), out


def test_window_and_strides_follow_a_patch_14_backbone(compared, tmp_path):
    """A ViT-L/14-like CLIP (patch 14, 56 px input) and no --window: windows and short side are 112 (twice the
    input size), VOC's stride is SPEC's 56-of-448 scaled to 112 in whole patches (14), the folder's half the
    window (56); the printed command spells out the activation used and the sizes. A window that is not a
    multiple of 14 is refused with the nearest ones."""
    from conftest import random_state_dict
    cfg = clip_model.CLIPConfig(embed_dim=64, image_resolution=56, vision_layers=2, vision_width=128,
                                vision_patch_size=14, transformer_width=128, transformer_heads=2, transformer_layers=1)
    torch.save(random_state_dict(cfg, seed=7), tmp_path / "l14-like.pt")
    base = ["--clip", str(tmp_path / "l14-like.pt"), "--methods", "surgery,maskclip", "--datasets", "voc,folder",
            "--data-root", str(compared.root)]
    _, printed = run_main(base + ["--out", str(tmp_path / "out")])
    assert "| voc | 3 of 1,449 | 0.45 | 14 | 112 | 112 | v3 |" in printed and "| folder | 2 | none | 56 | 112 | 112 | v3 |" in printed
    command = json.load(open(tmp_path / "out" / "results.json"))["command"]
    assert "--clip-act gelu" in command and "--window 112 --short-side 112" in command
    with pytest.raises(SystemExit, match="--window 100 is not a multiple of the CLIP's patch size 14; use 98 or 112"):
        run_main(base + ["--window", "100", "--out", str(tmp_path / "bad")])


def test_the_rerun_command_carries_every_changed_setting(compared, tmp_path):
    """Every result-changing flag away from its default (templates, background threshold, stride, clip weight,
    rule, sizes, PAMR): the printed command reruns to the same table, and each flag is in it with its value."""
    import shlex
    flags = ["--templates", "tcl9", "--bg-threshold", "0.3", "--stride", "32", "--clip-weight", "0.3", "--rule", "v1",
             "--window", "64", "--short-side", "80", "--pamr"]
    _, printed = run_main(["--clip", str(compared.root / "clip.pt"), "--methods", "surgery", "--datasets", "voc",
                           "--data-root", str(compared.root), "--out", str(tmp_path / "first")] + flags)
    command = shlex.split(json.load(open(tmp_path / "first" / "results.json"))["command"])
    for flag, value in zip(flags[:-1:2], flags[1::2]):
        assert command[command.index(flag) + 1] == value, flag
    assert "--pamr" in command and command[command.index("--clip-act") + 1] == "gelu"
    run_main(command[2:command.index("--out")] + ["--out", str(tmp_path / "again")])
    assert (tmp_path / "again" / "results.csv").read_text() == (tmp_path / "first" / "results.csv").read_text()
