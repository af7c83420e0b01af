"""train.py on CPU: a 2-process gloo torchrun equals one process with the same global batch; 4 steps equal
2 + resume + 2 (with shuffling and 2 DataLoader workers); corrupt images and a truncated tar train through and
are counted; bad label folders and a non-finite loss stop with clear messages."""
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch
import torch.nn.functional as F

import clip_model
import parse_io
import parse_tags
import tagalign
import train
from labels import LabelTable
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
            rec = {"key": key, "h": parse_io.caption_hash(caption), "objects": [words[2]], "attributes": [words[1]]}
            if key in untagged:
                rec = {"key": key, "h": parse_io.caption_hash(caption), "error": "after retry: not JSON", "raw": ""}
            f.write(json.dumps(rec) + "\n")
    parse_io.merge(folder)
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
    with pytest.raises(ValueError, match="'workers' differs"):
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
    rows, cols = train.sparse_tags([torch.tensor([0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([1])])
    assert rows.tolist() == [0, 0, 2] and cols.tolist() == [0, 2, 1]
    out = train.multi_hot(rows, cols, 3, 3, torch.device("cpu"))
    assert out.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]


@pytest.mark.slow  # ~1 min of compilation; --compile is off by default
def test_torch_compile_matches_eager_and_saves_the_unwrapped_model(setup, tmp_path):
    train.main(base_args(setup, tmp_path / "eager"))
    train.main(base_args(setup, tmp_path / "compiled") + ["--compile"])
    assert_same(trainable(tmp_path / "compiled" / "ckpt.pt"), trainable(tmp_path / "eager" / "ckpt.pt"), atol=1e-5)


# ---------------------------------------------------------------------------------------------- issue: real run

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_ranks(rank, world, runs, out_dir, nan_step):
    """One process of a gloo group that runs train.main for each (port, argv) in turn, recording how each ended.
    nan_step: this rank's loss becomes NaN at that (1-based) micro-step of each run on rank 1 only (0: never)."""
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    real = tagalign.tagalign_loss
    for n, (port, argv) in enumerate(runs):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        calls = []

        def loss(*a, **k):
            total, terms = real(*a, **k)
            calls.append(1)
            return (total * float("nan"), terms) if rank == 1 and len(calls) == nan_step else (total, terms)
        tagalign.tagalign_loss = loss
        try:
            train.main(argv)
            message = "finished"
        except FloatingPointError as e:
            message = str(e)
        with open(os.path.join(out_dir, f"run{n}.rank{rank}.txt"), "w") as f:
            f.write(message)


def spawn_training(runs, out_dir, nan_step=0, timeout=300):
    """2 gloo processes (torch.multiprocessing, one start-up for several runs); fails if a rank hangs."""
    import torch.multiprocessing as mp
    runs = [(free_port(), argv) for argv in runs]
    ctx = mp.spawn(_train_ranks, args=(2, runs, str(out_dir), nan_step), nprocs=2, join=False)
    deadline = time.time() + timeout
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("a rank hung")
    return [[open(os.path.join(out_dir, f"run{n}.rank{r}.txt")).read() for r in range(2)] for n in range(len(runs))]


def test_each_loss_term_can_be_switched_off_under_ddp(setup, tmp_path):
    """Paper Table 3's ablations under 2 gloo processes: a term switched off leaves its temperature without a
    gradient, which DDP refuses at the second step unless that parameter is frozen. The same group also checks
    that --tag-average tagged under 2 processes x 2 equals 1 process x 4 (the untagged sample is on rank 1)."""
    terms = {"--itc-weight": "itc", "--attribute-weight": "attr", "--object-weight": "obj"}
    runs = [base_args(setup, tmp_path / term, **{"--batch-size": 2, "--steps": 3, off: 0}) for off, term in terms.items()]
    # in the same process group: --tag-average tagged (a count all-reduced over ranks) vs one process below
    runs.append(base_args(setup, tmp_path / "tagged2", **{"--batch-size": 2, "--tag-average": "tagged"}))
    # paper Table 6's long-tail losses train under DDP too (every trainable parameter gets a gradient)
    kinds = ("weighted", "focal", "asymmetric")
    runs += [base_args(setup, tmp_path / kind, **{"--batch-size": 2, "--tag-loss": kind}) for kind in kinds]
    ended = spawn_training(runs, tmp_path)
    for kind, messages in zip(kinds, ended[-3:]):
        assert messages == ["finished", "finished"], (kind, messages)
        state = torch.load(tmp_path / kind / "ckpt.pt", weights_only=False)
        assert state["data"]["tag_loss"] == kind and state["model"]["projector.blocks.0.0.gate"] != 0
    ended = ended[:-3]
    assert ended[-1] == ["finished", "finished"], ended[-1]
    train.main(base_args(setup, tmp_path / "tagged1", **{"--tag-average": "tagged"}))
    assert_same(trainable(tmp_path / "tagged2" / "ckpt.pt"), trainable(tmp_path / "tagged1" / "ckpt.pt"), atol=2e-5)
    init = torch.tensor(1 / 0.07).log()
    for (off, term), messages in zip(terms.items(), ended):
        assert messages == ["finished", "finished"], (off, messages)
        lines = [l for l in open(tmp_path / term / "log.txt").read().splitlines() if l.startswith("step")]
        assert len(lines) == 3 and all(f" {term} off " in l for l in lines)
        state = torch.load(tmp_path / term / "ckpt.pt", weights_only=False)["model"]
        # ITC off: its temperature is frozen; objects or attributes off: the other tag list still trains tau_tag
        assert bool(torch.isclose(state["logit_scale_itc"], init)) == (term == "itc")
        assert not torch.isclose(state["logit_scale_tag"], init)


def test_two_processes_resumed_twice_continue_exactly(setup, tmp_path):
    """Each rank saves the data position of its own roles only: with a copy of every role's resume position, the
    last rank's stale copies overwrote the others' real ones, and a second resume replayed data (seen: role 0 at
    4 records instead of 6 after one resume, weights off by 6e-4 after two)."""
    kw = {"--batch-size": 2, "--shuffle-buffer": 4, "--save-every": 1, "--workers": 2}  # roles 0, 1 | 2, 3
    runs = [base_args(setup, tmp_path / "straight", **kw, **{"--steps": 4})]
    runs += [base_args(setup, tmp_path / "resumed", **kw, **{"--steps": n}) + (["--resume"] if n > 2 else [])
             for n in (2, 3, 4)]
    assert spawn_training(runs, tmp_path) == [["finished", "finished"]] * 4
    straight = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert resumed["step"] == 4 and resumed["data"]["start"] == straight["data"]["start"]
    assert sorted(straight["data"]["start"]) == [0, 1, 2, 3] and sum(s["position"] for s in straight["data"]["start"].values()) == 16
    assert_same(resumed["model"], straight["model"], atol=1e-6)


def test_non_finite_loss_on_one_rank_stops_every_rank(setup, tmp_path):
    argv = base_args(setup, tmp_path / "run", **{"--batch-size": 2, "--steps": 5, "--log-every": 3})
    [messages] = spawn_training([argv], tmp_path, nan_step=2)  # NaN at step 2 on rank 1; checked after step 3
    for m in messages:
        assert m.startswith("non-finite loss at step 2 (rank 1; all 2 processes stop)"), m
    keys = eval(messages[0].split("batch keys: ")[1].split("]")[0] + "]")
    assert len(keys) == 2 and all(k.isdigit() for k in keys)
    assert not (tmp_path / "run" / "ckpt.pt").exists()  # nothing non-finite was saved


def test_labels_that_match_no_sample_stop_with_both_keys(setup, tmp_path):
    items = [(f"x{i}", None, f"a red circle {i}") for i in range(4)]
    write_labels(str(tmp_path / "other"), items)
    for extra in ([], ["--keep-unlisted"]):  # a whole pass skipped as unlisted; kept: the first step's check
        with pytest.raises(ValueError, match=r"data keys look like '0000000\d\d', labels.pt keys like 'x\d'"):
            train.main(base_args(setup, tmp_path / "run", **{"--labels": tmp_path / "other"}) + extra)


def test_samples_without_a_labels_row_are_skipped_and_counted(setup, tmp_path):
    """The authors' dataset trains only samples its index lists: by default a key without a row in labels.pt is
    skipped, before the shuffle buffer, and counted as unlisted; --keep-unlisted trains them (ITC only)."""
    items = samples(16)
    write_labels(str(tmp_path / "half"), items[::2], untagged={"000000002"})  # 8 keys listed, 7 with tags
    kw = {"--labels": tmp_path / "half", "--batch-size": 8, "--steps": 1}
    train.main(base_args(setup, tmp_path / "run", **kw))
    line = open(tmp_path / "run" / "log.txt").read().splitlines()[-1]
    assert " tagged 87.5% found 100.0% " in line and line.endswith(" unlisted 8"), line  # 7 / 8, 8 unlisted
    train.main(base_args(setup, tmp_path / "kept", **{**kw, "--batch-size": 16}) + ["--keep-unlisted"])
    line = open(tmp_path / "kept" / "log.txt").read().splitlines()[-1]
    assert " tagged 43.8% found 50.0% " in line and line.endswith(" unlisted 0"), line  # 7 / 16 and 8 / 16
    with pytest.raises(ValueError, match="'keep_unlisted' differs"):
        train.main(base_args(setup, tmp_path / "run", **{**kw, "--steps": 2}) + ["--keep-unlisted", "--resume"])


def test_resume_refuses_a_changed_run_and_applies_a_new_lr(setup, tmp_path):
    out = tmp_path / "run"
    train.main(base_args(setup, out, **{"--steps": 2}))
    changes = {"--seed": ("1", "seed"), "--shuffle-buffer": ("3", "shuffle_buffer"),
               "--global-batch-size": ("8", "global_batch"), "--itc-weight": ("0.5", "loss_weights"),
               "--min-crop-scale": ("0.5", "augmentation"), "--auto-augment": ("none", "augmentation"),
               "--grad-clip": ("1.0", "grad_clip")}
    for flag, (value, field) in changes.items():
        with pytest.raises(ValueError, match=f"'{field}' differs"):
            train.main(base_args(setup, out, **{"--steps": 3, flag: value}) + ["--resume"])
    with pytest.raises(ValueError, match="'augmentation' differs"):
        train.main(base_args(setup, out, **{"--steps": 3}) + ["--no-augment", "--resume"])
    write_shard(tmp_path / "other.tar", samples(16))
    with pytest.raises(ValueError, match="'files' differs"):
        train.main(base_args(setup, out, **{"--steps": 3, "--data": tmp_path / "other.tar"}) + ["--resume"])
    items = samples(16)
    write_labels(str(tmp_path / "labels2"), items, untagged={"000000004"})  # one sample's tags differ
    with pytest.raises(ValueError, match="'labels' differs"):
        train.main(base_args(setup, out, **{"--steps": 3, "--labels": tmp_path / "labels2"}) + ["--resume"])
    # backbone settings are compared as resolved: the default surgery (the last half: 4 of the tiny CLIP's 8) equals
    # an explicit --surgery-layers 4, while 3, another crop size or another activation are refused
    for flag, value, field in (("--surgery-layers", "3", "surgery_layers"), ("--image-size", "32", "image_size"),
                               ("--clip-act", "quickgelu", "clip_quick_gelu")):
        with pytest.raises(ValueError, match=f"'{field}' differs"):
            train.main(base_args(setup, out, **{"--steps": 3, flag: value}) + ["--resume"])
    # a new --lr wins over the optimizer's saved one, and says so: 0.25 x 4 / 4096
    train.main(base_args(setup, out, **{"--steps": 3, "--lr": 0.25, "--surgery-layers": 4}) + ["--resume"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.25 * 4 / 4096] * 2
    assert "lr 0.000244" in open(out / "log.txt").read().splitlines()[-1]


def test_resume_does_not_count_skipped_input_twice(setup, tmp_path):
    items = samples(8, offset=200)
    write_shard(tmp_path / "bad.tar", items, truncate=True)
    write_labels(str(tmp_path / "labels"), items)
    kw = {"--data": tmp_path / "bad.tar", "--labels": tmp_path / "labels", "--batch-size": 3, "--shuffle-buffer": 4,
          "--save-every": 2}

    def last(out):
        return [l for l in open(out / "log.txt").read().splitlines() if l.startswith("step")][-1].split("skipped ")[1]
    train.main(base_args(setup, tmp_path / "straight", **kw, **{"--steps": 4}))
    train.main(base_args(setup, tmp_path / "resumed", **kw, **{"--steps": 2}))
    assert last(tmp_path / "resumed") == "img 0 tar 1 member 1 unlisted 0"  # the cut was read ahead before the checkpoint
    train.main(base_args(setup, tmp_path / "resumed", **kw, **{"--steps": 4}) + ["--resume"])
    assert last(tmp_path / "resumed") == last(tmp_path / "straight")


def test_optimizer_groups_and_lr_scaling(tiny_model):
    """The authors' rule: only 1-D parameters and '.bias' names are exempt, so the 0-d gates and temperatures
    are decayed; decay_scalars=False exempts them too."""
    model = tagalign.TagAlign(tiny_model)
    model.logit_scale_itc.requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    weights = [f"projector.blocks.{b}.{i}.conv.weight" for b in range(2) for i in range(2)] + ["proj"]
    scalars = [f"projector.blocks.{b}.{i}.gate" for b in range(2) for i in range(2)] + ["logit_scale_tag"]
    one_d = [f"projector.blocks.{b}.{i}.{w}" for b in range(2) for i in range(2)
             for w in ("norm.weight", "norm.bias", "conv.bias")] + ["ln_post.weight", "ln_post.bias"]
    decay, no_decay = train.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(weights + scalars)
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(one_d)
    decay, no_decay = train.param_groups(model, 0.05, decay_scalars=False)
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(weights)
    assert sorted(names[id(p)] for p in no_decay["params"]) == sorted(one_d + scalars)
    # one AdamW step with a zero gradient: a decayed scalar shrinks by lr x wd, an exempt one stays
    tau = model.logit_scale_tag.detach().clone()
    decay, no_decay = train.param_groups(model, 0.05)
    opt = torch.optim.AdamW([decay, no_decay], lr=0.1, eps=1e-6)
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    assert torch.allclose(model.logit_scale_tag.detach(), tau * (1 - 0.1 * 0.05))
    assert train.scaled_lr(1e-3, 8 * 512) == 1e-3 and train.scaled_lr(1e-3, 1024) == 2.5e-4


@pytest.mark.parametrize("average", ["batch", "tagged"])
def test_accumulation_gradient_is_the_formula(setup, tmp_path, monkeypatch, average):
    """1 process x 2 micro-batches of 2: the gradient the optimizer receives equals that of
    L = L_obj(all 4 images) + L_attr(all 4) + (L_itc(micro 1) + L_itc(micro 2)) / 2, where the tag losses average
    over the 4 images (or over the 3 tagged ones: sample 3 has no tags, so per-micro-batch means would differ)."""
    recorded = []

    class Recorder(torch.optim.AdamW):
        def step(self, closure=None):
            recorded.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)
    monkeypatch.setattr(train.torch.optim, "AdamW", Recorder)
    args = base_args(setup, tmp_path, **{"--batch-size": 2, "--global-batch-size": 4, "--steps": 1,
                                         "--grad-clip": 1e9, "--no-augment": "", "--tag-average": average})
    train.main([a for a in args if a != ""])

    torch.manual_seed(0)  # what train.py does before building the model: the same projector init
    clip = clip_model.load(str(setup / "clip.pt"))
    model = tagalign.TagAlign(clip).train()  # train.py's default: surgery on the last half
    vocab = json.load(open(setup / "labels" / "vocab.json"))
    labels = LabelTable(str(setup / "labels" / "labels.pt"))
    _, transform = train.train_transform(64, False)
    from PIL import Image
    items = samples(4)  # shuffle buffer 1, no workers: the first 4 records in file order
    from torchvision.transforms import Normalize
    crops = torch.stack([transform(Image.open(io.BytesIO(img)).convert("RGB")) for _, img, _ in items])  # uint8
    images = Normalize(clip_model.IMAGENET_MEAN, clip_model.IMAGENET_STD)(crops.float() / 255)
    tokens = clip_model.tokenize([c for _, _, c in items])
    _, z = model(images)
    t = model.encode_text(tokens)
    tau_tag, tau_itc = model.temperatures()
    total = 0
    for i, kind in enumerate(("objects", "attributes")):
        names = [e["tag"] for e in vocab[kind]]
        y = torch.zeros(4, len(names))
        for r, (key, _, _) in enumerate(items):
            y[r, labels.get(key)[i]] = 1
        emb = tagalign.tag_embeddings(clip, names)
        log_f = torch.tensor([e["freq"] for e in vocab[kind]]).log()
        s = tau_tag * F.normalize(z, dim=-1) @ emb.t() + log_f
        per_image = -(y * s.log_softmax(-1)).sum(1) / y.sum(1).clamp(min=1)
        denominator = 4 if average == "batch" else (y.sum(1) > 0).sum()
        total = total + per_image.sum() / denominator
    total = total + (tagalign.contrastive_loss(z[:2], t[:2], tau_itc) + tagalign.contrastive_loss(z[2:], t[2:], tau_itc)) / 2
    total.backward()
    expected = [p.grad for g in train.param_groups(model, 0.05) for p in g["params"]]
    assert len(recorded) == 1 and len(recorded[0]) == len(expected)
    for got, want in zip(recorded[0], expected):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4), (got - want).abs().max()


