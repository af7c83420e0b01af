"""
Turn each benchmark's official download into the layout evaluate.py reads (docs/datasets.md),
with torch, PIL and the standard library only: no mmseg, mmcv, Detail API, cityscapesScripts or
pycocotools.

Run (from the repository root; --data-root is the folder evaluate.py's --data-root points at):
    python3 data/prepare_datasets.py --data-root data/ --datasets all
    python3 data/prepare_datasets.py --data-root data/ --datasets context,cityscapes --workers 8
    python3 data/prepare_datasets.py --data-root data/ --datasets coco_stuff,coco_object \
        --splits all
    python3 evaluate.py --check --datasets all --data-root data/
        # counts, label values, missing files

What each dataset needs under --data-root, and what is written (nothing else is touched):
    voc          VOCdevkit/VOC2012 from VOCtrainval_11-May-2012.tar. Nothing to convert; the
                 layout is checked.
    context      VOCdevkit/VOC2010 from VOCtrainval_03-May-2010.tar, plus the Detail annotations
                 VOCdevkit/VOC2010/trainval_merged.json. Writes SegmentationClassContext/<id>.png
                 (0 = background, 1..59 = context59.txt) and
                 ImageSets/SegmentationContext/val.txt (train.txt with --splits all).
    coco_stuff   coco_stuff164k/images/val2017 (val2017.zip) and
                 coco_stuff164k/annotations/val2017 (raw maps from
                 stuffthingmaps_trainval2017.zip). Writes
                 annotations/<split>/<id>_labelTrainIds.png (0..170, 255).
    coco_object  the same raw maps. Writes annotations/<split>/<id>_instanceTrainIds.png
                 (0 = background, 1..80).
    cityscapes   cityscapes/gtFine (gtFine_trainvaltest.zip) and cityscapes/leftImg8bit
                 (leftImg8bit_trainvaltest.zip). Writes
                 gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png (0..18, 255) from the
                 polygon JSONs.
    ade          ade/ADEChallengeData2016 from ADEChallengeData2016.zip. Nothing to convert; the
                 layout is checked.
    imagenet_s50, imagenet_s300
                 ImageNetS/ImageNetS{50,300} as LUSSeg's datapreparation/data_preparation.sh
                 leaves them: that tool only copies ImageNet's val images and downloads the label
                 PNGs, so nothing is converted here; the layout is checked.
--datasets all prepares what it finds and reports the rest as not found. Outputs that already exist
are skipped, so a run that crashed or was interrupted can simply be repeated (each file is written
to a temporary <name>.<random>.part of its own, synced to disk and renamed, so an existing output
is always complete); --overwrite redoes them. A file that cannot be converted is reported with its
reason and the others are still written; the exit status is then 1. So is a worker process that
dies (killed for memory, say): the run stops, the files finished so far are kept, and a rerun goes
on from there (files the stopped workers were writing are left as *.part temporaries, never taken
for outputs; they can be deleted).
"""
import argparse
import json
import multiprocessing
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Folders and suffixes, as evaluate.DATASETS reads them
# (tests/test_prepare_datasets.py checks they agree).
VOC_ROOT = "VOCdevkit/VOC2012"
CONTEXT_ROOT = "VOCdevkit/VOC2010"
CONTEXT_JSON = "trainval_merged.json"
CONTEXT_LABELS = "SegmentationClassContext"
CONTEXT_SPLITS = "ImageSets/SegmentationContext"
COCO_ROOT = "coco_stuff164k"
CITYSCAPES_ROOT = "cityscapes"
ADE_ROOT = "ade/ADEChallengeData2016"

# PASCAL-Context: the 60 Detail category ids kept by mmseg's
# tools/convert_datasets/pascal_context.py (0 plus the 59 most frequent classes), sorted. A pixel's
# label is the rank of its Detail id in this list (the converter's np.digitize against the sorted
# list), so 0 -> 0 background, 2 -> 1 aeroplane, ..., 458 -> 59 wood, which is the order of
# context60.txt. Source: mmseg's converter (docs/datasets.md).
CONTEXT_DETAIL_IDS = [0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85,
                      98, 104, 105, 113, 115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258,
                      259, 260, 284, 295, 296, 308, 324, 326, 347, 349, 354, 355, 360, 366, 368,
                      397, 415, 416, 420, 424, 427, 440, 445, 454, 458]

