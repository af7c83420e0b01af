"""data/prepare_datasets.py on fixtures written in each official format (a Detail-style JSON, raw stuffthingmaps,
Cityscapes polygon JSONs); every expected label map is written out by hand from the converters' rules."""
import json
import os
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "data"))
import evaluate  # noqa: E402
import prepare_datasets as prep  # noqa: E402


def read_png(path):
    from PIL import Image
    img = Image.open(path)
    assert img.mode == "L", f"{path}: labels must be 8-bit grayscale, got {img.mode}"
    return evaluate.pil_to_long(img).tolist()


def write_png(path, rows, mode="L"):
    from PIL import Image
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = Image.frombytes("L", (len(rows[0]), len(rows)), bytes(v for row in rows for v in row))
    if mode == "P":  # an indexed PNG: its indices are the raw ids, its colours must not matter
        img = img.convert("P")
        img.putpalette([(i * 7) % 256 for i in range(768)])
    img.save(path)


def run(root, *flags):
    return prep.main(["--data-root", str(root), "--no-progress", "--workers", "1", *flags])


# ---------------------------------------------------------------------------------------------- PASCAL-Context

def rect(h, w, top, bottom, left, right):
    m = torch.zeros(h, w, dtype=torch.uint8)
    m[top:bottom + 1, left:right + 1] = 1
    return m


def uncompressed_rle(mask):
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat, runs, value, n = mask.t().flatten().tolist(), [], 0, 0
    for v in flat:
        if v != value:
            runs.append(n)
            value, n = v, 0
        n += 1
    return runs + [n]


def detail_json(path, images, annotations):
    """A file in trainval_merged.json's structure (the Detail API reads these keys)."""
    data = {"info": {"description": "fixture"}, "images": images, "annos_segmentation": annotations,
            "categories": [{"category_id": c, "name": n, "supercategory": "object", "onlysemantic": 0, "parts": []}
                           for c, n in ((2, "aeroplane"), (9, "bag"), (3, "not-in-context"), (458, "wood"))],
            "parts": [], "annos_occlusion": [], "annos_boundary": [], "annos_joints": []}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def image(stem, phase, h=4, w=6):
    return {"file_name": stem + ".jpg", "image_id": int(stem[:4] + stem[5:]), "height": h, "width": w,
            "phase": phase, "date_captured": "2010"}


def annotation(ann_id, image_id, category_id, segmentation):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation,
            "area": 0, "bbox": [0, 0, 1, 1], "iscrowd": 0, "parts": []}


def context_fixture(tmp_path, extra=()):
    mask_api = pytest.importorskip("pycocotools.mask")  # test-only: writes the compressed RLE strings
    import numpy as np

    def compressed(mask):
        rle = mask_api.encode(np.asfortranarray(mask.numpy()))
        return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}

    root = tmp_path / "VOCdevkit" / "VOC2010"
    images = [image("2008_000001", "val"), image("2008_000002", "train"), image("2008_000003", "val"),
              image("2008_000004", "test")]
    anns = [annotation(1, 2008000001, 2, compressed(rect(4, 6, 0, 2, 0, 3))),            # aeroplane
            annotation(2, 2008000002, 9, compressed(rect(4, 6, 0, 3, 0, 5))),            # bag, another image
            annotation(3, 2008000001, 458, {"size": [4, 6],                              # wood, later: on top
                                            "counts": uncompressed_rle(rect(4, 6, 1, 3, 2, 5))}),
            annotation(4, 2008000004, 2, compressed(rect(4, 6, 0, 3, 0, 5))),
            # bag: last in the file, but a lower id and a lower category than the wood it covers, so only
            # "file order, later over earlier" paints it on top (not sorting by annotation id or by category)
            annotation(0, 2008000001, 9, compressed(rect(4, 6, 2, 3, 3, 4)))] + list(extra)
    detail_json(str(root / "trainval_merged.json"), images, anns)
    return root


