"""
The parser's files, apart from the parsing itself (parse_tags.py): reading captions from tar shards,
JSONL and CSV/TSV (with the format guessing), the records files (parsed.{i}-of-{n}.jsonl: streamed
reading, appending after a kill, the resume and dedupe state in bounded memory, the settings a shard
was parsed with, one writer per shard), the streaming merge of the shards' records, and the
bad-input reporter.
"""
import csv
import glob
import hashlib
import heapq
import io
import json
import os
import queue
import re
import shutil
import sys
import tarfile
import tempfile
import threading
from array import array
from collections import Counter

import numpy as np

from labels import replaced, save_labels, to_tensor
from tag_rules import normalize_tags, parse_answer, prepare_caption, rules_version


def default_threads():
    """The cores this process may run on (its CPU affinity: taskset, a Slurm/cgroup allocation), not
    the host's count, so that several --shard processes pinned to parts of a host do not
    oversubscribe it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_samples(path, key_column=None, caption_column="caption", has_header=True,
                 quoted_tsv=False):
    """Yield (key, caption) from one file: a webdataset .tar ({key}.txt members), .jsonl, or
    .csv/.tsv. Keys: key_column when given; else a column/field named 'key' when there is one
    (train.py's --data-csv reads that column, so the two programs agree by default); else
    '<file stem>/<row>'. Raises on a corrupt file (the caller reports it)."""
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
                    yield (str(rec[kc]) if kc else f"{stem}/{row}",
                           str(rec.get(caption_column) or ""))
    else:
        tsv = path.endswith(".tsv")
        # A TSV has no quoting (CC12M's cc12m.tsv: url TAB caption): one record per "\n"-ended line,
        # split at tabs and nothing else; the csv module would open a quoted field at a caption's
        # leading '"' (and swallow the rows after it), end a row at a lone '\r', and stop at 131,072
        # characters. quoted_tsv: a TSV written with CSV-style quoting (Python's csv module,
        # pandas), whose fields may hold tabs and newlines.
        plain = tsv and not quoted_tsv
        with open(path, encoding="utf-8", newline="\n" if plain else "") as f:
            if plain:
                reader = (line.rstrip("\n").removesuffix("\r").split("\t") for line in f)
            else:
                reader = csv.reader(f, delimiter="\t" if tsv else ",")
            header = next(reader) if has_header else None

            def column(name):
                if name is None:
                    return None
                if header and name in header:
                    return header.index(name)
                if name.isdigit():
                    return int(name)
                raise ValueError(f"{path}: no column {name!r} (columns: {header}); "
                                 "use --caption-column/--key-column")
            ci = column(caption_column)
            ki = column(key_column or ("key" if header and "key" in header else None))
            for row, fields in enumerate(reader):
                if not fields or fields == [""]:
                    continue
                key = fields[ki] if ki is not None else f"{stem}/{row}"
                yield key, fields[ci] if ci < len(fields) else ""


def shard_samples(files, shard, num_shards, report_bad, **read_kw):
    """The samples of shard i of n: whole files when there are at least n files, else every n-th
    row. A file that fails to read is reported through report_bad(file, error) and skipped."""
    by_file = len(files) >= num_shards
    mine = files[shard::num_shards] if by_file else files
    index = 0
    for path in mine:
        try:
            for key, caption in read_samples(path, **read_kw):
                if by_file or index % num_shards == shard:
                    yield key, caption
                index += 1
        except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError,
                csv.Error, KeyError, ValueError) as e:
            report_bad(path, f"{type(e).__name__}: {e}; skipped from there (the captions before it "
                             "are kept)")


# --------------------------------------------------------------------------------------------------
# Records: resume and dedupe state, settings, one writer per shard

def caption_hash(caption, prepared=False):
    """Identity of a caption for dedupe and resume: a hash of the text the LLM sees."""
    text = caption if prepared else prepare_caption(caption)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


def open_for_append(path):
    """Open a JSONL file (binary) to append after its last complete line: a kill mid-write leaves a
    partial one, found by reading back from the end (never the whole file)."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            keep = 0
            while end > 0:
                start = max(0, end - (1 << 16))
                f.seek(start)
                chunk = f.read(end - start)
                if (i := chunk.rfind(b"\n")) >= 0:
                    keep = start + i + 1
                    break
                end = start
            f.truncate(keep)
    return open(path, "ab")


# CompactMap's newest entries kept in a dict (~6 MB) before they go into the arrays
FOLD_ENTRIES = 1 << 16


class CompactMap:
    """A map from 64-bit ints (hashes) to 64-bit ones in ~16 bytes an entry, where a dict of ints
    costs ~100: two sorted numpy arrays, and a dict of the newest entries folded into them every
    `fold` insertions. It holds the resume and dedupe state of a parse (millions of keys and
    captions) in bounded memory."""

    def __init__(self, fold=None):
        self.keys, self.values, self.recent = np.empty(0, np.uint64), np.empty(0, np.uint64), {}
        self.fold = fold or FOLD_ENTRIES

    def get(self, key, default=None):
        value = self.recent.get(key)
        if value is not None:
            return value
        i = int(np.searchsorted(self.keys, np.uint64(key)))
        return int(self.values[i]) if i < len(self.keys) and self.keys[i] == key else default

    def __setitem__(self, key, value):
        self.recent[key] = value
        if len(self.recent) >= self.fold:
            self._fold()

    def _fold(self):
        keys = np.fromiter(self.recent, np.uint64, len(self.recent))
        values = np.fromiter(self.recent.values(), np.uint64, len(self.recent))
        self.recent = {}
        order = np.argsort(keys)
        keys, values = keys[order], values[order]
        at = np.searchsorted(self.keys, keys)
        old = at < len(self.keys)
        old[old] = self.keys[at[old]] == keys[old]
        self.values[at[old]] = values[old]  # keys already held: new values in place
        new = ~old
        self.keys = np.insert(self.keys, at[new], keys[new])
        self.values = np.insert(self.values, at[new], values[new])


def fingerprint(text):
    """A 64-bit hash of a string as an int (two of 11 M keys share one with probability ~3e-6)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _record(line):
    """A results line -> its record, or None when it is not one (garbage from a crash or two writers
    at once)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("key"), str)
          and isinstance(rec.get("h"), str) and re.fullmatch("[0-9a-f]{1,16}", rec["h"]) is not None
          and ("error" in rec
               or isinstance(rec.get("objects"), list) and isinstance(rec.get("attributes"), list)))
    return rec if ok else None