# COCO-Stuff 164k raw maps hold COCO-Stuff id - 1: things 0..90, stuff 91..181, 255
# unlabeled. These raw thing ids have no class (COCO dropped them); mmseg's coco_stuff164k.py
# table skips them, so the other 80 things get train ids 0..79 in order and stuff 91..181
# gets 80..170 (docs/datasets.md).
COCO_UNUSED_THINGS = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}
COCO_USED_RAW = [r for r in range(182) if r not in COCO_UNUSED_THINGS]

# Cityscapes label table of cityscapesScripts' helpers/labels.py: name -> (id, trainId). trainId 255
# marks labels ignored in evaluation; id -1 (license plate) is never drawn.
CITYSCAPES_LABELS = {
    "unlabeled": (0, 255), "ego vehicle": (1, 255), "rectification border": (2, 255),
    "out of roi": (3, 255), "static": (4, 255), "dynamic": (5, 255), "ground": (6, 255),
    "road": (7, 0), "sidewalk": (8, 1), "parking": (9, 255), "rail track": (10, 255),
    "building": (11, 2), "wall": (12, 3), "fence": (13, 4), "guard rail": (14, 255),
    "bridge": (15, 255), "tunnel": (16, 255), "pole": (17, 5), "polegroup": (18, 255),
    "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8), "terrain": (22, 9),
    "sky": (23, 10), "person": (24, 11), "rider": (25, 12), "car": (26, 13), "truck": (27, 14),
    "bus": (28, 15), "caravan": (29, 255), "trailer": (30, 255), "train": (31, 16),
    "motorcycle": (32, 17), "bicycle": (33, 18), "license plate": (-1, -1),
}

NAMES = ["voc", "context", "coco_stuff", "coco_object", "cityscapes", "ade", "imagenet_s50",
         "imagenet_s300"]
ALIASES = {"voc20": "voc", "context59": "context"}  # evaluate.py's names for the same files


