"""
What the parser (parse_tags.py, import_tags.py) and train.py share: the input file lists (globs and
{a..b} braces) and the labels format. The labels format that parse_tags.py (LLM parsing, or the
authors' released tags) writes and train.py reads: vocab.json (the tag names with their
frequencies) and labels.pt, every sample's object and attribute indices in CSR form (offsets and
indices per kind, rows in key order) with the sorted keys. A few bytes a tag: the table for 12 M
samples loads in seconds.

    from labels import LabelTable
    table = LabelTable("tags/labels.pt"); objects, attributes = table.get("000001234")
"""
import contextlib
import glob
import json
import os
import re



@contextlib.contextmanager
def replaced(path, mode="w"):
    """Write `path` through a temporary file that is renamed over it when the block ends without an
    error: a crash leaves the old file (or none), never half a file. Yields the open file."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def expand_braces(pattern):
    """'a/{00000..00002}.tar' -> a/00000.tar a/00001.tar a/00002.tar; '{x,y}' alternatives; nested
    left to right."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        options = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for opt in options for p in expand_braces(head + opt + tail)]


def input_files(patterns):
    """Brace patterns, globs and plain paths (several separated by spaces) -> sorted unique existing
    files."""
    files = []
    for pattern in patterns:
        for p in expand_braces(pattern):
            matched = sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else [p]
            files += matched
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} input file(s) not found, e.g. {missing[:3]}")
    if not files:
        raise FileNotFoundError(f"no input files match {patterns}")
    return list(dict.fromkeys(files))


def save_labels(out_dir, vocab, keys, key_width, offsets, indices):
    """Write vocab.json and labels.pt (each to a temporary file, then renamed: a crash leaves the
    old file, never half a file) and return the labels table. keys: sorted int64 tensor of
    fixed-width digit keys (key_width digits) or one '\\n'-joined string (key_width 0);
    offsets/indices: {kind: int64 / int32 tensor}, CSR rows in key order."""
    with replaced(os.path.join(out_dir, "vocab.json")) as f:
        json.dump(vocab, f, ensure_ascii=False, indent=1)
    table = {"num_samples": vocab["num_samples"], "vocab_size": {},
             "tags": {kind: [e["tag"] for e in vocab[kind]] for kind in ("objects", "attributes")},
             "keys": keys, "key_width": key_width}
    for kind in ("objects", "attributes"):
        table[kind + "_offsets"] = offsets[kind]
        table[kind + "_indices"] = indices[kind]
    # here and in LabelTable: parsing imports this file and does not need torch's ~400 MB
    import torch
    with replaced(os.path.join(out_dir, "labels.pt"), "wb") as f:
        torch.save(table, f)
    return table


def to_tensor(arr, dtype):
    """array.array -> a tensor that owns a copy (torch.frombuffer would share the array's
    memory)."""
    import torch
    return torch.frombuffer(arr, dtype=dtype).clone() if len(arr) else torch.zeros(0, dtype=dtype)


class LabelTable:
    """labels.pt reader for train.py: key -> (object indices, attribute indices), or None for an
    unknown key."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"label file not found: {path}; "
                                    "build it with `parse_tags.py vocab --out DIR`")
        import torch
        t = torch.load(path, map_location="cpu", weights_only=True)
        self.tags = t["tags"]
        self.offsets = {k: t[k + "_offsets"] for k in ("objects", "attributes")}
        self.indices = {k: t[k + "_indices"] for k in ("objects", "attributes")}
        self.numeric = t["key_width"] > 0
        self.searchsorted = torch.searchsorted  # row() runs per sample: no import there
        self.keys = (t["keys"] if self.numeric
                     else {k: i for i, k in enumerate(t["keys"].split("\n"))})

    def __len__(self):
        return len(self.keys)

    def row(self, key):
        if self.numeric:
            if not key.isdigit():
                return None
            q = self.keys.new_tensor([int(key)])
            i = int(self.searchsorted(self.keys, q))
            return i if i < len(self.keys) and self.keys[i] == q[0] else None
        return self.keys.get(key)

    def get(self, key):
        i = self.row(key)
        if i is None:
            return None
        return tuple(self.indices[k][self.offsets[k][i]:self.offsets[k][i + 1]].long()
                     for k in ("objects", "attributes"))