def read_records(path, offsets=False):
    """Complete records of a JSONL results file, streamed (with each one's byte offset when
    `offsets`). A partial last line (a kill mid-write) is ignored; a damaged line elsewhere (a node
    crash, two processes on one shard) is skipped and named on stderr, so its key counts as not done
    and a resume parses it again, instead of every restart failing on it."""
    if not os.path.exists(path):
        return
    damaged, offset = [], 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.endswith(b"\n"):
                rec = _record(line.decode("utf-8", errors="replace"))
                if rec is None:
                    damaged.append(number)
                else:
                    yield (offset, rec) if offsets else rec
            offset += len(line)
    if damaged:
        print(f"warning: {path}: {len(damaged)} damaged line(s) skipped (e.g. line {damaged[:5]})",
              file=sys.stderr)


def record_at(f, offset):
    """The record whose line starts at `offset` of the binary file f."""
    f.seek(offset)
    return json.loads(f.readline().decode("utf-8", errors="replace"))  # as read_records reads it


class SettingsMismatch(ValueError):
    """Records on disk were made with other settings than this run's."""


def exclusive(path, what):
    """An exclusive lock on the file `path`, held while the returned file stays open (flock:
    released when the process ends, however it ends), so that a second process on the same shard (or
    merge) is refused with one line instead of interleaving its records or deleting the first one's
    files."""
    import fcntl
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"another process is writing {what} (it holds {path}); wait for it, "
                         "or stop it first") from None
    except OSError as e:
        # a file system without flock (some NFS or Lustre mounts): go on, unguarded
        print(f"warning: cannot lock {path} ({e.strerror}): make sure one process writes {what}",
              file=sys.stderr)
    return f


