"""train.py on CPU: a 2-process gloo torchrun equals one process with the same global batch; 4 steps equal
2 + resume + 2 (with shuffling and 2 DataLoader workers); corrupt images and a truncated tar train through and
are counted; bad label folders and a non-finite loss stop with clear messages."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch

import parse_tags
import tagalign
import train
from conftest import ROOT, TINY, random_state_dict

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}
SHAPES = ["circle", "square"]


def jpeg(colour, shape, seed):
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (80, 72), (200 - seed % 50, 200, 190))
    box = [10 + seed % 20, 12, 60 + seed % 15, 62]
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def samples(n, offset=0):
    out = []
    for i in range(offset, offset + n):
        colour, shape = list(COLOURS)[i % 3], SHAPES[i % 2]
        out.append((f"{i:09d}", jpeg(colour, shape, i), f"a {colour} {shape} on a plain background"))
    return out


def write_shard(path, items, corrupt_keys=(), truncate=False):
    with tarfile.open(path, "w") as tar:
        for key, img, caption in items:
            if key in corrupt_keys:
                img = img[: len(img) // 3]  # a truncated JPEG
            for ext, data in (("jpg", img), ("txt", caption.encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if truncate:  # cut the archive inside the last image's data (cutting only the end padding is harmless)
        with tarfile.open(path) as tar:
            cut = [m for m in tar.getmembers() if m.name.endswith(".jpg")][-1].offset_data + 100
        with open(path, "r+b") as f:
            f.truncate(cut)


def write_labels(folder, items, untagged=()):
    """Labels as parse_tags.py writes them: parsed records -> merge -> vocab (objects: shapes, attributes: colours)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "parsed.0-of-1.jsonl"), "w") as f:
        for key, _, caption in items:
            words = caption.split()
            rec = {"key": key, "h": key, "objects": [words[2]], "attributes": [words[1]]}
            if key in untagged:
                rec = {"key": key, "h": key, "error": "after retry: not JSON", "raw": ""}
            f.write(json.dumps(rec) + "\n")
    parse_tags.merge(folder)
    parse_tags.build_vocab(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    items = samples(16)
    write_shard(root / "000000.tar", items)
    write_labels(str(root / "labels"), items, untagged={"000000003"})
    torch.save(random_state_dict(TINY, seed=2), root / "clip.pt")
    return root


def base_args(root, out, **overrides):
    args = {"--data": str(root / "000000.tar"), "--labels": str(root / "labels"), "--clip": str(root / "clip.pt"),
            "--out": str(out), "--steps": "3", "--batch-size": "4", "--workers": "0", "--shuffle-buffer": "1",
            "--image-size": "64", "--log-every": "1", "--lr": "0.5"}
    args.update({k: str(v) for k, v in overrides.items()})
    return [x for kv in args.items() for x in kv]


def trainable(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def assert_same(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_two_gloo_processes_equal_one_process(setup, tmp_path):
    """Same global batch of 4: 2 processes x 2 vs 1 process x 4, augmentation on (seeded per sample)."""
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          os.path.join(ROOT, "train.py"), *base_args(setup, tmp_path / "two", **{"--batch-size": 2})],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world 2, global batch 4 (2 x 2 x 1 accumulation)" in two.stdout
    train.main(base_args(setup, tmp_path / "one"))
    one_state, two_state = trainable(tmp_path / "one" / "ckpt.pt"), trainable(tmp_path / "two" / "ckpt.pt")
    assert_same(two_state, one_state, atol=2e-5)
    gate = two_state["projector.blocks.0.0.gate"]
    assert gate.abs() > 1e-3  # the run really trained (gates start at 0)
    logs = [open(tmp_path / d / "log.txt").read().splitlines() for d in ("one", "two")]
    losses = [[l.split(" obj ")[1].split(" tau")[0] for l in log if l.startswith("step")] for log in logs]
    assert losses[0] == losses[1]  # same loss terms at every step (4 decimals)


def test_accumulation_reaches_the_global_batch(setup, tmp_path):
    """1 process x 2 x 2 accumulation: gradient of the mean of two micro-batches (not one batch of 4, whose
    contrastive negatives differ), so only check it runs, logs and saves a loadable checkpoint."""
    train.main(base_args(setup, tmp_path / "acc", **{"--batch-size": 2, "--global-batch-size": 4}))
    model = tagalign.load_checkpoint(str(tmp_path / "acc" / "ckpt.pt"))
    assert model.projector.blocks[0][0].gate.item() != 0
    with pytest.raises(ValueError, match="multiple of batch-size"):
        train.main(base_args(setup, tmp_path / "bad", **{"--batch-size": 3, "--global-batch-size": 4}))


def test_resume_continues_exactly(setup, tmp_path):
    kw = {"--workers": 2, "--shuffle-buffer": 6, "--batch-size": 3, "--save-every": 2}
    train.main(base_args(setup, tmp_path / "straight", **kw, **{"--steps": 5}))
    train.main(base_args(setup, tmp_path / "resumed", **kw, **{"--steps": 3}))  # odd: the workers' turn rotates
    train.main(base_args(setup, tmp_path / "resumed", **kw, **{"--steps": 5}) + ["--resume"])
    assert_same(trainable(tmp_path / "resumed" / "ckpt.pt"), trainable(tmp_path / "straight" / "ckpt.pt"), atol=1e-6)
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert resumed["step"] == 5 and resumed["data"]["start"] == straight["data"]["start"]
    log = open(tmp_path / "resumed" / "log.txt").read()
    assert log.count("# start") == 2 and "step 4/5" in log and "step 3/5" not in log.split("# start")[2]
    with pytest.raises(ValueError, match="same number of processes"):
        train.main(base_args(setup, tmp_path / "resumed", **{**kw, "--workers": 1}, **{"--steps": 6}) + ["--resume"])


def test_corrupt_image_and_truncated_tar_are_skipped_and_counted(setup, tmp_path):
    items = samples(8, offset=100)
    write_shard(tmp_path / "bad.tar", items, corrupt_keys={"000000102"}, truncate=True)
    write_labels(str(tmp_path / "labels"), items)
    args = base_args(setup, tmp_path / "run", **{"--data": tmp_path / "bad.tar", "--labels": tmp_path / "labels",
                                                  "--steps": 4, "--batch-size": 3})
    train.main(args)
    last = [l for l in open(tmp_path / "run" / "log.txt").read().splitlines() if l.startswith("step")][-1]
    # each pass over the shard meets the corrupt JPEG once and the cut once; 12 samples need two passes
    counts = last.split("skipped ")[1].split()
    assert counts[:4] == ["img", counts[1], "tar", counts[3]] and int(counts[1]) >= 1 and int(counts[3]) >= 1, last
    assert int(counts[1]) == int(counts[3]) or int(counts[1]) == int(counts[3]) - 1


def test_bad_label_folders_and_non_finite_loss(setup, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="parse_tags.py vocab"):
        train.main(base_args(setup, tmp_path / "x", **{"--labels": tmp_path / "nothing"}))
    os.makedirs(tmp_path / "mismatch")
    vocab = json.load(open(setup / "labels" / "vocab.json"))
    vocab["objects"] = vocab["objects"][::-1]
    json.dump(vocab, open(tmp_path / "mismatch" / "vocab.json", "w"))
    os.link(setup / "labels" / "labels.pt", tmp_path / "mismatch" / "labels.pt")
    with pytest.raises(ValueError, match="disagree on the objects vocabulary"):
        train.main(base_args(setup, tmp_path / "x", **{"--labels": tmp_path / "mismatch"}))
    real = tagalign.tagalign_loss
    monkeypatch.setattr(tagalign, "tagalign_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(FloatingPointError, match=r"at step 1 .*batch keys: \['000000000'"):
        train.main(base_args(setup, tmp_path / "nan"))
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"),
                          *base_args(setup, tmp_path / "y", **{"--labels": tmp_path / "nothing"})],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and run.stderr.startswith("error:") and "Traceback" not in run.stderr


def test_multi_hot():
    out = train.multi_hot([torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([1])], 3, "cpu")
    assert out.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]


@pytest.mark.slow
def test_torch_compile_matches_eager_and_saves_the_unwrapped_model(setup, tmp_path):
    train.main(base_args(setup, tmp_path / "eager"))
    train.main(base_args(setup, tmp_path / "compiled") + ["--compile"])
    assert_same(trainable(tmp_path / "compiled" / "ckpt.pt"), trainable(tmp_path / "eager" / "ckpt.pt"), atol=1e-5)
