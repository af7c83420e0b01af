"""
Build COCO-Object labels from COCO-Stuff-164k's raw stuffthingmaps (as GroupViT/TCL's convert_coco_object does;
SPEC section 7, LAYOUTS.md section 4): thing classes -> 1..80 in COCO-Stuff order, every stuff class and the
unlabeled 255 -> 0 (background). No ignore label remains.

Run:
    python data/make_coco_object.py data/coco_stuff164k            # val2017 (and train2017 with --splits)
    python data/make_coco_object.py data/coco_stuff164k --splits val2017,train2017

Reads annotations/<split>/<id>.png (raw ids: COCO-Stuff id - 1; files with 'TrainIds' in the name are skipped)
and writes annotations/<split>/<id>_instanceTrainIds.png next to them (8-bit grayscale).
"""
import argparse
import os
import sys

import torch

# Raw COCO ids 0..90 without an annotated class; the other 80 are the things, in COCO-Stuff's train-id order.
UNUSED_THING_IDS = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
THING_IDS = [i for i in range(91) if i not in UNUSED_THING_IDS]


def lookup_table():
    """256-entry table raw id -> COCO-Object id."""
    table = torch.zeros(256, dtype=torch.uint8)
    for train_id, raw in enumerate(THING_IDS):
        table[raw] = train_id + 1
    return table


def convert(raw_path, table):
    from PIL import Image
    img = Image.open(raw_path)
    if img.mode not in ("L", "P"):
        raise ValueError(f"{raw_path}: expected an 8-bit index PNG, got mode {img.mode}")
    raw = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width).long()
    out = table[raw]
    Image.frombytes("L", (img.width, img.height), out.numpy().tobytes()).save(
        raw_path[:-len(".png")] + "_instanceTrainIds.png")


def main():
    parser = argparse.ArgumentParser(description="COCO-Stuff raw maps -> COCO-Object *_instanceTrainIds.png")
    parser.add_argument("root", help="the coco_stuff164k folder (holding annotations/<split>/)")
    parser.add_argument("--splits", default="val2017", help="comma-separated splits to convert")
    args = parser.parse_args()
    from tqdm import tqdm
    assert len(THING_IDS) == 80
    table = lookup_table()
    for split in args.splits.split(","):
        folder = os.path.join(args.root, "annotations", split)
        if not os.path.isdir(folder):
            sys.exit(f"error: {folder} not found; unzip stuffthingmaps_trainval2017.zip into {args.root}/annotations/")
        names = sorted(n for n in os.listdir(folder) if n.endswith(".png") and "TrainIds" not in n)
        for name in tqdm(names, desc=split):
            convert(os.path.join(folder, name), table)
        print(f"{split}: wrote {len(names)} *_instanceTrainIds.png")


if __name__ == "__main__":
    main()
