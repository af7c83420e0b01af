"""
A synthetic image-caption dataset for the end-to-end demo: pictures of coloured shapes on cluttered
backgrounds, one natural-language caption each, written as webdataset tar shards exactly as
img2dataset writes them; and a held-out segmentation set (images, per-pixel label PNGs, classes.txt)
in evaluate.py's `folder` layout.

Run:
    python data/make_synthetic.py --out out/synthetic --train 3000 --test 100

Writes
    out/synthetic/shards/{00000..}.tar       {key}.jpg, {key}.txt (caption),
                                             {key}.json (img2dataset metadata)
    out/synthetic/shards/{00000..}_stats.json
    out/synthetic/seg/{shapes,colours}/images/{i:05d}.png, labels/{i:05d}.png, classes.txt
        (0 = background, k = the k-th shape / colour of classes.txt): the same pictures labelled by
        object and by attribute
"""
import argparse
import io
import json
import math
import os
import random
import tarfile

COLOURS = {"red": (215, 35, 35), "green": (40, 170, 60), "blue": (40, 70, 215),
           "yellow": (235, 205, 30)}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": (18, 26), "large": (32, 44)}
SINGLE = ["a {a} {c} {s}.", "a photo of a {c} {s} on a cluttered background.",
          "there is a {a} {c} {s} in the picture.", "one {c} {s}."]
# few templates: about 200 distinct captions, parsed once each
DOUBLE = ["a {c1} {s1} and a {c2} {s2}."]


def draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r * math.sqrt(3) / 2 * 1.15, cy + r * 0.8),
                      (cx + r * math.sqrt(3) / 2 * 1.15, cy + r * 0.8)], fill=fill)


def make_picture(rng, size, n_shapes):
    """-> (RGB image, shape labels 'L' (0 background, k = SHAPES[k-1]), colour labels 'L'
    (k = list(COLOURS)[k-1]), list of (colour, shape, size word))."""
    from PIL import Image, ImageDraw
    tone = rng.randint(150, 235)
    img = Image.new("RGB", (size, size),
                    (tone, tone - rng.randint(0, 20), tone - rng.randint(0, 30)))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(15, 40)):  # clutter: grey lines and dots that are no class
        g = rng.randint(60, 200)
        x, y = rng.randrange(size), rng.randrange(size)
        if rng.random() < 0.5:
            draw.line([x, y, x + rng.randint(-25, 25), y + rng.randint(-25, 25)], fill=(g, g, g),
                      width=rng.randint(1, 3))
        else:
            draw.ellipse([x, y, x + rng.randint(2, 6), y + rng.randint(2, 6)], fill=(g, g, g))
    label, colour_label = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    ldraw, cdraw = ImageDraw.Draw(label), ImageDraw.Draw(colour_label)
    placed, objects = [], []
    for _ in range(n_shapes):
        for _attempt in range(50):  # place without overlap
            size_word = rng.choice(list(SIZES))
            r = rng.randint(*SIZES[size_word]) * size // 128
            cx, cy = rng.randint(r + 2, size - r - 3), rng.randint(r + 2, size - r - 3)
            if all(math.hypot(cx - x, cy - y) > r + q + 4 for x, y, q in placed):
                break
        else:
            continue
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        placed.append((cx, cy, r))
        draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
        draw_shape(ldraw, shape, cx, cy, r, SHAPES.index(shape) + 1)
        draw_shape(cdraw, shape, cx, cy, r, list(COLOURS).index(colour) + 1)
        objects.append((colour, shape, size_word))
    return img, label, colour_label, objects


def caption_for(rng, objects):
    if len(objects) == 1:
        c, s, a = objects[0]
        return rng.choice(SINGLE).format(a=a, c=c, s=s).capitalize()
    (c1, s1, _), (c2, s2, _) = objects[:2]
    return rng.choice(DOUBLE).format(c1=c1, s1=s1, c2=c2, s2=s2).capitalize()


def write_shards(out, n, size, per_shard, seed):
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    for shard in range((n + per_shard - 1) // per_shard):
        count = min(per_shard, n - shard * per_shard)
        with tarfile.open(os.path.join(out, f"{shard:05d}.tar"), "w") as tar:
            for i in range(count):
                key = f"{shard:05d}{i:04d}"  # img2dataset's key: shard id + index in the shard
                img, _, _, objects = make_picture(rng, size, rng.choice([1, 2, 2]))
                caption = caption_for(rng, objects)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=92)
                meta = {"key": key, "caption": caption, "status": "success",
                        "width": size, "height": size, "original_width": size,
                        "original_height": size, "url": f"synthetic://{key}"}
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        with open(os.path.join(out, f"{shard:05d}_stats.json"), "w") as f:
            json.dump({"count": count, "successes": count, "failed_to_download": 0}, f)


def write_segmentation_set(out, n, size, seed):
    """Two views of the same pictures in evaluate.py's folder layout: out/shapes (classes: the
    object tags) and out/colours (classes: the colour attributes)."""
    rng = random.Random(seed)
    views = {"shapes": SHAPES, "colours": list(COLOURS)}
    for view, classes in views.items():
        for sub in ("images", "labels"):
            os.makedirs(os.path.join(out, view, sub), exist_ok=True)
        with open(os.path.join(out, view, "classes.txt"), "w") as f:
            f.write("\n".join(["background"] + classes) + "\n")
    for i in range(n):
        img, shape_label, colour_label, _ = make_picture(rng, size, rng.choice([1, 2, 3]))
        for view, label in (("shapes", shape_label), ("colours", colour_label)):
            img.save(os.path.join(out, view, "images", f"{i:05d}.png"))
            label.save(os.path.join(out, view, "labels", f"{i:05d}.png"))


def main():
    parser = argparse.ArgumentParser(
        description="Synthetic coloured-shape captions + a held-out segmentation set")
    parser.add_argument("--out", default="out/synthetic", help="output folder")
    parser.add_argument("--train", type=int, default=3000, help="training image-caption pairs")
    parser.add_argument("--test", type=int, default=100, help="held-out segmentation images")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args()
    write_shards(os.path.join(args.out, "shards"), args.train, args.size, args.per_shard, args.seed)
    write_segmentation_set(os.path.join(args.out, "seg"), args.test, args.size, args.seed + 1)
    print(f"wrote {args.train} pairs to {args.out}/shards and "
          f"{args.test} labelled images to {args.out}/seg")


if __name__ == "__main__":
    main()