TIMM_INCREASING = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                   "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                   "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


def test_augmentation_is_the_authors_policy_at_its_strength():
    """SPEC section 5: rand-m9-mstd0.5-inc1 (2 of the 15 increasing ops, each with probability 0.5, magnitude
    N(9, 0.5) of 10), mean-colour fill, pixel-mode RandomErasing p 0.25. Op strengths against hand-computed values."""
    from PIL import Image
    crop, transform = train.train_transform(224, True)
    assert type(crop).__name__ == "RandomResizedCropAndInterpolation" and crop.size == (224, 224)
    assert crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3) and crop.interpolation.value == "bilinear"
    kinds = [type(t).__name__ for t in transform.transforms]
    ra = transform.transforms[kinds.index("RandAugment")]
    assert ra.num_layers == 2 and sorted(op.name for op in ra.ops) == sorted(TIMM_INCREASING)
    assert all(op.prob == 0.5 and op.magnitude == 9 and op.magnitude_std == 0.5 for op in ra.ops)
    assert kinds == ["RandomHorizontalFlip", "RandAugment", "MaybePILToTensor"]  # uint8 out, erased later
    ops = {op.name: op for op in ra.ops}
    for op in ops.values():  # exactly magnitude 9, always applied
        op.prob, op.magnitude_std = 1.0, 0.0
    # brightness: factor 1 +- 0.9 x 0.9 (timm's 0.9 at magnitude 10): 100 -> 181 or 19
    grey = Image.new("RGB", (8, 8), (100, 100, 100))
    got = set()
    for seed in range(12):
        with train.seeded(seed):
            got.add(ops["BrightnessIncreasing"](grey).getpixel((0, 0)))
    assert got == {(181, 181, 181), (19, 19, 19)}
    # rotate: 0.9 x 30 = 27 degrees either way, corners filled with the ImageNet mean colour (124, 116, 104)
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((200, 0, 0), (32, 30, 60, 34))
    expected = [img.rotate(a, resample=Image.BILINEAR, fillcolor=(124, 116, 104)).tobytes() for a in (27, -27)]
    seen = set()
    for seed in range(12):
        with train.seeded(seed):
            out = ops["Rotate"](img).tobytes()
        assert out in expected
        seen.add(expected.index(out))
    assert seen == {0, 1}
    # posterize: 4 - int(0.9 x 4) = 1 bit kept: 100 -> 0, 200 -> 128
    assert ops["PosterizeIncreasing"](Image.new("RGB", (2, 2), (100, 200, 30))).getpixel((0, 0)) == (0, 128, 0)
    # the magnitude noise reaches 10 (clipped), where 0 bits are kept: black, not an error (Pillow 13 raises)
    ops["PosterizeIncreasing"].magnitude = 10
    assert ops["PosterizeIncreasing"](Image.new("RGB", (2, 2), (100, 200, 30))).getpixel((0, 0)) == (0, 0, 0)
    # each op is skipped half the time, and the magnitude is drawn around 9 (std 0.5)
    op = ra.ops[0].__class__(ops["BrightnessIncreasing"].name, prob=0.5, magnitude=9,
                             hparams=ops["BrightnessIncreasing"].hparams)
    op.magnitude_std = 0.5
    values = []
    for seed in range(400):
        with train.seeded(seed):
            values.append(op(grey).getpixel((0, 0))[0])
    unchanged = sum(v == 100 for v in values) / len(values)
    assert 0.42 < unchanged < 0.58, unchanged
    assert len(set(values) - {100, 181, 19}) > 5  # the noise moves the strength