def test_context_labels_from_a_detail_json(tmp_path):
    root = context_fixture(tmp_path)
    run(tmp_path, "--datasets", "context")
    out = root / "SegmentationClassContext"
    # Detail 2 aeroplane -> 1, 458 wood -> 59 painted over it, then 9 bag -> 2 over the wood (file order)
    assert read_png(out / "2008_000001.png") == [[1, 1, 1, 1, 0, 0],
                                                 [1, 1, 59, 59, 59, 59],
                                                 [1, 1, 59, 2, 2, 59],
                                                 [0, 0, 59, 2, 2, 59]]
    assert read_png(out / "2008_000003.png") == [[0] * 6] * 4  # a val image without annotations
    assert sorted(os.listdir(out)) == ["2008_000001.png", "2008_000003.png"]  # train only with --splits all
    assert (root / "ImageSets" / "SegmentationContext" / "val.txt").read_text() == "2008_000001\n2008_000003\n"
    run(tmp_path, "--datasets", "context59", "--splits", "all")  # alias; adds train, keeps val
    assert read_png(out / "2008_000002.png") == [[2] * 6] * 4  # Detail 9 bag -> 2
    assert (root / "ImageSets" / "SegmentationContext" / "train.txt").read_text() == "2008_000002\n"
    assert not (out / "2008_000004.png").exists()  # 'test' phase images are not converted


# The Detail ids in mmseg's tools/convert_datasets/pascal_context.py (_mapping), in that file's (unsorted) order;
# the converter sorts them and a pixel's label is the rank of its Detail id (SOURCES.md, "Auxiliary facts").
MMSEG_CONTEXT_MAPPING = [0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162,
                         420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72,
                         458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115]


def test_context_table_is_mmsegs_sorted_ids_and_names():
    assert len(MMSEG_CONTEXT_MAPPING) == len(set(MMSEG_CONTEXT_MAPPING)) == 60
    assert prep.CONTEXT_DETAIL_IDS == sorted(MMSEG_CONTEXT_MAPPING)
    table = prep.context_table()
    assert table == {detail_id: rank for rank, detail_id in enumerate(sorted(MMSEG_CONTEXT_MAPPING))}
    assert (table[0], table[2], table[9], table[458]) == (0, 1, 2, 59)
    names = evaluate.read_classes("context60.txt")
    assert (names[1], names[2], names[59]) == ("aeroplane", "bag", "wood")


def test_context_unknown_detail_id_is_a_clear_error_and_loses_nothing(tmp_path, capsys):
    root = context_fixture(tmp_path, [annotation(5, 2008000003, 3, {"size": [4, 6], "counts": [0, 24]})])
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--datasets", "context")
    assert "problems in context" in str(e.value)
    out = capsys.readouterr().out
    assert "2008_000003.png: ValueError: 2008_000003.png: Detail category ids [3] are not among" in out
    assert (root / "SegmentationClassContext" / "2008_000001.png").exists()  # the good image is kept
    assert not (root / "ImageSets" / "SegmentationContext" / "val.txt").exists()  # no half split file


def test_context_split_without_images_is_an_error_not_an_empty_split(tmp_path, capsys):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    detail_json(str(root / "trainval_merged.json"), [image("2008_000002", "train")], [])  # no 'val' image at all
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "--datasets", "context")
    assert "problems in context" in str(e.value)
    assert "no 'val' images" in capsys.readouterr().out
    assert not (root / "ImageSets" / "SegmentationContext" / "val.txt").exists()
    with pytest.raises(SystemExit):  # and a rerun still says so: nothing was taken for "already prepared"
        run(tmp_path, "--datasets", "context")
    assert "no 'val' images" in capsys.readouterr().out