def load_evaluate():
    """evaluate.py (imported late: it pulls in torch, which the COCO and
    Cityscapes workers do not need)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import evaluate
    return evaluate


# --------------------------------------------------------------------------------------------------
# Lookup tables

def coco_stuff_table():
    """256-entry list raw id -> COCO-Stuff train id. Raw ids outside the table become 255 (ignored):
    mmseg's converter would leave them unchanged, where they would pass for another class; the
    official maps hold none."""
    table = [255] * 256
    for train_id, raw in enumerate(COCO_USED_RAW):
        table[raw] = train_id
    return table


def coco_object_table():
    """256-entry list raw id -> COCO-Object id (GroupViT's convert_coco_object.py): the 80
    things -> 1..80 in COCO-Stuff order, stuff 91..181 and unlabeled 255 -> 0. Unused raw ids
    also go to 0 (not a thing)."""
    table = [0] * 256
    for train_id, raw in enumerate(COCO_USED_RAW[:80]):
        table[raw] = train_id + 1
    return table


def context_table():
    """{Detail id: label}, the rank of the id in CONTEXT_DETAIL_IDS."""
    return {detail_id: label for label, detail_id in enumerate(CONTEXT_DETAIL_IDS)}


# --------------------------------------------------------------------------------------------------
# Writing

_UMASK = None


def write_atomically(path, write):
    """Call write(binary file) on a temporary file of its own next to `path` (mkstemp:
    <name>.<random>.part, so two runs at once never share one), flush and fsync it, then rename it
    onto `path`. An existing `path` is therefore always complete, even after a crash or power loss.
    The temporary is removed if writing fails."""
    global _UMASK
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    if _UMASK is None:  # mkstemp creates 0600; give outputs the mode open() would
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_png(img, path):
    """Write a PIL image as PNG atomically (write_atomically)."""
    write_atomically(path, lambda f: img.save(f, format="PNG"))


def save_text(lines, path):
    """Write lines of text atomically (write_atomically)."""
    write_atomically(path, lambda f: f.write("".join(line + "\n" for line in lines).encode()))


def index_image(path):
    """An 8-bit label PNG as an 'L' image of its raw values (palette indices for a
    'P' PNG, never colours)."""
    from PIL import Image
    img = Image.open(path)
    if img.mode == "P":
        return Image.frombytes("L", img.size, img.tobytes())
    if img.mode != "L":
        raise ValueError(f"{path}: expected an 8-bit index PNG, got mode {img.mode}")
    return img


# --------------------------------------------------------------------------------------------------
# Converters: one input file -> one output file. Run in worker processes; they raise ValueError on
# bad input.

def convert_coco(raw_path, out_path, table):
    """Raw stuffthingmap -> train-id map by a 256-entry table. Returns the raw ids that map to 255
    although they are not 255 themselves (ids outside the table), for the report."""
    img = index_image(raw_path)
    hist = img.histogram()
    unlisted = [v for v in range(256) if hist[v] and table[v] == 255 and v != 255]
    save_png(img.point(table), out_path)
    return unlisted


def cityscapes_label_image(polygons_json):
    """A gtFine polygons JSON -> 'L' image of trainIds drawn as cityscapesScripts'
    json2labelImg(..., 'trainIds') does: start from 'unlabeled' (255); objects in file order, each
    drawn over the earlier ones with PIL's ImageDraw.polygon filled with its trainId; deleted
    objects skipped; an unknown label ending in 'group' is looked up without that suffix ('cargroup'
    -> car; 'polegroup' is a label of its own); labels with id < 0 (license plate) are not drawn."""
    from PIL import Image, ImageDraw
    with open(polygons_json) as f:
        data = json.load(f)
    try:
        size = (int(data["imgWidth"]), int(data["imgHeight"]))
        objects = data["objects"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{polygons_json}: not a Cityscapes polygons JSON (needs imgWidth, "
                         f"imgHeight, objects): {e}")
    img = Image.new("L", size, CITYSCAPES_LABELS["unlabeled"][1])
    draw = ImageDraw.Draw(img)
    for obj in objects:
        if obj.get("deleted"):
            continue
        label = obj["label"]
        if label not in CITYSCAPES_LABELS and label.endswith("group"):
            label = label[:-len("group")]
        if label not in CITYSCAPES_LABELS:
            raise ValueError(f"{polygons_json}: label '{obj['label']}' is not in Cityscapes' "
                             "label table")
        label_id, train_id = CITYSCAPES_LABELS[label]
        if label_id < 0:
            continue
        draw.polygon([(p[0], p[1]) for p in obj["polygon"]], fill=train_id)
    return img


def convert_cityscapes(polygons_json, out_path):
    save_png(cityscapes_label_image(polygons_json), out_path)


def context_label(height, width, annotations, table, name="image"):
    """(height, width) uint8 tensor of PASCAL-Context labels from one image's Detail
    annotations, as the Detail API's getMask(img) paints them (each annotation's mask set to its
    category_id, in annos_segmentation order, later over earlier; 0 where none) followed by
    mmseg's mapping of Detail ids to 0..59."""
    import torch
    if _IN_WORKER:
        torch.set_num_threads(1)
    evaluate = load_evaluate()  # our COCO RLE / polygon decoder
    detail = torch.zeros(height, width, dtype=torch.long)
    for category_id, segmentation in annotations:
        if isinstance(segmentation, dict) and list(segmentation.get("size", [])) != [height, width]:
            raise ValueError(f"{name}: an annotation's RLE size {segmentation.get('size')} differs "
                             f"from the image's {[height, width]}")
        detail[evaluate.annotation_mask(segmentation, height, width)] = category_id
    ids = detail.unique().tolist()
    unknown = [i for i in ids if i not in table]
    if unknown:  # mmseg's converter asserts the same: every Detail id must be one of the 60
        raise ValueError(f"{name}: Detail category ids {unknown} are not among PASCAL-Context's 60 "
                         "(is this the Detail trainval_merged.json?)")
    lut = torch.zeros(max(ids) + 1, dtype=torch.uint8)
    for i in ids:
        lut[i] = table[i]
    return lut[detail]


