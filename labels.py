"""
The labels format that parse_tags.py (LLM parsing, or the authors' released tags) writes and train.py reads:
vocab.json (the tag names with their frequencies) and labels.pt, every sample's object and attribute indices in
CSR form (offsets and indices per kind, rows in key order) with the sorted keys. A few bytes a tag: the table for
12 M samples loads in seconds.

    from labels import LabelTable
    table = LabelTable("tags/labels.pt"); objects, attributes = table.get("000001234")
"""
import json
import os

import torch


def save_labels(out_dir, vocab, keys, key_width, offsets, indices):
    """Write vocab.json and labels.pt (each to a temporary file, then renamed: a crash leaves the old file, never
    half a file) and return the labels table. keys: sorted int64 tensor of fixed-width digit keys (key_width
    digits) or one '\\n'-joined string (key_width 0); offsets/indices: {kind: int64 / int32 tensor}, CSR rows in
    key order."""
    path = os.path.join(out_dir, "vocab.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)
    table = {"num_samples": vocab["num_samples"], "vocab_size": {},
             "tags": {kind: [e["tag"] for e in vocab[kind]] for kind in ("objects", "attributes")},
             "keys": keys, "key_width": key_width}
    for kind in ("objects", "attributes"):
        table[kind + "_offsets"] = offsets[kind]
        table[kind + "_indices"] = indices[kind]
    path = os.path.join(out_dir, "labels.pt")
    torch.save(table, path + ".tmp")
    os.replace(path + ".tmp", path)
    return table


def to_tensor(arr, dtype):
    """array.array -> a tensor that owns a copy (torch.frombuffer would share the array's memory)."""
    return torch.frombuffer(arr, dtype=dtype).clone() if len(arr) else torch.zeros(0, dtype=dtype)


class LabelTable:
    """labels.pt reader for train.py: key -> (object indices, attribute indices), or None for an unknown key."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"label file not found: {path}; build it with `parse_tags.py vocab --out DIR`")
        t = torch.load(path, map_location="cpu", weights_only=True)
        self.tags = t["tags"]
        self.offsets = {k: t[k + "_offsets"] for k in ("objects", "attributes")}
        self.indices = {k: t[k + "_indices"] for k in ("objects", "attributes")}
        self.numeric = t["key_width"] > 0
        self.keys = t["keys"] if self.numeric else {k: i for i, k in enumerate(t["keys"].split("\n"))}

    def __len__(self):
        return len(self.keys)

    def row(self, key):
        if self.numeric:
            if not key.isdigit():
                return None
            q = torch.tensor([int(key)])
            i = int(torch.searchsorted(self.keys, q))
            return i if i < len(self.keys) and self.keys[i] == q[0] else None
        return self.keys.get(key)

    def get(self, key):
        i = self.row(key)
        if i is None:
            return None
        return tuple(self.indices[k][self.offsets[k][i]:self.offsets[k][i + 1]].long() for k in ("objects", "attributes"))