@pytest.mark.parametrize("broken", ["annotation", "image"])
def test_context_malformed_detail_json_is_a_clear_error(tmp_path, capsys, broken):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    img, ann = image("2008_000001", "val"), annotation(1, 2008000001, 2, {"size": [4, 6], "counts": [24]})
    del (ann if broken == "annotation" else img)["segmentation" if broken == "annotation" else "height"]
    detail_json(str(root / "trainval_merged.json"), [img], [ann])
    with pytest.raises(SystemExit) as e:  # not a KeyError traceback
        run(tmp_path, "--datasets", "context")
    assert "problems in context" in str(e.value)
    out = capsys.readouterr().out
    assert ("an annos_segmentation entry lacks" if broken == "annotation" else "an image entry lacks") in out
    assert "'height'" in out or "'segmentation'" in out


def test_context_empty_split_file_is_not_already_prepared(tmp_path, capsys):
    root = context_fixture(tmp_path)
    split = root / "ImageSets" / "SegmentationContext" / "val.txt"
    os.makedirs(split.parent)
    split.write_text("")  # left by an earlier run on a JSON without 'val' images
    run(tmp_path, "--datasets", "context")
    assert "already prepared" not in capsys.readouterr().out
    assert split.read_text() == "2008_000001\n2008_000003\n"
    run(tmp_path, "--datasets", "context")
    assert "already prepared (val 2 labels)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- COCO

# raw stuffthingmap ids: person 0, unused 11, stop sign 12, unused 90, stuff 91 and 181, 182 and 254 (no class),
# unlabeled 255, toothbrush 89
RAW = [[0, 11, 12, 90, 91], [181, 182, 254, 255, 89]]


@pytest.mark.parametrize("mode", ["L", "P"])
def test_coco_stuff_and_object_from_raw_stuffthingmaps(tmp_path, mode, capsys):
    folder = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    write_png(str(folder / "000000000001.png"), RAW, mode)
    write_png(str(folder / "000000000002_labelTrainIds_old.png"), [[7]])  # not a raw map: 'TrainIds' in its name
    run(tmp_path, "--datasets", "coco_stuff,coco_object")
    # stuff: things -> 0..79 skipping the 11 unused ids (12 -> 11, 89 -> 79), stuff 91..181 -> 80..170,
    # ids outside the table -> 255, 255 stays 255
    assert read_png(folder / "000000000001_labelTrainIds.png") == [[0, 255, 11, 255, 80], [170, 255, 255, 255, 79]]
    # object: things -> 1..80, everything else (stuff, unlabeled, unused) -> 0 background
    assert read_png(folder / "000000000001_instanceTrainIds.png") == [[1, 0, 12, 0, 0], [0, 0, 0, 0, 80]]
    assert sorted(os.listdir(folder)) == ["000000000001.png", "000000000001_instanceTrainIds.png",
                                          "000000000001_labelTrainIds.png", "000000000002_labelTrainIds_old.png"]
    assert "written as 255 (ignored): [11, 90, 182, 254]" in capsys.readouterr().out
    names = evaluate.read_classes("coco_stuff171.txt")
    assert (names[0], names[11], names[79], names[80], names[170]) == (
        "person", "stop sign", "toothbrush", "banner", "wood")


# mmseg's tools/convert_datasets/coco_stuff164k.py clsID_to_trID, written as the raw id of each train id 0..170
# (entry i is the raw id that becomes train id i); its last entry, 255 -> 255, is checked separately.
MMSEG_COCO_RAW_OF_TRAIN_ID = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20,                          # 0..19
    21, 22, 23, 24, 26, 27, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,                # 20..39
    45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,                # 40..59
    66, 69, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 83, 84, 85, 86, 87, 88, 89,                # 60..79
    91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110,     # 80..99
    111, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127, 128, 129, 130,
    131, 132, 133, 134, 135, 136, 137, 138, 139, 140, 141, 142, 143, 144, 145, 146, 147, 148, 149, 150,
    151, 152, 153, 154, 155, 156, 157, 158, 159, 160, 161, 162, 163, 164, 165, 166, 167, 168, 169, 170,
    171, 172, 173, 174, 175, 176, 177, 178, 179, 180, 181]                                        # ..170