def read_settings(path):
    """A shard's recorded settings, or None when there are none or the file is damaged (said on
    stderr: e.g. zero-filled after a node crash)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        print(f"warning: {path} is damaged; its settings cannot be compared", file=sys.stderr)
        return None
    return saved


def check_settings(path, settings, what):
    """Compare the settings recorded at path with these; write them there when there are none (or
    damaged ones)."""
    saved = read_settings(path)
    if saved is not None:
        changed = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items()
                   if saved.get(k) != v]
        if changed:
            fix = ("run `parse_tags.py rederive` (today's tag rules on the stored answers) first"
                   if [k for k in settings if saved.get(k) != settings[k]] == ["rules"] else
                   f"use another --out, or delete {os.path.dirname(path) or '.'}'s parsed.* files "
                   "to start over")
            raise SettingsMismatch(f"{what} were parsed with other settings "
                                   f"({'; '.join(changed)}); mixing them would give one vocabulary "
                                   f"two meanings: {fix}")
    else:
        with replaced(path) as f:
            json.dump(settings, f, indent=1)


CUT = "answer cut at"


def rederive(samples, out_dir, shard=0, num_shards=1):
    """Today's tag rules applied to the raw answers stored in out_dir/parsed.{shard}-of-{n}.jsonl,
    without a model: each record with a finished raw answer gets the tags parse_answer makes of it
    now (or the reason it fails), grounded in its caption (read again from `samples`, the shard's
    input: records keep only the caption's hash) with the grounding the shard was parsed with.
    Refused, before anything is written, when a record with tags has no raw answer or its caption is
    not in the input (its tags would keep the old rules under the new version). The file is
    rewritten in one piece (a temporary file, then renamed) and its settings take today's rules
    version, so a resume or a merge goes on with them. Memory: the shard's records and the captions
    they need. Returns counts."""
    path = os.path.join(out_dir, f"parsed.{shard}-of-{num_shards}.jsonl")
    settings_path = path[:-len(".jsonl")] + ".settings.json"
    settings = read_settings(settings_path)
    if not os.path.isfile(path) or settings is None:
        raise FileNotFoundError(f"no records with settings at {path}: nothing to rederive")
    records = list(read_records(path))
    answered = lambda rec: rec.get("raw") and CUT not in rec.get("error", "")
    needed = {r["h"] for r in records if answered(r)}
    texts = {}
    for _, caption in samples:
        text = prepare_caption(caption)
        h = caption_hash(text, prepared=True)
        if h in needed:
            texts[h] = text
    stale = [r["key"] for r in records
             if (r.get("objects") or r.get("attributes")) and not r.get("raw")]
    lost = [r["key"] for r in records if answered(r) and r["h"] not in texts]
    if stale or lost:
        raise ValueError(f"{path}: {len(stale)} record(s) with tags but no raw answer "
                         f"(e.g. {stale[:3]}) and {len(lost)} whose caption is not in the input "
                         f"(e.g. {lost[:3]}); pass the parse's --input, reading flags and --shard, "
                         "or parse those again")
    stats = Counter(records=len(records))
    with replaced(path) as out:
        for rec in records:
            if answered(rec):
                try:
                    objects, attributes = parse_answer(rec["raw"], texts[rec["h"]],
                                                       settings["grounding"])
                    new = {"key": rec["key"], "h": rec["h"], "objects": objects,
                           "attributes": attributes, "raw": rec["raw"]}
                except ValueError as e:
                    new = {"key": rec["key"], "h": rec["h"], "error": f"after retry: {e}",
                           "raw": rec["raw"]}
                stats["changed"] += new != rec
                rec = new
            else:
                stats["kept"] += 1  # no answer to read again: an empty caption, a cut answer
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with replaced(settings_path) as f:
        json.dump({**settings, "rules": rules_version()}, f, indent=1)
    return dict(stats)


def prefetched(items, size=4096):
    """items, read ahead by a background thread (reading and splitting the input overlaps
    llama_decode, which releases the GIL); the reader's exception is raised here, in its place.
    Closing the generator stops it."""
    ahead, stop, end = queue.Queue(size), threading.Event(), object()

    def put(item):
        while not stop.is_set():
            try:
                return ahead.put(item, timeout=0.1)
            except queue.Full:
                continue

    def read():
        try:
            for item in items:
                put((item, None))
                if stop.is_set():
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            put((None, e))
        put((end, None))

    threading.Thread(target=read, daemon=True).start()
    try:
        while True:
            item, error = ahead.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


# --------------------------------------------------------------------------------------------------
# Merging the shards' records

# Streaming merge: sorted runs of at most this many records on disk, then a k-way merge. Peak memory
# is one run (~0.3 KB a record) whatever the number of records.
MERGE_RUN_RECORDS = 500_000


def _sort_line(line):
    """A record line -> 'escaped key TAB flag TAB line': plain string order is then key order (the
    escaped key has no control characters, so TAB ends it below any character), with a success (0)
    before a failure (1)."""
    rec = _record(line)
    if rec is None:
        return None
    return f"{json.dumps(rec['key'], ensure_ascii=False)}\t{int('error' in rec)}\t{line}"


def merge(out_dir, run_records=MERGE_RUN_RECORDS):
    """Combine parsed.*-of-*.jsonl into parsed.jsonl: one record per key (a success beats a
    failure), sorted by key. Streams: sorted runs of run_records records go to temporary files, then
    a k-way merge writes the result, so memory does not grow with the number of records."""
    shards = sorted(glob.glob(os.path.join(out_dir, "parsed.*-of-*.jsonl")))
    if not shards:
        raise FileNotFoundError(f"no parsed.*-of-*.jsonl in {out_dir}; "
                                "run `parse_tags.py parse` first")
    counts = {int(re.search(r"-of-(\d+)\.jsonl$", s).group(1)) for s in shards}
    if len(counts) > 1:
        raise ValueError(f"{out_dir} mixes shard counts {sorted(counts)}; keep the files of one "
                         "--shard i/n split")
    n = counts.pop()
    missing = [i for i in range(n)
               if not os.path.exists(os.path.join(out_dir, f"parsed.{i}-of-{n}.jsonl"))]
    if missing:
        print(f"warning: shards {missing} of {n} have no output yet; merging the others",
              file=sys.stderr)
    unfinished = [i for i in range(n) if i not in missing
                  and not os.path.exists(os.path.join(out_dir, f"parsed.{i}-of-{n}.done.json"))]
    if unfinished:
        print(f"warning: shards {unfinished[:20]} of {n} have not finished their input "
              f"(no parsed.i-of-{n}.done.json): their samples so far are merged, the rest get "
              "no row (train.py skips them as unlisted); rerun those shards (they resume) and "
              "merge again", file=sys.stderr)
    errors = [e for e in glob.glob(os.path.join(out_dir, f"errors.*-of-{n}.jsonl"))
              if os.path.getsize(e)]
    if errors:
        print("warning: input files could not be read (their samples get no row): "
              f"see {', '.join(sorted(errors))}", file=sys.stderr)
    recorded = {i: read_settings(os.path.join(out_dir, f"parsed.{i}-of-{n}.settings.json"))
                for i in range(n)}
    recorded = {i: v for i, v in recorded.items() if v is not None}
    if len({json.dumps(v, sort_keys=True) for v in recorded.values()}) > 1:
        first = min(recorded)
        other = next(i for i in sorted(recorded) if recorded[i] != recorded[first])
        raise SettingsMismatch(f"shards {first} and {other} of {out_dir} were parsed with other "
                               f"settings ({recorded[first]} vs {recorded[other]}); parse them "
                               "again with the same model, chat format and flags")
    path = os.path.join(out_dir, "parsed.jsonl")
    with exclusive(os.path.join(out_dir, "merge.lock"), f"{out_dir}/parsed.jsonl"):
        # a merge killed with -9 left its runs
        for stale in glob.glob(os.path.join(out_dir, ".merge-*")):
            shutil.rmtree(stale, ignore_errors=True)
        stats = _merge_runs(shards, path, out_dir, run_records)
    return {**stats, "missing_shards": missing, "unfinished_shards": unfinished}


def _merge_runs(shards, path, out_dir, run_records):
    """merge's work: sorted runs in a temporary folder, then the k-way merge into path."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".merge-") as tmp:
        runs, chunk = [], []

        def spill():
            chunk.sort()
            runs.append(os.path.join(tmp, f"run{len(runs)}"))
            with open(runs[-1], "w", encoding="utf-8") as f:
                f.writelines(chunk)
            chunk.clear()

        damaged = 0
        for s in shards:
            with open(s, encoding="utf-8", errors="replace") as f:
                for line in f:
                    # a partial last line (a kill mid-write) is not a record
                    if line.endswith("\n"):
                        sortable = _sort_line(line[:-1])
                        # a damaged line: skipped, counted (a resume parses its key again)
                        if sortable is None:
                            damaged += 1
                            continue
                        chunk.append(sortable + "\n")
                        if len(chunk) >= run_records:
                            spill()
        if damaged:
            print(f"warning: {damaged} damaged line(s) in the shard files skipped; a resume of "
                  "their shards parses those keys again (if one already ran, nothing is missing)",
                  file=sys.stderr)
        if chunk or not runs:
            spill()
        files = [open(r, encoding="utf-8") for r in runs]
        records = failed = 0
        try:
            with replaced(path) as out:
                last = None
                for line in heapq.merge(*files):
                    key, flag, record = line.split("\t", 2)
                    if key == last:
                        continue
                    last = key
                    out.write(record)
                    records += 1
                    failed += flag == "1"
        finally:
            for f in files:
                f.close()
    return {"records": records, "failed": failed, "shards": len(shards), "damaged_lines": damaged}


# --------------------------------------------------------------------------------------------------
# Input accounting for the command line

def count_samples(files):
    """Total for the progress bar when it is cheap: lines of CSV/JSONL, img2dataset's *_stats.json
    for tars."""
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


def bad_file_reporter(errors_path):
    """report_bad(path, error) for the readers: a line on stderr and a JSONL record in errors_path.
    A run reads all its input again, so the file starts empty: it lists this run's unreadable
    files."""
    if os.path.exists(errors_path):
        os.remove(errors_path)

    def report_bad(path, error):
        print(f"\nbad input file: {path}: {error}", file=sys.stderr)
        with open(errors_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"file": path, "error": error}) + "\n")
    return report_bad


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
