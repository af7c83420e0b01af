"""
Build COCO-Object labels from COCO-Stuff-164k's raw stuffthingmaps (as GroupViT/TCL's
convert_coco_object does; docs/datasets.md): thing classes -> 1..80 in COCO-Stuff order, every stuff
class and the unlabeled 255 -> 0 (background). No ignore label remains. The conversion lives in
data/prepare_datasets.py (`--datasets coco_object`), which prepares every benchmark; this command is
a thin wrapper around it for scripts that call it.

Run:
    python data/make_coco_object.py data/coco_stuff164k            # val2017
    python data/make_coco_object.py data/coco_stuff164k --splits val2017,train2017

Reads annotations/<split>/<id>.png (raw ids: COCO-Stuff id - 1; files with 'TrainIds' in the name
are skipped) and writes annotations/<split>/<id>_instanceTrainIds.png next to them (8-bit
grayscale). Existing outputs are kept unless --overwrite.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import prepare_datasets  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description="COCO-Stuff raw maps -> COCO-Object *_instanceTrainIds.png")
    parser.add_argument("root", help="the coco_stuff164k folder (holding annotations/<split>/)")
    parser.add_argument("--splits", default="val2017", help="comma-separated splits to convert")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="parallel processes (1: none)")
    parser.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    args = parser.parse_args()
    try:
        line, problems = prepare_datasets.prepare_coco(args.root, "object", args.splits.split(","),
                                                       args.workers, args.overwrite, progress=True)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    print(f"coco_object: {line}")
    for problem in problems:
        print(f"  {problem}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