def test_uint8_pipeline_with_device_erasing_is_timms_float_pipeline():
    """The workers ship uint8 crops and an erase box; normalise_and_erase finishes on the device. Against timm's
    own float pipeline (ToTensor, Normalize, RandomErasing p 0.25 pixel mode: the authors' img_aug) under the same
    seeds: the same pixels everywhere outside the box, the same box (where timm's values differ), timm's share of
    erased images, and N(0, 1) noise inside."""
    from PIL import Image
    from timm.data import create_transform
    timm_float = create_transform(64, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5,
                                  interpolation="bilinear", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=None,
                                  mean=clip_model.IMAGENET_MEAN, std=clip_model.IMAGENET_STD, re_prob=0.25,
                                  re_mode="pixel", re_count=1)
    crop_step, rest = train.train_transform(64, True)
    data = jpeg("red", "circle", 1)
    img = Image.open(io.BytesIO(data)).convert("RGB")
    erased, noise = 0, []
    for seed in range(120):
        with train.seeded(seed):
            want = timm_float(img)
        with train.seeded(seed):  # as CaptionImages.decode: crop while decoding, the rest, then the box
            crop = rest(train.decode_and_crop(Image.open(io.BytesIO(data)), crop_step))
            box = train.erase_box(64, 64)
        assert crop.dtype == torch.uint8
        got = train.normalise_and_erase(crop[None], [(*box, seed)], torch.Generator())[0]
        top, left, h, w = box
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[top:top + h, left:left + w] = True
        assert torch.allclose(got[:, ~inside], want[:, ~inside], atol=1e-6)
        plain = train.normalise_and_erase(crop[None], [(0, 0, 0, 0, 0)], None)[0]
        assert torch.equal((plain != want).any(0), inside)  # timm erased exactly our box
        erased += h > 0
        noise.append(got[:, inside].flatten())
    assert 0.15 < erased / 120 < 0.35, erased
    noise = torch.cat(noise)
    assert noise.numel() > 1000 and abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1