def convert_context(height, width, annotations, out_path, table):
    from PIL import Image
    label = context_label(height, width, annotations, table, os.path.basename(out_path))
    save_png(Image.frombytes("L", (width, height), label.numpy().tobytes()), out_path)


_IN_WORKER = False  # True in run_jobs' worker processes


def _worker_init():
    """Worker start-up: one thread per process (the workers are the parallelism; torch's own thread
    pool in each of them would only oversubscribe the cores)."""
    global _IN_WORKER
    _IN_WORKER = True


def _run_one(job):
    """(key, function, args) -> (key, result, error text or None). Errors are returned, not raised,
    so that one bad file neither stops the other workers nor loses their outputs."""
    key, fn, args = job
    try:
        return key, fn(*args), None
    except Exception as e:  # reported per file at the end
        return key, None, f"{type(e).__name__}: {e}"


def _run_chunk(chunk):
    """Worker entry point: a list of jobs -> their outcomes (_run_one)."""
    return [_run_one(job) for job in chunk]


def run_jobs(jobs, workers, desc, progress):
    """Run (key, function, args) jobs in `workers` spawned processes (1: in this process) with a
    progress bar. Returns ({key: result}, {key: error}, stopped): `stopped` is None, or why the run
    stopped early (a worker process died, e.g. killed for memory: concurrent.futures then fails
    every pending job with BrokenProcessPool instead of waiting forever, as multiprocessing.Pool
    does); jobs not done then are in neither dict, and every output written before stays (each is
    complete: write_atomically)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    from tqdm import tqdm
    results, errors, stopped = {}, {}, None
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not jobs, unit="file")

    def record(outcomes):
        for key, result, error in outcomes:
            if error is None:
                results[key] = result
            else:
                errors[key] = error
        bar.update(len(outcomes))

    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                record([_run_one(job)])
            return results, errors, stopped
        workers = min(workers, len(jobs))
        # a few chunks per worker: balance, little IPC
        size = max(1, min(64, len(jobs) // (4 * workers)))
        chunks = [jobs[i:i + size] for i in range(0, len(jobs), size)]
        # spawn, not fork: no inherited torch/OpenMP thread state in the workers
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init)
        try:
            futures = {executor.submit(_run_chunk, chunk): chunk for chunk in chunks}
            for future in as_completed(futures):
                try:
                    record(future.result())
                except BrokenProcessPool as e:
                    stopped = stopped or (f"a worker process died ({e}); was it killed, e.g. for "
                                          "lack of memory? Rerun (perhaps with fewer --workers) "
                                          "to do the rest")
                except Exception as e:
                    # a chunk that could not be sent or returned: its files failed
                    record([(key, None, f"{type(e).__name__}: {e}")
                            for key, _, _ in futures[future]])
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
        if stopped:
            stopped += (f"; {len(jobs) - len(results) - len(errors)} file(s) not done, "
                        f"{len(results)} written")
        return results, errors, stopped
    finally:
        bar.close()


def report(errors, stopped):
    """The problems to print: one line per failed file, then why the run
    stopped early, if it did."""
    return ([f"{path}: {error}" for path, error in sorted(errors.items())]
            + ([f"stopped: {stopped}"] if stopped else []))


# --------------------------------------------------------------------------------------------------
# Datasets: each returns (status line, list of problems). Missing inputs raise FileNotFoundError.

def todo(pairs, overwrite):
    """(input, output) pairs whose output is still to be written, and how
    many were already there."""
    left = [(i, o) for i, o in pairs if overwrite or not os.path.exists(o)]
    return left, len(pairs) - len(left)


def prepare_coco(root, kind, splits, workers, overwrite, progress):
    """COCO-Stuff (kind 'stuff') or COCO-Object (kind 'object') labels from
    the raw stuffthingmaps."""
    suffix, table = {"stuff": ("_labelTrainIds.png", coco_stuff_table()),
                     "object": ("_instanceTrainIds.png", coco_object_table())}[kind]
    pairs = []
    for split in splits:
        folder = os.path.join(root, "annotations", split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{folder} not found: unzip stuffthingmaps_trainval2017.zip "
                                    f"into {os.path.join(root, 'annotations')}/")
        # raw maps are <12 digits>.png; everything with 'TrainIds' in the name is an
        # output of ours or mmseg's
        pairs += [(os.path.join(folder, n), os.path.join(folder, n[:-len(".png")] + suffix))
                  for n in sorted(os.listdir(folder)) if n.endswith(".png") and "TrainIds" not in n]
    if not pairs:
        raise FileNotFoundError(f"no raw stuffthingmaps (*.png) under "
                                f"{root}/annotations/{{{','.join(splits)}}}")
    left, done = todo(pairs, overwrite)
    results, errors, stopped = run_jobs([(o, convert_coco, (i, o, table)) for i, o in left],
                                        workers, f"coco_{kind}", progress)
    unlisted = sorted({v for ids in results.values() for v in ids})
    problems = report(errors, stopped)
    line = f"wrote {len(results)}, already there {done}, failed {len(errors)} (*{suffix})"
    if unlisted and kind == "stuff":
        line += f"; raw ids outside mmseg's table written as 255 (ignored): {unlisted}"
    return line, problems


def prepare_cityscapes(root, splits, workers, overwrite, progress):
    gt = os.path.join(root, "gtFine")
    if not os.path.isdir(gt):
        raise FileNotFoundError(f"{gt} not found: unzip gtFine_trainvaltest.zip into {root}/")
    pairs = []
    for split in splits:
        for dirpath, _, names in os.walk(os.path.join(gt, split)):
            pairs += [(os.path.join(dirpath, n),
                       os.path.join(dirpath, n.replace("_polygons.json", "_labelTrainIds.png")))
                      for n in sorted(names) if n.endswith("_gtFine_polygons.json")]
    if not pairs:
        raise FileNotFoundError(f"no *_gtFine_polygons.json under {gt}/{{{','.join(splits)}}}")
    left, done = todo(sorted(pairs), overwrite)
    results, errors, stopped = run_jobs([(o, convert_cityscapes, (i, o)) for i, o in left], workers,
                                        "cityscapes", progress)
    problems = report(errors, stopped)
    return (f"wrote {len(results)}, already there {done}, failed {len(errors)} "
            "(*_gtFine_labelTrainIds.png)", problems)


def read_detail(json_path):
    """The Detail annotation file -> (images, {image_id: [(category_id, segmentation), ...]}).
    Fields relied on (the structure the Detail API's __init__/getImgs/getMask read): top-level
    'images' and 'annos_segmentation'; an image's 'image_id', 'file_name', 'height', 'width',
    'phase' ('train', 'val' or 'test'); an annotation's 'image_id', 'category_id' and 'segmentation'
    (COCO RLE, compressed or not; COCO polygons are accepted too). Annotations keep their file
    order, which is the order getMask paints them in. 'parts', 'categories', occlusion, boundary and
    keypoint entries are not needed for the class mask."""
    with open(json_path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "images" not in data or "annos_segmentation" not in data:
        raise ValueError(f"{json_path}: not a Detail annotation file (needs 'images' and "
                         "'annos_segmentation')")
    if (not isinstance(data["images"], list) or not isinstance(data["annos_segmentation"], list)
            or not all(isinstance(img, dict) for img in data["images"])):
        raise ValueError(f"{json_path}: 'images' and 'annos_segmentation' must be lists of objects")
    by_image = {}
    for ann in data["annos_segmentation"]:
        try:
            by_image.setdefault(ann["image_id"], []).append((ann["category_id"],
                                                             ann["segmentation"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{json_path}: an annos_segmentation entry lacks image_id, "
                             f"category_id or segmentation ({type(e).__name__}: {e}): "
                             f"{str(ann)[:200]}")
    return data["images"], by_image


def prepare_context(root, splits, workers, overwrite, progress, json_path=None):
    """PASCAL-Context labels of the Detail 'val' images (and 'train' with --splits
    all) plus the split files."""
    json_path = json_path or os.path.join(root, CONTEXT_JSON)
    split_dir = os.path.join(root, CONTEXT_SPLITS)
    out_dir = os.path.join(root, CONTEXT_LABELS)
    wanted = ["val"] if splits == ["val"] else ["train", "val"]

    def listed(split):
        """The stems in <split>.txt ([] when it is missing)."""
        path = os.path.join(split_dir, f"{split}.txt")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [line.strip() for line in f if line.strip()]

    # Already prepared: every split file there, none empty, and every listed label
    # there. Spares parsing the large JSON. An empty split file never counts: it would
    # hide a run on the wrong JSON.
    if not overwrite:
        stems_listed = {s: listed(s) for s in wanted}
        if all(stems_listed.values()) and all(os.path.exists(os.path.join(out_dir, stem + ".png"))
                                              for stems in stems_listed.values() for stem in stems):
            return (f"already prepared "
                    f"({', '.join(f'{s} {len(stems_listed[s])}' for s in wanted)} labels)", [])
    if not os.path.isfile(json_path):
        raise FileNotFoundError(f"{json_path} not found: download the Detail annotations "
                                f"trainval_merged.json into {root}/ (docs/datasets.md)")
    images, by_image = read_detail(json_path)
    table = context_table()
    stems, jobs, done = {s: [] for s in wanted}, [], 0
    for img in images:
        if img.get("phase") not in wanted:
            continue
        try:
            stem = os.path.splitext(img["file_name"])[0]
            size, anns = (int(img["height"]), int(img["width"])), by_image.get(img["image_id"], [])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{json_path}: an image entry lacks a usable file_name, height, width "
                             f"or image_id ({type(e).__name__}: {e}): {str(img)[:200]}")
        stems[img["phase"]].append(stem)
        out = os.path.join(out_dir, stem + ".png")
        if os.path.exists(out) and not overwrite:
            done += 1
            continue
        jobs.append((out, convert_context, (*size, anns, out, table)))
    empty = [s for s in wanted if not stems[s]]
    if empty:  # an empty split would be written, then taken for a finished one by every later run
        phases = sorted({str(img.get("phase")) for img in images if isinstance(img, dict)})
        raise ValueError(f"{json_path}: no {' or '.join(repr(s) for s in empty)} images (phases "
                         f"found: {', '.join(phases) or 'none'}); is this the Detail "
                         "trainval_merged.json?")
    results, errors, stopped = run_jobs(jobs, workers, "context", progress)
    problems = report(errors, stopped)
    # a split file is written only when all its labels are: evaluate.py never sees half a split
    if not errors and not stopped:
        for split in wanted:
            save_text(sorted(stems[split]), os.path.join(split_dir, f"{split}.txt"))
    counts = ", ".join(f"{s} {len(stems[s])}" for s in wanted)
    return (f"wrote {len(results)}, already there {done}, failed {len(errors)} ({counts} images)",
            problems)


def check_layout(name, data_root):
    """Datasets that need no conversion: count the image/label pairs as evaluate.py pairs them."""
    evaluate = load_evaluate()
    pairs, no_label, no_image = evaluate.find_pairs(evaluate.DATASETS[name], data_root)
    expected = evaluate.EXPECTED_COUNTS[name]
    problems = ([f"{len(pairs)} image/label pairs; the official split has {expected:,}"]
                if len(pairs) != expected else [])
    problems += ([f"image without label: {s}" for s in no_label[:20]]
                 + [f"label without image: {s}" for s in no_image[:20]])
    note = ("; LUSSeg's data_preparation.sh only copies files" if name.startswith("imagenet_s")
            else "")
    return (f"nothing to convert{note}; {len(pairs)} image/label pairs (official {expected:,})",
            problems)


def source_folder(name, data_root):
    """The folder whose presence means the dataset's download is there."""
    sys_root = {"voc": VOC_ROOT, "context": CONTEXT_ROOT, "coco_stuff": COCO_ROOT + "/annotations",
                "coco_object": COCO_ROOT + "/annotations",
                "cityscapes": CITYSCAPES_ROOT + "/gtFine", "ade": ADE_ROOT,
                "imagenet_s50": "ImageNetS/ImageNetS50",
                "imagenet_s300": "ImageNetS/ImageNetS300"}[name]
    return os.path.join(data_root, sys_root)


def prepare(name, args):
    """Prepare one dataset; returns (status line, problems)."""
    splits = args.splits
    if name == "context":
        return prepare_context(os.path.join(args.data_root, CONTEXT_ROOT), splits, args.workers,
                               args.overwrite, args.progress, args.context_json)
    if name in ("coco_stuff", "coco_object"):
        coco_splits = ["val2017"] if splits == ["val"] else ["train2017", "val2017"]
        return prepare_coco(os.path.join(args.data_root, COCO_ROOT), name[5:], coco_splits,
                            args.workers, args.overwrite, args.progress)
    if name == "cityscapes":
        city_splits = ["val"] if splits == ["val"] else ["train", "val", "test"]
        return prepare_cityscapes(os.path.join(args.data_root, CITYSCAPES_ROOT), city_splits,
                                  args.workers, args.overwrite, args.progress)
    return check_layout(name, args.data_root)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Prepare the segmentation benchmarks from their "
                                            "official downloads (no mmseg/mmcv); see the module "
                                            "docstring")
    p.add_argument("--data-root", required=True,
                   help="folder holding the downloads (evaluate.py's --data-root)")
    p.add_argument("--datasets", default="all",
                   help="comma-separated, from " + ", ".join(NAMES) +
                   " (voc20, context59 are aliases), or 'all'")
    p.add_argument("--splits", default="val", choices=["val", "all"],
                   help="val: only what evaluate.py reads; all: also train (and Cityscapes test), "
                   "as mmseg does")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel processes (1: none)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--context-json", default=None,
                   help="Detail annotation file "
                   "(default: <data-root>/VOCdevkit/VOC2010/trainval_merged.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = p.parse_args(argv)
    args.splits = ["val"] if args.splits == "val" else ["train", "val"]
    return args