def test_coco_tables_are_mmsegs_and_groupvits_in_full():
    assert len(MMSEG_COCO_RAW_OF_TRAIN_ID) == len(set(MMSEG_COCO_RAW_OF_TRAIN_ID)) == 171
    stuff = [255] * 256  # raw ids mmseg's table does not list -> 255 here (mmseg leaves them as they are)
    for train_id, raw in enumerate(MMSEG_COCO_RAW_OF_TRAIN_ID):
        stuff[raw] = train_id
    assert stuff[255] == 255
    assert prep.coco_stuff_table() == stuff
    obj = [0] * 256  # GroupViT: the 80 things -> 1..80 in the same order, everything else background 0
    for train_id, raw in enumerate(MMSEG_COCO_RAW_OF_TRAIN_ID[:80]):
        obj[raw] = train_id + 1
    assert prep.coco_object_table() == obj


def test_rerun_skips_finished_files_and_overwrite_redoes_them(tmp_path, capsys):
    folder = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    for i in range(3):
        write_png(str(folder / f"00000000000{i}.png"), RAW)
    out = folder / "000000000001_labelTrainIds.png"
    write_png(str(out), [[9]])  # as if a crashed run had finished this file: it is not redone
    run(tmp_path, "--datasets", "coco_stuff")
    assert "wrote 2, already there 1, failed 0" in capsys.readouterr().out
    assert read_png(out) == [[9]]
    run(tmp_path, "--datasets", "coco_stuff")
    assert "wrote 0, already there 3" in capsys.readouterr().out
    run(tmp_path, "--datasets", "coco_stuff", "--overwrite")
    assert read_png(out) == [[0, 255, 11, 255, 80], [170, 255, 255, 255, 79]]
    assert not [n for n in os.listdir(folder) if n.endswith(".part")]  # atomic writes leave no temporaries


def test_outputs_use_a_temporary_of_their_own_synced_before_the_rename(tmp_path, monkeypatch):
    from PIL import Image
    out = tmp_path / "labels" / "a.png"
    os.makedirs(out.parent)
    (tmp_path / "labels" / "a.png.part").write_bytes(b"half")  # another run's file being written right now
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    prep.save_png(Image.new("L", (3, 2), 7), str(out))
    prep.save_text(["x", "y"], str(tmp_path / "labels" / "val.txt"))
    assert (tmp_path / "labels" / "a.png.part").read_bytes() == b"half"  # neither taken nor overwritten
    assert read_png(out) == [[7, 7, 7], [7, 7, 7]] and (tmp_path / "labels" / "val.txt").read_text() == "x\ny\n"
    assert len(synced) == 2  # each written file reached the disk before its rename
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask  # the mode open() gives, not mkstemp's 0600
    assert sorted(os.listdir(tmp_path / "labels")) == ["a.png", "a.png.part", "val.txt"]  # no temporaries left


def test_make_coco_object_cli_still_works(tmp_path):
    import subprocess
    folder = tmp_path / "annotations" / "val2017"
    write_png(str(folder / "000000000001.png"), RAW)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_coco_object.py"), str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert read_png(folder / "000000000001_instanceTrainIds.png") == [[1, 0, 12, 0, 0], [0, 0, 0, 0, 80]]


# ---------------------------------------------------------------------------------------------- Cityscapes

def box(label, x0, y0, x1, y1, **extra):
    return {"label": label, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], **extra}


def polygons_json(path, objects, w=8, h=6):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"imgHeight": h, "imgWidth": w, "objects": objects}, f)


CITY_OBJECTS = [box("road", 0, 0, 7, 5),
                box("sky", 0, 0, 7, 2, deleted=1),        # deleted: skipped
                box("cargroup", 1, 1, 4, 3),              # 'group' suffix -> car 13
                box("ego vehicle", 3, 2, 6, 4),           # ignored label 255, over the car
                box("license plate", 1, 2, 2, 3),         # id -1: never drawn, the car stays
                box("polegroup", 6, 0, 7, 1),             # a label of its own (trainId 255), not 'pole'
                box("persongroup", 0, 0, 1, 1)]           # person 11, over the car at (1, 1)