def test_augmentation_is_seeded_per_sample():
    from PIL import Image
    crop, rest = train.train_transform(64, True)
    runs = []
    for seed in (5, 5, 6):
        with train.seeded(seed):
            runs.append(rest(train.decode_and_crop(Image.open(io.BytesIO(jpeg("red", "circle", 1))), crop)))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_a_big_jpeg_is_decoded_at_reduced_size_where_the_crop_allows():
    """PIL's draft (libjpeg's DCT scaling) when the crop box is twice the output's size a side: the same
    box as timm's RandomResizedCrop on the full decode, within 2 of 255 levels on average; a small crop of the same
    photo decodes in full and equals timm's exactly."""
    from PIL import Image, ImageFilter
    from timm.data.transforms import RandomResizedCropAndInterpolation
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(100, 125, 3, generator=g) * 255).byte().numpy()
    photo = Image.fromarray(noise).resize((1000, 800), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=92)
    full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    for scale, drafted in (((0.9, 1.0), True), ((0.01, 0.012), False)):
        crop = RandomResizedCropAndInterpolation(112, scale=scale, interpolation="bilinear")
        with train.seeded(1):
            want = torch.tensor(__import__("numpy").asarray(crop(full))).float()
        lazy = Image.open(io.BytesIO(buf.getvalue()))
        with train.seeded(1):
            got = train.decode_and_crop(lazy, crop)
        got = torch.tensor(__import__("numpy").asarray(got)).float()
        assert (lazy.size != (1000, 800)) == drafted and got.shape == want.shape == (112, 112, 3)
        assert (got - want).abs().mean() < 2.0 and torch.equal(got, want) != drafted  # of 255 levels