def main(argv=None):
    args = parse_args(argv)
    requested = [n.strip() for n in args.datasets.split(",") if n.strip()]
    find_only = requested == ["all"]  # 'all': prepare what is there; a named dataset must be there
    names = NAMES if find_only else list(dict.fromkeys(ALIASES.get(n, n) for n in requested))
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        sys.exit(f"error: unknown dataset(s) {unknown}; choose from {', '.join(NAMES)} or all")
    if args.workers < 1:
        sys.exit(f"error: --workers must be >= 1, got {args.workers}")
    if not os.path.isdir(args.data_root):
        sys.exit(f"error: --data-root {args.data_root} is not a folder")
    failed = []
    for name in names:
        if find_only and not os.path.isdir(source_folder(name, args.data_root)):
            print(f"{name:14s} not found ({source_folder(name, args.data_root)}); skipped",
                  flush=True)
            continue
        try:
            line, problems = prepare(name, args)
        except (FileNotFoundError, ValueError) as e:
            line, problems = "FAILED", [str(e)]
        print(f"{name:14s} {line}", flush=True)
        for problem in problems:
            print(f"  {problem}", flush=True)
        if problems:
            failed.append(name)
    print("check them with: python3 evaluate.py --check --datasets all --data-root "
          + args.data_root)
    if failed:
        sys.exit(f"error: problems in {', '.join(failed)} (listed above); fix them and rerun, "
                 "finished files are kept")


if __name__ == "__main__":
    main()