CITY_EXPECTED = [[11, 11, 0, 0, 0, 0, 255, 255],
                 [11, 11, 13, 13, 13, 0, 255, 255],
                 [0, 13, 13, 255, 255, 255, 255, 0],
                 [0, 13, 13, 255, 255, 255, 255, 0],
                 [0, 0, 0, 255, 255, 255, 255, 0],
                 [0, 0, 0, 0, 0, 0, 0, 0]]


def test_cityscapes_label_table_is_cityscapesscripts():
    # name: (id, trainId) of every label in cityscapesScripts' helpers/labels.py (mcordts/cityscapesScripts)
    assert prep.CITYSCAPES_LABELS == {
        "unlabeled": (0, 255), "ego vehicle": (1, 255), "rectification border": (2, 255), "out of roi": (3, 255),
        "static": (4, 255), "dynamic": (5, 255), "ground": (6, 255),
        "road": (7, 0), "sidewalk": (8, 1), "parking": (9, 255), "rail track": (10, 255),
        "building": (11, 2), "wall": (12, 3), "fence": (13, 4), "guard rail": (14, 255), "bridge": (15, 255),
        "tunnel": (16, 255),
        "pole": (17, 5), "polegroup": (18, 255), "traffic light": (19, 6), "traffic sign": (20, 7),
        "vegetation": (21, 8), "terrain": (22, 9), "sky": (23, 10), "person": (24, 11), "rider": (25, 12),
        "car": (26, 13), "truck": (27, 14), "bus": (28, 15), "caravan": (29, 255), "trailer": (30, 255),
        "train": (31, 16), "motorcycle": (32, 17), "bicycle": (33, 18),
        "license plate": (-1, -1)}
    names = evaluate.read_classes("cityscapes19.txt")  # trainIds 0..18 name the 19 classes in order
    assert {train_id: name for name, (_, train_id) in prep.CITYSCAPES_LABELS.items() if train_id not in (255, -1)} \
        == dict(enumerate(names))


def test_cityscapes_polygons_drawn_as_cityscapesscripts(tmp_path, capsys):
    gt = tmp_path / "cityscapes" / "gtFine"
    polygons_json(str(gt / "val" / "lindau" / "lindau_000000_000019_gtFine_polygons.json"), CITY_OBJECTS)
    polygons_json(str(gt / "val" / "lindau" / "lindau_000001_000019_gtFine_polygons.json"),
                  [box("road", 0, 0, 7, 5), box("hovercraft", 0, 0, 1, 1)])
    polygons_json(str(gt / "train" / "aachen" / "aachen_000000_000019_gtFine_polygons.json"), CITY_OBJECTS)
    with pytest.raises(SystemExit):  # the unknown label fails its file only
        run(tmp_path, "--datasets", "cityscapes")
    assert "label 'hovercraft' is not in Cityscapes' label table" in capsys.readouterr().out
    out = gt / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png"
    assert read_png(out) == CITY_EXPECTED
    assert not (gt / "val" / "lindau" / "lindau_000001_000019_gtFine_labelTrainIds.png").exists()
    assert not (gt / "train" / "aachen" / "aachen_000000_000019_gtFine_labelTrainIds.png").exists()  # val only


# ---------------------------------------------------------------------------------------------- driver

def test_all_prepares_what_it_finds_in_parallel_processes(tmp_path, capsys):
    folder = tmp_path / "coco_stuff164k" / "annotations" / "val2017"
    for i in range(4):
        write_png(str(folder / f"00000000000{i}.png"), RAW)
    for i in range(3):
        polygons_json(str(tmp_path / "cityscapes" / "gtFine" / "val" / "lindau" /
                          f"lindau_00000{i}_000019_gtFine_polygons.json"), CITY_OBJECTS)
    prep.main(["--data-root", str(tmp_path), "--datasets", "all", "--workers", "2", "--no-progress"])
    out = capsys.readouterr().out
    for name in ("voc", "context", "ade", "imagenet_s50", "imagenet_s300"):
        assert f"{name:14s} not found" in out
    assert "coco_stuff     wrote 4" in out and "coco_object    wrote 4" in out and "cityscapes     wrote 3" in out
    assert read_png(tmp_path / "cityscapes" / "gtFine" / "val" / "lindau" /
                    "lindau_000002_000019_gtFine_labelTrainIds.png") == CITY_EXPECTED
    assert read_png(folder / "000000000003_labelTrainIds.png") == [[0, 255, 11, 255, 80], [170, 255, 255, 255, 79]]