def test_inputs_are_checked_before_clip_is_loaded(setup, tmp_path, monkeypatch):
    def no_clip(*a, **k):
        raise AssertionError("CLIP was loaded before the inputs were checked")
    monkeypatch.setattr(clip_model, "load", no_clip)
    (tmp_path / "pairs.csv").write_text("id,image,caption\n1,a.jpg,a red circle\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['key'\]"):
        train.main(base_args(setup, tmp_path / "a", **{"--data-csv": tmp_path / "pairs.csv"})[2:])
    (tmp_path / "pairs.csv").write_text("key,image,caption\n1,a.jpg,a red circle\n")
    with pytest.raises(FileNotFoundError, match="check --image-root"):
        train.main(base_args(setup, tmp_path / "a", **{"--data-csv": tmp_path / "pairs.csv"})[2:])
    with pytest.raises(FileNotFoundError, match="not found"):
        train.main(base_args(setup, tmp_path / "a", **{"--data": tmp_path / "missing.tar"}))
    os.makedirs(tmp_path / "old")
    torch.save({}, tmp_path / "old" / "ckpt.pt")
    with pytest.raises(FileExistsError, match="pass --resume to continue that run, or --overwrite"):
        train.main(base_args(setup, tmp_path / "old"))


def test_undecodable_data_stops_instead_of_waiting_forever(setup, tmp_path):
    items = [(key, b"not an image", caption) for key, _, caption in samples(6)]
    write_shard(tmp_path / "junk.tar", items)
    dataset = train.CaptionImages([str(tmp_path / "junk.tar")], None, train.train_transform(64, False),
                                  shuffle_buffer=1)
    with pytest.raises(RuntimeError, match="images in a row could not be decoded"):
        next(iter(dataset))
    write_shard(tmp_path / "empty.tar", [])
    dataset = train.CaptionImages([str(tmp_path / "empty.tar")], None, train.train_transform(64, False))
    with pytest.raises(RuntimeError, match="gave worker 0 no complete sample"):
        next(iter(dataset))


