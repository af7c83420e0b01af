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
import glob
import io
import json
import os
import re
import sys
from array import array
from collections import Counter

from parse_io import read_records
from tag_rules import normalize_tags



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
    # here and in LabelTable: parsing imports this file and does not need torch's ~400 MB
    import torch
    path = os.path.join(out_dir, "labels.pt")
    torch.save(table, path + ".tmp")
    os.replace(path + ".tmp", path)
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
        self.keys = (t["keys"] if self.numeric
                     else {k: i for i, k in enumerate(t["keys"].split("\n"))})

    def __len__(self):
        return len(self.keys)

    def row(self, key):
        if self.numeric:
            if not key.isdigit():
                return None
            import torch
            q = torch.tensor([int(key)])
            i = int(torch.searchsorted(self.keys, q))
            return i if i < len(self.keys) and self.keys[i] == q[0] else None
        return self.keys.get(key)

    def get(self, key):
        i = self.row(key)
        if i is None:
            return None
        return tuple(self.indices[k][self.offsets[k][i]:self.offsets[k][i + 1]].long()
                     for k in ("objects", "attributes"))


# --------------------------------------------------------------------------------------------------
# Vocabulary and labels

def read_tag_list(path):
    """A tag list, one tag a line (e.g. Tag2Text's 4,585 tags), for `vocab --restrict-to`: each
    entry as normalize_tags makes an object and an attribute of it (lower case, articles dropped,
    the last word singular, a leading describing word split off), so that it names the parsed tags
    the way the parser would.
    Returns {entry: the normalised tags it allows}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--restrict-to {path} not found (one tag a line)")
    with open(path, encoding="utf-8") as f:
        entries = [line.strip() for line in f if line.strip()]
    tags = {}
    for entry in entries:
        objects, attributes = normalize_tags([entry], [entry])
        tags[entry] = set(objects) | set(attributes)
    if not any(tags.values()):
        raise ValueError(f"--restrict-to {path} holds no tag")
    return tags


def build_vocab(out_dir, num_objects=10000, num_attributes=10000, restrict_to=None):
    """Top-K objects and attributes by the number of samples that have them (ties alphabetical) ->
    vocab.json; per-sample label indices -> labels.pt. Failed samples are kept with no tags
    (train.py still uses them for the contrastive loss). restrict_to: a tag list file
    (read_tag_list); only tags on it are candidates (paper Table 4's Tag2Text rows). Streams
    parsed.jsonl twice (counts, then indices into compact arrays), so memory is the vocabulary plus
    a few bytes a tag, not Python objects per record."""
    import torch  # here, not at the top: parsing (the LLM loop) does not need torch's ~400 MB
    listed = read_tag_list(restrict_to) if restrict_to else None
    allowed = set().union(*listed.values()) if listed else None
    path = os.path.join(out_dir, "parsed.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no records in {path}; run `parse_tags.py merge` first")
    counts = {"objects": Counter(), "attributes": Counter()}
    n, width, numeric, last = 0, None, True, None
    objects, attributes = counts["objects"], counts["attributes"]
    for rec in read_records(path):
        key = rec["key"]
        # merge's order is that of the JSON-escaped keys; it equals plain string order unless a key
        # holds a quote, backslash or control character, so the escaped forms are compared only when
        # plain order fails
        if last is not None and key <= last and \
                json.dumps(key, ensure_ascii=False) <= json.dumps(last, ensure_ascii=False):
            raise ValueError(f"{path} is not sorted by key with unique keys (at {key!r}); "
                             "rebuild it with `parse_tags.py merge`")
        last = key
        if numeric:
            numeric = key.isdigit() and (width is None or len(key) == width)
            width = len(key) if width is None else width
        n += 1
        objects.update(set(rec.get("objects", ())))
        attributes.update(set(rec.get("attributes", ())))
    if n == 0:
        raise FileNotFoundError(f"no records in {path}; run `parse_tags.py merge` first")
    vocab = {}
    for kind, k in (("objects", num_objects), ("attributes", num_attributes)):
        candidates = [kv for kv in counts[kind].items() if allowed is None or kv[0] in allowed]
        top = sorted(candidates, key=lambda kv: (-kv[1], kv[0]))[:k]
        vocab[kind] = [{"tag": t, "count": c, "freq": c / n} for t, c in top]
    vocab["num_samples"] = n
    if listed:  # which list, and how much of it the parsed tags use (a list that misses says so)
        used = {e["tag"] for kind in ("objects", "attributes") for e in vocab[kind]}
        vocab["restricted_to"] = {"file": os.path.abspath(restrict_to), "entries": len(listed),
                                  "entries_used": sum(bool(t & used) for t in listed.values())}
        print(f"--restrict-to {restrict_to}: {vocab['restricted_to']['entries_used']:,} of "
              f"{len(listed):,} entries are among the tags kept", file=sys.stderr)
    del counts

    # img2dataset keys are fixed-width digits (strings sort as the numbers do): an int64 tensor
    # (searchsorted) instead of 12 M Python strings
    index = {kind: {e["tag"]: i for i, e in enumerate(vocab[kind])}
             for kind in ("objects", "attributes")}
    offsets = {kind: array("q", [0]) for kind in index}
    indices = {kind: array("i") for kind in index}
    int_keys, str_keys = array("q"), io.StringIO()
    kinds = [(index[kind], indices[kind], offsets[kind], kind) for kind in index]
    ends = {kind: 0 for kind in index}
    for i, rec in enumerate(read_records(path)):
        if numeric:
            int_keys.append(int(rec["key"]))
        else:
            str_keys.write(("\n" if i else "") + rec["key"])
        for lookup, idx, offs, kind in kinds:
            ids = [lookup[t] for t in rec.get(kind, ()) if t in lookup]
            idx.extend(ids)
            ends[kind] += len(ids)
            offs.append(ends[kind])
    keys = to_tensor(int_keys, torch.int64) if numeric else str_keys.getvalue()
    table = save_labels(out_dir, vocab, keys, width if numeric else 0,
                        {kind: to_tensor(offsets[kind], torch.int64) for kind in index},
                        {kind: to_tensor(indices[kind], torch.int32) for kind in index})
    return {"samples": n, "objects": len(vocab["objects"]), "attributes": len(vocab["attributes"]),
            "samples_with_objects": int((table["objects_offsets"].diff() > 0).sum())}