def test_a_worker_that_dies_stops_the_run_instead_of_hanging(tmp_path):
    """A worker killed (by the OOM killer, say) must end the run with a report, not leave it waiting forever."""
    import threading
    folder = tmp_path / "val2017"
    table, jobs = prep.coco_stuff_table(), []
    for i in range(4):
        raw, out = str(folder / f"{i:012d}.png"), str(folder / f"{i:012d}_labelTrainIds.png")
        write_png(raw, RAW)
        jobs.append((out, prep.convert_coco, (raw, out, table)))
    jobs.insert(2, ("dies", os._exit, (9,)))  # the worker running this job exits at once, as if killed
    box = {}
    thread = threading.Thread(target=lambda: box.update(out=prep.run_jobs(jobs, 2, "test", False)), daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "run_jobs still waiting 60 s after a worker died"
    results, errors, stopped = box["out"]
    assert stopped and "a worker process died" in stopped and "not done" in stopped
    assert "dies" not in results and not errors  # nothing failed by itself; the dead job is simply not done
    for out in results:  # whatever finished is there and complete
        assert read_png(out) == [[0, 255, 11, 255, 80], [170, 255, 255, 255, 79]]
    assert "stopped: a worker process died" in prep.report(errors, stopped)[-1]  # printed, and main exits 1
    # the other worker is terminated too: a file it was writing stays a temporary, never a partial output. A job
    # may finish its rename and be terminated before its result arrives: such a file is unreported but complete.
    outputs = {n for n in os.listdir(folder) if not n.endswith(".part")} - {f"{i:012d}.png" for i in range(4)}
    assert outputs >= {os.path.basename(out) for out in results}
    for name in outputs:
        assert read_png(folder / name) == [[0, 255, 11, 255, 80], [170, 255, 255, 255, 79]], name


def test_named_dataset_that_is_missing_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--datasets", "cityscapes")
    assert "gtFine not found: unzip gtFine_trainvaltest.zip" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown dataset"):
        run(tmp_path, "--datasets", "pascal")


def test_layout_without_conversion_is_counted(tmp_path, capsys):
    from test_evaluate import build_fixture
    build_fixture(tmp_path, "ade", n_images=2)
    with pytest.raises(SystemExit):  # 2 pairs where SPEC expects 2,000
        run(tmp_path, "--datasets", "ade")
    assert "nothing to convert; 2 image/label pairs (official 2,000)" in capsys.readouterr().out


def test_paths_agree_with_evaluate():
    d = evaluate.DATASETS
    assert d["voc"]["root"] == prep.VOC_ROOT and d["ade"]["root"] == prep.ADE_ROOT
    assert d["context"]["root"] == prep.CONTEXT_ROOT and d["context"]["ann"] == prep.CONTEXT_LABELS
    assert d["context"]["split"] == prep.CONTEXT_SPLITS + "/val.txt"
    assert d["coco_stuff"]["root"] == d["coco_object"]["root"] == prep.COCO_ROOT
    assert (d["coco_stuff"]["seg_suffix"], d["coco_object"]["seg_suffix"]) == ("_labelTrainIds.png",
                                                                               "_instanceTrainIds.png")
    assert d["cityscapes"]["root"] == prep.CITYSCAPES_ROOT and d["cityscapes"]["seg_suffix"] == "_gtFine_labelTrainIds.png"
    assert set(prep.NAMES) | set(prep.ALIASES) == set(evaluate.STANDARD)