def test_a_patch_14_backbone_trains_and_segments_with_its_own_defaults(setup, tmp_path, capsys):
    """A ViT-L/14-like CLIP (patch 14, 56 px input, 4 blocks; QuickGELU, said by its file name): train.py with no
    --image-size and no --surgery-layers crops at 56 px and runs surgery on the last 2 blocks; the checkpoint
    records both and the activation, which a renamed copy of the CLIP (no hint in its name) then inherits; the
    single-image command's default window is 112 (2 x 56, a multiple of 14)."""
    from PIL import Image
    cfg = clip_model.CLIPConfig(embed_dim=64, image_resolution=56, vision_layers=4, vision_width=128,
                                vision_patch_size=14, transformer_width=128, transformer_heads=2, transformer_layers=2)
    sd = random_state_dict(cfg, seed=6)
    torch.save(sd, tmp_path / "l14-like-quickgelu.pt")
    torch.save(sd, tmp_path / "renamed.pt")
    args = base_args(setup, tmp_path / "run", **{"--clip": tmp_path / "l14-like-quickgelu.pt", "--steps": 2})
    i = args.index("--image-size")
    train.main(args[:i] + args[i + 2:])
    log = capsys.readouterr().out
    assert "QuickGELU ('quickgelu' in its name)" in log and "surgery on the last 2 blocks, crops of 56 px" in log
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert ckpt["config"]["surgery_layers"] == 2 and ckpt["clip_quick_gelu"] is True

    model = tagalign.load_model(str(tmp_path / "run" / "ckpt.pt"), str(tmp_path / "renamed.pt"))
    assert model.clip.cfg.quick_gelu and model.clip.activation == "QuickGELU (recorded in the TagAlign checkpoint)"
    # a checkpoint that does not record the activation is refused, not guessed
    unrecorded = {k: v for k, v in ckpt.items() if k != "clip_quick_gelu"}
    torch.save(unrecorded, tmp_path / "unrecorded.pt")
    with pytest.raises(ValueError, match="not a TagAlign checkpoint of train.py"):
        tagalign.load_model(str(tmp_path / "unrecorded.pt"), str(tmp_path / "renamed.pt"))
    # the tag embedding cache knows the activation: the same weights with GELU are embedded afresh
    cache = str(tmp_path / "run" / "tag_embeddings_objects.pt")
    cached = torch.load(cache, weights_only=True)["embeddings"]
    names = [e["tag"] for e in json.load(open(setup / "labels" / "vocab.json"))["objects"]]
    assert torch.equal(tagalign.tag_embeddings(model.clip, names, cache), cached)
    gelu = clip_model.load(str(tmp_path / "renamed.pt"), quick_gelu=False)
    assert (tagalign.tag_embeddings(gelu, names, cache) - cached).abs().max() > 1e-4
    with pytest.raises(ValueError, match="trained on a CLIP with QuickGELU.*pass --clip-act quickgelu"):
        tagalign.load_model(str(tmp_path / "run" / "ckpt.pt"), str(tmp_path / "renamed.pt"), quick_gelu=False)

    Image.open(io.BytesIO(samples(1)[0][1])).save(tmp_path / "photo.png")
    calls = []
    real = tagalign.sliding_scores
    tagalign.sliding_scores = lambda *a, **kw: calls.append(a[3:5] or (kw["window"], kw["stride"])) or real(*a, **kw)
    try:
        tagalign.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--image", str(tmp_path / "photo.png"),
                       "--queries", "circle,square", "--out-dir", str(tmp_path / "fig"), "--device", "cpu"])
    finally:
        tagalign.sliding_scores = real
    assert calls and set(calls) == {(112, 56)} and (tmp_path / "fig" / "figure.png").is_file()
    with pytest.raises(SystemExit, match="--window 100 is not a multiple of the CLIP's patch size 14; use 98 or 112"):
        tagalign.main(["--checkpoint", str(tmp_path / "run" / "ckpt.pt"), "--image", str(tmp_path / "photo.png"),
                       "--queries", "circle", "--window", "100", "--device", "cpu"])


def test_a_resume_reads_only_the_shuffle_buffer_at_any_step(setup, tmp_path, monkeypatch):
    """Constant-time resume: the bytes a resumed stream reads before its first sample (the records still in the
    shuffle buffer, then the next record) do not grow with the step, while the records consumed do."""
    items = samples(64, offset=300)
    write_shard(tmp_path / "big.tar", items)
    write_labels(str(tmp_path / "labels"), items)
    kw = {"--data": tmp_path / "big.tar", "--labels": tmp_path / "labels", "--shuffle-buffer": 4,
          "--batch-size": 4, "--no-augment": ""}
    read = []

    def counting_open(path, mode="r", *a, **k):
        f = open(path, mode, *a, **k)
        if "b" in mode:
            real = f.read
            f.read = lambda n=-1: read.append(len(data := real(n))) or data
        return f
    skip_phase = {}
    for steps in (2, 14):
        out = tmp_path / f"run{steps}"
        train.main([a for a in base_args(setup, out, **kw, **{"--steps": steps}) if a != ""])
        ckpt = torch.load(out / "ckpt.pt", weights_only=False)
        labels = LabelTable(str(tmp_path / "labels" / "labels.pt"))
        data = train.CaptionImages(ckpt["data"]["files"], labels, train.train_transform(64, False),
                                   shuffle_buffer=4, start=ckpt["data"]["start"])
        monkeypatch.setattr(train, "open", counting_open, raising=False)
        read.clear()
        first = next(iter(data))
        skip_phase[steps] = sum(read)
        monkeypatch.undo()
        assert ckpt["data"]["start"][0]["position"] == 4 * steps and first[5] in {k for k, _, _ in items}
    record = os.path.getsize(tmp_path / "big.tar") / 64
    # the old resume re-read all 56 consumed records; this one the buffer's 4 and the next (in 10 KiB reads)
    assert skip_phase[14] <= 1.3 * skip_phase[2] and skip_phase[14] < 56 * record / 3, (skip_phase, record)
    # a gzip-compressed shard cannot be seeked: the buffer's records are decompressed in one pass, then the
    # stream's (not one pass per buffered record)
    import gzip
    with open(tmp_path / "big.tar", "rb") as f, gzip.open(tmp_path / "big.tar.gz", "wb") as g:
        g.write(f.read())
    out = tmp_path / "gz"
    train.main([a for a in base_args(setup, out, **{**kw, "--data": tmp_path / "big.tar.gz"}, **{"--steps": 14})
                if a != ""])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    data = train.CaptionImages(ckpt["data"]["files"], labels, train.train_transform(64, False), shuffle_buffer=4,
                               start=ckpt["data"]["start"])
    monkeypatch.setattr(train, "open", counting_open, raising=False)
    read.clear()
    next(iter(data))
    monkeypatch.undo()
    assert sum(read) < 2.2 * os.path.getsize(tmp_path / "big.tar.gz"), sum(read)


def test_records_restart_at_their_byte_offsets(tmp_path):
    """tar (plain: seeked; gzip: decompressed from the start and passed over) and CSV (quoted commas and
    newlines): the records read from any record's start offset are the tail of the whole list."""
    import gzip
    items = samples(5, offset=400)
    write_shard(tmp_path / "a.tar", items)
    with open(tmp_path / "a.tar", "rb") as f, gzip.open(tmp_path / "a.tar.gz", "wb") as g:
        g.write(f.read())
    skipped = dict.fromkeys(train.SKIPS, 0)
    for name in ("a.tar", "a.tar.gz"):
        whole = list(train.tar_records(str(tmp_path / name), skipped))
        assert [(k, i, c) for k, i, c, _, _ in whole] == items
        assert [r[4] for r in whole[:-1]] == [r[3] for r in whole[1:]] and whole[-1][4] is None
        for n, rec in enumerate(whole):
            assert list(train.tar_records(str(tmp_path / name), skipped, rec[3])) == whole[n:]
    (tmp_path / "p.csv").write_bytes('key,image,caption\n1,a.jpg,"red, round\nthing"\n\n2,b.jpg,plain\n'
                                     '3,c.jpg,"say ""hi"""\n'.encode())
    whole = list(train.csv_records(str(tmp_path / "p.csv"), "root"))
    assert [(k, i, c) for k, i, c, _, _ in whole] == [
        ("1", os.path.join("root", "a.jpg"), "red, round\nthing"), ("2", os.path.join("root", "b.jpg"), "plain"),
        ("3", os.path.join("root", "c.jpg"), 'say "hi"')]
    for n, rec in enumerate(whole):
        assert list(train.csv_records(str(tmp_path / "p.csv"), "root", rec[3])) == whole[n:]
    assert skipped == dict.fromkeys(train.SKIPS, 0)


def test_the_clip_is_recorded_by_absolute_path_and_compared_by_content(setup, tmp_path, monkeypatch):
    """--clip as typed (a relative path) is recorded absolute, so the checkpoint loads from another folder; a
    resume accepts the same file under another path and refuses another file behind the same path."""
    import shutil
    os.makedirs(tmp_path / "copy")
    shutil.copy(setup / "clip.pt", tmp_path / "c.pt")
    shutil.copy(setup / "clip.pt", tmp_path / "copy" / "c.pt")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    train.main(base_args(setup, out, **{"--clip": "c.pt", "--steps": 1}))
    assert torch.load(out / "ckpt.pt", weights_only=False)["clip"] == str(tmp_path / "c.pt")
    monkeypatch.chdir(setup)
    assert tagalign.load_checkpoint(str(out / "ckpt.pt")).clip.cfg.vision_width == TINY.vision_width
    train.main(base_args(setup, out, **{"--clip": tmp_path / "copy" / "c.pt", "--steps": 2}) + ["--resume"])
    torch.save(random_state_dict(TINY, seed=3), tmp_path / "copy" / "c.pt")
    with pytest.raises(ValueError, match="'clip' differs"):
        train.main(base_args(setup, out, **{"--clip": tmp_path / "copy" / "c.pt", "--steps": 3}) + ["--resume"])


def test_the_step_helpers_never_wait_for_the_gpu():
    """What --sync-debug would catch on a GPU, checked here with fake CUDA tensors (FakeTensorMode, no GPU):
    multi_hot, normalise_and_erase and every tag loss make no host read of a device tensor (an .item(), a
    boolean mask: FakeTensorMode raises on those), no blocking host-to-device copy and no index_put_ with a host
    value (ATen copies that with a blocking copy)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    aten = torch.ops.aten

    class Waits(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.found = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (aten.index_put_.default, aten.index_put.default) and args[2].device.type == "cpu" \
                    and args[0].device.type == "cuda":
                self.found.append(f"{func} with a host value")
            if func is aten._to_copy.default and args[0].device.type == "cpu" and \
                    str(kwargs.get("device", "cpu")).startswith("cuda") and not kwargs.get("non_blocking"):
                self.found.append(f"{func}: a blocking host-to-device copy")
            return func(*args, **kwargs)

    cuda = torch.device("cuda")
    with FakeTensorMode(allow_non_fake_inputs=True):
        with Waits() as waits:
            train.multi_hot(torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3]), 2, 5, cuda)
            images = torch.zeros(2, 3, 16, 16, dtype=torch.uint8, device=cuda)
            train.normalise_and_erase(images, [(1, 2, 4, 5, 7), (0, 0, 0, 0, 8)], None)
            z = torch.randn(2, 8, device=cuda)
            emb, labels = torch.randn(5, 8, device=cuda), torch.zeros(2, 5, device=cuda)
            freq = torch.rand(5).to(cuda, non_blocking=True)
            for kind in tagalign.TAG_LOSSES:
                for average in ("batch", "tagged"):
                    tagalign.tag_loss(z, emb, labels, torch.ones((), device=cuda), kind, freq, average)
        assert waits.found == []
        with Waits() as waits:  # the check itself: the former multi_hot's host 1 is caught
            out = torch.zeros(2, 5, device=cuda)
            out[torch.tensor([0]).to(cuda, non_blocking=True), torch.tensor([1]).to(cuda, non_blocking=True)] = 1
        assert waits.found == ["aten.index_put_.default with a host value"]
