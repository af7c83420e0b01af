"""
The authors' released CC12M object tags -> vocab.json + labels.pt for train.py, without parsing
anything: each img2dataset shard sample's URL (from its .json member or the shard's .parquet) is
looked up in the released index, and the URL's tag indices become the sample's object labels (in
the released list's order). Writes errors.import.jsonl too (unreadable shards, .json members and
parquet files). The CSV's reading and the index's numbering are checked against each other
(--tags-header, --tag-column, --index-base settle what the files leave open).

Run:
    python import_tags.py --tags object_list.csv --index CC12M_url_object_index.json \
        --shards 'cc12m/{00000..01242}.tar' --out tags/
    (also reachable as `python parse_tags.py import ...` with the same flags)
"""
import argparse
import csv
import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import tarfile
from array import array
from collections import Counter

import numpy as np
from tqdm import tqdm

from labels import input_files, save_labels
from parse_io import bad_file_reporter, default_threads


# First-row words that mark a header in a one-column tag list (with several columns, a non-number
# above a column of numbers marks it too); --tags-header yes/no decides when a real list starts
# with one of these words.
TAG_HEADER_WORDS = {"name", "names", "tag", "tags", "tag_name", "object", "objects", "object_name",
                    "label", "labels", "class", "classes", "class_name", "category", "categories",
                    "text", "word", "words", "noun"}
# Header words of an id column (with no header, any increasing integer column from
# 0 or 1 is read as ids).
ID_HEADER_WORDS = {"id", "ids", "index", "idx", "tag_id", "tag_index", "object_id", "label_id",
                   "class_id", "#", "no"}
INDEX_CHUNK = 1 << 20       # bytes of the URL index read at a time
# an index entry ("url": [tag indices]) this long is not an entry: malformed input
MAX_INDEX_ENTRY = 1 << 20
# index entries hashed and looked up together (numpy, not per-entry Python)
IMPORT_BATCH = 1 << 16
# a larger share of index entries with tag indices outside the CSV: mismatched files
MAX_OUT_OF_RANGE = 0.01
_SPACE = re.compile(rb"[ \t\r\n]*")
# One entry of the index's top-level object and the separator after it: "url": [int, ...] then ","
# or "}". JSON's grammar: a string without raw control characters (escapes are decoded afterwards by
# json; the bytes are not checked to be UTF-8: a URL is matched as bytes) and a list of JSON
# integers (no "+1", "01", "1_0" or "1.0", all of which Python's int() or float() would accept).
_WS = rb"[ \t\r\n]*"
_JSON_INT = rb"-?(?:0|[1-9][0-9]*)"
_INDEX_ENTRY = re.compile(_WS + rb'"([^"\\\x00-\x1f]*(?:\\.[^"\\\x00-\x1f]*)*)"' + _WS + rb":" +
                          _WS + rb"\[(" + _WS + rb"(?:" + _JSON_INT + _WS + rb"(?:," + _WS +
                          _JSON_INT + _WS + rb")*)?)\]" + _WS + rb"([,}])")


def _is_int(text):
    return re.fullmatch(r"\s*[+-]?\d+\s*", text) is not None


def _preview(cells, n=6):
    """A list for an error message, cut to its first n items (a one-line list of
    4,585 tags is no message)."""
    shown = ", ".join(repr(c[:40] if isinstance(c, str) else c) for c in cells[:n])
    return f"[{shown}{f', ... ({len(cells):,} in all)' if len(cells) > n else ''}]"


def read_tag_names(path, column=None, header="auto"):
    """object_list.csv -> (tag names in index order, {how the file was read}). The row position
    (after any header) is the tag index: the authors' code sets label[indices] = 1 in a K-vector
    whose rows follow this list, so the index's tag indices are 0-based row numbers. Tolerant of the
    shape: comma, tab or semicolon separated, a header row or none (header='auto' decides;
    'yes'/'no' say), one column or several; the names are the one column that is not all integers
    (or `column`: a header name or a 0-based number). What would put a name at the wrong index is
    refused rather than guessed: an integer column that numbers the rows in another order or skips a
    number, a row with more cells than the others (an unquoted comma in a name), a blank name."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start:,}); convert it, "
                         f"e.g. iconv -f latin1 -t utf-8 {path} > tags.utf8.csv") from None
    try:
        delimiter = csv.Sniffer().sniff(text[:65536], delimiters=",\t;").delimiter
    except csv.Error:  # one column: nothing to sniff
        delimiter = "\t" if path.endswith(".tsv") else ","
    rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()
    if not rows:
        raise ValueError(f"{path}: no rows; expected the tag names, one per row in index order")
    width = max(len(r) for r in rows)
    if len(rows) == 1 and width > 2:
        raise ValueError(f"{path}: one row of {width:,} columns {_preview(rows[0])}; expected one "
                         "tag per row (the row is the tag index): write the names one per line")
    rows = [r + [""] * (width - len(r)) for r in rows]
    below = rows[1:] or rows

    def all_ints(col, rs):
        return all(_is_int(r[col]) for r in rs)

    if header == "auto":
        first = [cell.strip().lower() for cell in rows[0]]
        has_header = (len(rows) > 1 and any(all_ints(c, below) and not _is_int(rows[0][c])
                                            for c in range(width))
                      or (column is not None and not str(column).isdigit()
                          and str(column).strip().lower() in first)
                      or any(cell in TAG_HEADER_WORDS for cell in first))
    else:
        has_header = header == "yes"
    names_row = rows[0] if has_header else None
    data = rows[1:] if has_header else rows
    if not data:
        raise ValueError(f"{path}: only a header row {_preview(rows[0])}; "
                         "expected the tag names below it")
    # cells up to the last non-empty one: a data row with more than most data rows (and than the
    # header names) is a name cut in two by an unquoted comma (then --tag-column would quietly keep
    # half of it) or a stray cell
    used = [max((i + 1 for i, cell in enumerate(r) if cell.strip()), default=0) for r in rows]
    allowed = max(Counter(used[has_header:]).most_common(1)[0][0], used[0] if has_header else 0)
    longer = [i for i in range(has_header, len(rows)) if used[i] > allowed]
    if longer:
        raise ValueError(f"{path}: {len(longer):,} row(s) have more cells than the {allowed} of "
                         f"most rows{' and the header' if has_header else ''}, e.g. line "
                         f"{longer[0] + 1} {_preview(rows[longer[0]])}: a name holding an unquoted "
                         f"{delimiter!r}? quote such names (\"salt, pepper\"), remove the stray "
                         "cells, or give the extra column a header")
    shape = f"{len(rows):,} rows of {width} column(s), first row {_preview(rows[0])}"
    header_names = [cell.strip().lower() for cell in names_row] if names_row else []
    if column is not None:
        if str(column).isdigit() and int(column) < width:
            col = int(column)
        elif str(column).strip().lower() in header_names:  # a header name, in any case
            col = header_names.index(str(column).strip().lower())
        else:
            raise ValueError(f"{path}: no column {column!r} ({shape}); give --tag-column a header "
                             "name or a 0-based column number")
    else:
        text_cols = [c for c in range(width)
                     if not all_ints(c, data) and any(r[c].strip() for r in data)]
        named = [c for c in text_cols
                 if names_row and names_row[c].strip().lower() in TAG_HEADER_WORDS]
        # several text columns: the one whose header names it
        if len(text_cols) > 1 and len(named) == 1:
            text_cols = named
        if len(text_cols) != 1:
            what = ("no column of names (every column is integers)" if not text_cols else
                    f"several text columns {_preview(text_cols)}, " +
                    (f"{len(named)} of them named like a tag column "
                     f"({', '.join(names_row[c] for c in named)})"
                     if named else "none of them named like a tag column"))
            raise ValueError(f"{path}: {what} ({shape}); say which with --tag-column NAME|NUMBER")
        col = text_cols[0]
    K = len(data)
    for c in range(width):
        if c != col and all_ints(c, data):
            numbers = [int(r[c]) for r in data]
            if sorted(numbers) in (list(range(K)), list(range(1, K + 1))):
                if numbers != sorted(numbers):
                    raise ValueError(f"{path}: column {c} numbers the tags in another order than "
                                     "the rows; the row order is the tag index here, so sort the "
                                     "file by that column first")
            elif (numbers[0] in (0, 1) and all(a < b for a, b in zip(numbers, numbers[1:]))
                  and numbers[-1] < 2 * K
                  and (not names_row or names_row[c].strip().lower() in ID_HEADER_WORDS)):
                # ids with a gap
                i = next(i for i in range(1, K) if numbers[i] != numbers[0] + i)
                raise ValueError(f"{path}: column {c} looks like tag ids but skips from "
                                 f"{numbers[i - 1]} to {numbers[i]} (line {i + 1 + has_header}); "
                                 f"the row position is the tag index here, so every later tag "
                                 f"would be read one or more places off: put a "
                                 "placeholder row (e.g. unused_N) where each id is missing (if the "
                                 "column is no ids, a header row naming it, e.g. count, and "
                                 "--tags-header yes say so)")
    names = [r[col].strip() for r in data]
    for i, name in enumerate(names):
        if not name:
            raise ValueError(f"{path}: line {i + 1 + has_header} has no tag name in column {col}; "
                             "every row is one tag index, so a blank one would shift every "
                             "later tag")
    info = {"file": path, "tags": K, "column": col, "header": names_row,
            "duplicate_names": K - len(set(names))}
    return names, info


def read_url_index(path, chunk_size=INDEX_CHUNK):
    """Yield (URL as UTF-8 bytes, [tag indices]) from a JSON object {"url": [int, ...], ...},
    reading chunk_size bytes at a time: memory is one chunk plus one entry, whatever the file's size
    (the released index has ~10 M URLs). Any whitespace, escapes in the URLs (decoded as JSON does)
    and an empty object are fine; anything else raises ValueError naming the byte offset."""
    with open(path, "rb") as f:
        buf, pos, base, eof = b"", 0, 0, False  # base: the file offset of buf[0]

        def refill():
            nonlocal buf, pos, base, eof
            chunk = f.read(chunk_size)
            eof = not chunk
            base += pos
            buf, pos = buf[pos:] + chunk, 0

        def peek():  # the next non-space byte (b"" at the end of the file); pos moves onto it
            nonlocal pos
            while True:
                pos = _SPACE.match(buf, pos).end()
                if pos < len(buf) or eof:
                    return buf[pos:pos + 1]
                refill()

        def fail(what):
            near = buf[pos:pos + 60].decode("utf-8", errors="replace")
            raise ValueError(f"{path}: byte {base + pos}: {what} (near {near!r}); expected one "
                             'JSON object {"image url": [tag index, ...], ...} as in the released '
                             'CC12M_url_object_index.json')

        refill()
        # enough bytes to see a byte-order mark, whatever the chunk size
        while len(buf) < 3 and not eof:
            refill()  # pos is 0 here: appends
        if buf.startswith(b"\xef\xbb\xbf"):
            pos = 3
        if peek() != b"{":
            fail("not a JSON object")
        pos += 1
        if peek() == b"}":
            pos += 1
        else:
            while True:
                m = _INDEX_ENTRY.match(buf, pos)
                if m is None:
                    if not eof and len(buf) - pos < MAX_INDEX_ENTRY:
                        refill()  # the entry continues in the next chunk
                        continue
                    pos = _SPACE.match(buf, pos).end()
                    fail('expected "url": [integers] followed by , or }')
                url, ids = m.group(1), m.group(2)
                try:
                    if b"\\" in url:
                        url = json.loads(b'"' + url + b'"').encode("utf-8", "surrogatepass")
                    ids = [int(x) for x in ids.split(b",")] if ids.strip() else []
                except ValueError:  # json.JSONDecodeError is one
                    pos = _SPACE.match(buf, pos).end()
                    fail("a bad escape in the URL or a tag index that is not an integer")
                pos = m.end()
                yield url, ids
                if m.group(3) == b"}":
                    break
        if peek() != b"":
            fail("more data after the end of the object")


def url_hash(url):
    """64-bit identity of a URL (UTF-8 bytes): 8 bytes in numpy arrays instead of a Python string
    per URL. A collision between two of 10 M URLs has probability ~3e-6."""
    return hashlib.blake2b(url, digest_size=8).digest()


def read_parquet_metadata(parquet):
    """img2dataset's `{shard}.parquet` -> (keys, urls, statuses or None), one
    columnar read (pyarrow)."""
    import pyarrow.parquet as pq
    names = pq.read_schema(parquet).names
    if "key" not in names or "url" not in names:
        raise ValueError(f"no 'key' and 'url' columns (columns: {names})")
    table = pq.read_table(parquet,
                          columns=[c for c in ("key", "url", "status") if c in names]).to_pydict()
    return table["key"], table["url"], table.get("status")


# shard_metadata's status of a sample whose .json member cannot be parsed
UNREADABLE = "unreadable .json"


def parquet_disagrees(path, keys, urls):
    """Why img2dataset's parquet (keys, urls) does not describe the tar at path (its first
    .json member's key and URL; a re-keyed or re-sharded download can leave old parquet files
    beside new tars), or None."""
    try:
        with tarfile.open(path) as tar:
            first = next((m for m in tar if m.isfile() and m.name.lower().endswith(".json")), None)
            meta = json.loads(tar.extractfile(first).read()) if first else None
    except (tarfile.TarError, OSError, EOFError, ValueError):
        # nothing to compare with: the parquet is all there is
        # (the tar's damage is train.py's to find)
        return None
    if not isinstance(meta, dict) or not meta.get("url"):
        return None
    key = first.name.rpartition(".")[0]
    try:
        listed = urls[keys.index(key)]
    except ValueError:
        return f"it does not list the tar's first sample {key}"
    return (None if listed == meta["url"] else
            f"sample {key}: {meta['url'][:80]!r} in the tar, {listed!r:.80} in it")


def shard_metadata(path, warn=lambda file, message: print(f"{file}: {message}", file=sys.stderr)):
    """Yield (key, url or None, status or None) for each sample of an img2dataset shard, without
    reading images: from `{shard}.parquet` beside `{shard}.tar` when pyarrow is installed (one
    columnar read) and it describes that tar (its first sample checked), else from the tar's
    `{key}.json` members (other members are skipped by a seek). A parquet file that cannot be read
    or describes another tar is reported through warn(file, message) and the tar is read instead.
    Also yields (key, False, None) once for a key that has members but no .json (no URL to match)
    and (key, None, UNREADABLE) for a .json member that is not JSON (the rest of the shard is still
    read; one warning per shard). Raises on a corrupt shard after yielding what it could read."""
    parquet = path[:-4] + ".parquet"
    if path.endswith(".tar") and os.path.isfile(parquet) and importlib.util.find_spec("pyarrow"):
        try:
            keys, urls, statuses = read_parquet_metadata(parquet)
        except Exception as e:  # pyarrow's errors are OSError, ValueError or its own ArrowException
            warn(parquet, f"unreadable ({type(e).__name__}: {str(e)[:200]}); the URLs were read "
                 f"from the .json members of {os.path.basename(path)} instead")
        else:
            stale = parquet_disagrees(path, keys, urls)
            if stale is None:
                yield from zip(keys, urls, statuses or [None] * len(keys))
                return
            warn(parquet, f"does not describe {os.path.basename(path)} ({stale}); the URLs were "
                 "read from the tar's .json members instead")
    bad = []
    try:
        with tarfile.open(path) as tar:  # random access: members that are not read are seeked over
            others, metadata = set(), set()
            for member in tar:
                if not member.isfile():
                    continue
                # train.py's key: the member name without its extension
                key, _, ext = member.name.rpartition(".")
                if ext.lower() != "json":
                    others.add(key)
                    continue
                metadata.add(key)
                try:
                    meta = json.loads(tar.extractfile(member).read())
                except ValueError as e:
                    # JSONDecodeError, UnicodeDecodeError: this sample has no URL, go on
                    bad.append(f"{member.name}: {type(e).__name__}: {str(e)[:100]}")
                    yield key, None, UNREADABLE
                    continue
                yield key, meta.get("url") if isinstance(meta, dict) else None, \
                    meta.get("status") if isinstance(meta, dict) else None
            for key in sorted(others - metadata):
                yield key, False, None
    finally:
        if bad:
            warn(path, f"{len(bad):,} unreadable .json member(s), e.g. {bad[0]}; those samples "
                 "have no URL (no tags)")


def _shard_urls(path):
    """One shard's samples for read_shard_urls (a worker process's job): (path, keys, their
    URLs' url_hash, which keys have a URL (one byte each), counts, error message or None, (file,
    warning) pairs). Samples whose status is not success (the parquet lists failed downloads
    too) are not samples. On a read error, what was read before it is kept (train.py reads that
    much of the shard too)."""
    keys, hashes, with_url, counts, error, warnings = ([], bytearray(), bytearray(), Counter(),
                                                       None, [])
    try:
        for key, url, status in shard_metadata(path, lambda *w: warnings.append(w)):
            if url is False:
                counts["without_metadata"] += 1
            elif status not in (None, "success", UNREADABLE):
                counts["not_success"] += 1
            else:
                keys.append(str(key))
                with_url.append(bool(url))
                if url:
                    hashes += url_hash(str(url).encode("utf-8", "surrogatepass"))
                else:  # a sample train.py reads, with no URL to match: no tags
                    counts["unreadable_metadata" if status == UNREADABLE else "without_url"] += 1
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError,
            ValueError) as e:
        error = f"{type(e).__name__}: {e}; the {len(keys):,} samples read before it are kept"
    counts["parquet_not_used"] += sum(file.endswith(".parquet") for file, _ in warnings)
    return path, keys, bytes(hashes), bytes(with_url), counts, error, warnings


def read_shard_urls(files, report_bad, workers=1):
    """The shards' samples, in file order: (keys, key_width, hashes, rows, counts). keys: int64
    array when every key is fixed-width digits (img2dataset's; key_width digits), else a list of str
    (key_width 0); hashes/rows: url_hash of each sample's URL and its position in keys (samples
    without a URL have none). workers > 1 reads that many shards at a time in worker processes
    (tarfile's header parsing is the cost: ~20k samples/s a core). A shard that fails to read, or
    its parquet file, is reported through report_bad(file, error)."""
    int_keys, str_keys, width = array("q"), None, None
    hashes, rows = bytearray(), []
    counts = Counter(not_success=0, without_url=0, without_metadata=0, unreadable_metadata=0,
                     bad_shards=0, parquet_not_used=0)
    pool = None
    if workers > 1 and len(files) > 1:
        import multiprocessing
        pool = multiprocessing.get_context().Pool(min(workers, len(files)))
    try:
        # (no bar when stderr is not a terminal)
        for path, keys, shard_hashes, with_url, shard_counts, error, warnings in \
                tqdm(pool.imap(_shard_urls, files) if pool else map(_shard_urls, files),
                     total=len(files), desc="shard metadata", unit="shard", disable=None):
            for parquet, message in warnings:
                report_bad(parquet, message)
            if error:
                counts["bad_shards"] += 1
                report_bad(path, error)
            counts.update(shard_counts)
            first = len(int_keys) if str_keys is None else len(str_keys)
            for key in keys:
                if str_keys is None:
                    width = len(key) if width is None else width
                    if key.isdigit() and len(key) == width:
                        int_keys.append(int(key))
                        continue
                    # not img2dataset's keys: strings from here on, as build_vocab does
                    str_keys, int_keys = [str(k).zfill(width) for k in int_keys], None
                str_keys.append(key)
            hashes += shard_hashes
            rows.append(np.flatnonzero(np.frombuffer(with_url, dtype=np.uint8)) + first)
    finally:
        if pool:
            pool.terminate()
    keys, width = ((np.frombuffer(int_keys, dtype=np.int64), width or 0) if str_keys is None
                   else (str_keys, 0))
    rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return keys, width, np.frombuffer(hashes, dtype=np.uint64), rows, dict(counts)


def _labels_for_entries(batch, sorted_hashes, sorted_rows, K, tag_uses, url_hits, listed, base=0):
    """One batch of index entries (url hashes, list lengths, flat tag indices, numbered from base)
    joined with the shard samples (everything below is 0-based):
    (row << 32 | tag) pairs, (smallest, largest index), and counts of entries: found, with indices
    out of range ("bad"), below 0 or above K ("far"), equal to K ("at_k": one past the list, the
    off-by-one sign). Adds to tag_uses (K: how often each tag is in the index) and url_hits (per
    shard URL: index entries naming it; above 1 when the index lists a URL twice); sets listed[row]
    for every sample whose URL the index has, even with an empty list."""
    h = np.frombuffer(batch[0], dtype=np.uint64)
    lengths = np.frombuffer(batch[1], dtype=np.int64)
    ids = np.frombuffer(batch[2], dtype=np.int64)
    if base:
        ids = ids - base  # 0-based row numbers
    entry_of = np.repeat(np.arange(len(h)), lengths)
    bad = (ids < 0) | (ids >= K)
    tag_uses += np.bincount(ids[~bad], minlength=K)
    left = np.searchsorted(sorted_hashes, h, "left")
    matches = np.searchsorted(sorted_hashes, h, "right") - left
    # a URL held by several samples: counted at the first of them
    np.add.at(url_hits, left[matches > 0], 1)
    listed[sorted_rows[left[matches == 1]]] = True
    # the usual case, vectorised: an index URL held by one sample
    one = (matches == 1)[entry_of] & ~bad
    pairs = [sorted_rows[left[entry_of[one]]] << 32 | ids[one]]
    starts = np.cumsum(lengths) - lengths
    for e in np.flatnonzero(matches > 1):  # a URL downloaded as several samples: each gets the tags
        tags = ids[starts[e]:starts[e] + lengths[e]]
        tags = tags[(tags >= 0) & (tags < K)]
        pairs += [sorted_rows[j] << 32 | tags for j in range(left[e], left[e] + matches[e])]
        listed[sorted_rows[left[e]:left[e] + matches[e]]] = True
    bounds = (int(ids.min()), int(ids.max())) if len(ids) else None
    entries_with = lambda mask: len(np.unique(entry_of[mask]))
    return pairs, bounds, Counter(found=int((matches > 0).sum()), bad=entries_with(bad),
                                  far=entries_with((ids < 0) | (ids > K)),
                                  at_k=entries_with(ids == K))


def import_tags(tags_path, index_path, shard_files, out_dir, report_bad, tag_column=None,
                tags_header="auto", workers=1, log=lambda message: print(message, file=sys.stderr),
                index_base=0):
    """The authors' released object tags -> vocab.json + labels.pt for train.py, no parsing: each
    shard sample's URL (from its metadata) is looked up in the index, and the URL's tag indices
    become the sample's object labels. The vocabulary is the CSV's K tags in the CSV's order (label
    index i is the authors' tag i), each kept even when no sample has it (a model trained on the
    part of CC12M still reachable keeps the authors' K-tag list; train.py's balanced loss gives a
    zero-frequency tag no weight); counts and frequencies are over the shard samples. No attributes:
    the authors released none. An index that lists a URL twice gives its samples the union of both
    lists (json.load would keep the last); the report counts such URLs. A shard sample whose URL the
    index does not list gets no row: the authors' dataset skips it, and so does train.py (counted as
    'unlisted'; its --keep-unlisted trains such samples on the contrastive loss). A listed URL with
    an empty list gets an empty row.
    Memory grows with the shards and the pairs, not with the index: at its peak about 80 bytes per
    shard sample (key, URL hash, row, their sort; more when keys are not img2dataset's digits and
    stay Python strings) and about 26 bytes per (sample, tag) pair while the pairs are sorted, plus
    one index chunk and an 8-byte count per tag; never a Python object per index URL
    (benchmarks/bench_parse_import.py measures it).
    The header guess is checked against the index, since a wrong one shifts every tag by one: a
    guessed header (no --tags-header) with index entries using K (one past the list), or with no
    header found and the last row used by no entry, is refused with the flags that settle it; an
    index that uses K and never 0 (1-based) is refused unless index_base=1 (--index-base 1) says so;
    with an explicit --tags-header, entries using K are dropped and warned about. log(message) gets
    the CSV reading before the long part starts.
    Returns the report (counts)."""
    import torch
    names, csv_info = read_tag_names(tags_path, tag_column, tags_header)
    K = len(names)
    header = csv_info["header"]
    skipped = f"header row {_preview(header)} skipped" if header else \
        f"no header row (the first row is tag {index_base})"
    how = "decided by --tags-header" if tags_header != "auto" else \
        "guessed; --tags-header yes|no overrides"
    log(f"{tags_path}: {K:,} tags from column {csv_info['column']}; {skipped} ({how});"
        f" tags {index_base}.. {_preview(names, 3)}, last tag ({K - 1 + index_base}) {names[-1]!r}")
    os.makedirs(out_dir, exist_ok=True)
    keys, width, hashes, rows, counts = read_shard_urls(shard_files, report_bad, workers)
    if not len(keys):
        raise ValueError(f"no samples with metadata in {len(shard_files)} shard(s) (e.g. "
                         f"{shard_files[0]}); expected "
                         "img2dataset shards with {key}.json members (or {shard}.parquet beside "
                         "each tar)")
    if not len(hashes):
        raise ValueError(f"none of the {len(keys):,} shard samples has a 'url' in its metadata; "
                         "the index is keyed by URL, so nothing can be matched")
    # one row per distinct key, in key order (LabelTable's); a key seen twice
    # gets the union of its tags
    samples_read = len(keys)
    keys, inverse = np.unique(np.asarray(keys), return_inverse=True)
    inverse = inverse.reshape(-1)
    # fine for a shard listed twice; two downloads sharing keys would mix labels
    if len(keys) < samples_read:
        url_of = np.zeros(samples_read, dtype=np.uint64)
        url_of[rows] = hashes
        has_url = np.zeros(samples_read, dtype=np.int64)
        has_url[rows] = 1
        seen = np.unique(np.stack([inverse, url_of.view(np.int64), has_url], axis=1), axis=0)
        if len(seen) > len(keys):
            k = seen[1:, 0][seen[1:, 0] == seen[:-1, 0]][0]
            raise ValueError(f"key {str(keys[k]).zfill(width)} belongs to two shard samples with "
                             "different URLs: shards of two downloads that reuse img2dataset's "
                             "keys would mix their labels; import each download into its own --out "
                             "(train.py takes one --labels per run)")
        del url_of, has_url, seen
    order = np.argsort(hashes, kind="stable")
    sorted_hashes, sorted_rows = hashes[order], inverse[rows[order]]
    del order, inverse, rows, hashes

    # index entries, and those of each kind
    entries, kinds = 0, Counter(found=0, bad=0, far=0, at_k=0)
    lo, hi, first_url, pairs = None, None, None, []
    tag_uses, url_hits = np.zeros(K, dtype=np.int64), np.zeros(len(sorted_hashes), dtype=np.int32)
    listed = np.zeros(len(keys), dtype=bool)  # per key row: its URL is a key of the index

    def join(batch):
        nonlocal lo, hi
        new, bounds, counts = _labels_for_entries(batch, sorted_hashes, sorted_rows, K, tag_uses,
                                                  url_hits, listed, index_base)
        pairs.extend(new)
        kinds.update(counts)
        if bounds:
            lo = bounds[0] if lo is None else min(lo, bounds[0])
            hi = bounds[1] if hi is None else max(hi, bounds[1])

    batch = (bytearray(), array("q"), array("q"))
    for url, tags in read_url_index(index_path):
        first_url = first_url or url
        entries += 1
        batch[0].extend(url_hash(url))
        batch[1].append(len(tags))
        try:
            batch[2].extend(tags)
        except OverflowError:
            huge = next(t for t in tags if not -2 ** 63 <= t < 2 ** 63)
            raise ValueError(f"{index_path}: {url[:120]!r} has the tag index {huge}, which is no "
                             "row of any tag list (it does not fit 64 bits): the index file is "
                             "damaged; fetch it again") from None
        if len(batch[1]) == IMPORT_BATCH:
            join(batch)
            batch = (bytearray(), array("q"), array("q"))
    join(batch)
    found, bad_entries, at_k = kinds["found"], kinds["bad"], kinds["at_k"]
    if lo is not None:  # the index's own numbers, for the messages and the report
        lo, hi = lo + index_base, hi + index_base
    # the index numbers of the first tag and of one past the last
    first, past_end = index_base, K + index_base
    mismatch = (f"{bad_entries:,} of {entries:,} index entries have tag indices outside "
                f"{first}..{past_end - 1} (seen {lo}..{hi}) "
                f"but {tags_path} has {K} tags: the tag list does not belong to this index (or was "
                "read with a wrong header/column: see --tags-header, --tag-column" +
                (f"; the index uses {lo}: does it count from {lo}, not --index-base {index_base}?)"
                 if index_base and lo is not None and lo < first else ")"))
    if kinds["far"] > MAX_OUT_OF_RANGE * entries:  # far outside, not one past: another list
        raise ValueError(mismatch)
    # however few: a 0-based index read as 1-based shifts them all
    if index_base and lo is not None and lo < first:
        raise ValueError(f"{index_path}: an entry uses tag index {lo}, below {first} (--index-base "
                         f"{index_base}): the index counts from 0; drop --index-base")
    # the classic off-by-one: every tag would be shifted by one, which trains without a complaint
    if at_k:
        past = (f"{at_k:,} index entries use tag index {past_end}, one past the last of the {K:,} "
                f"tags read from {tags_path} (index range {lo}..{hi})")
        # never the first tag and up to one past the last: counted from 1 more
        if lo is not None and lo > first:
            raise ValueError(f"{index_path}: {past} and none uses {first}: the index counts tags "
                             f"from {first + 1}, or the list lacks its first row" +
                             ("; if the index counts from 1, pass --index-base 1"
                              if index_base == 0 else ""))
        if tags_header == "auto":
            raise ValueError(f"{index_path}: {past}: " + (
                f"the first row {_preview(header)} was read as a header; pass --tags-header no if "
                "it is a tag, --tags-header yes if it is a header (then those indices are dropped "
                "as out of range)" if header else
                "is the tag list missing its last row? pass --tags-header no to import anyway "
                "(those indices are then dropped as out of range)"))
        log(f"warning: {past}; with --tags-header {tags_header} they are dropped as out of range" +
            (f"; if the skipped first row {_preview(header)} is a tag, every tag is shifted by "
             "one: use --tags-header no" if header else ""))
    if bad_entries > MAX_OUT_OF_RANGE * entries:
        raise ValueError(mismatch)
    if entries and not header and tags_header == "auto" and tag_uses[-1] == 0 and tag_uses[0] > 0:
        raise ValueError(f"{index_path}: no entry uses the last tag ({past_end - 1}: "
                         f"{names[-1]!r}) while the first row {names[0]!r} was read as tag "
                         f"{first}: if that row is a header, every tag is shifted by one; pass "
                         "--tags-header yes if it is a header, --tags-header no if it is a tag")
    if found == 0:
        key = str(keys[0]).zfill(width)
        url = first_url.decode("utf-8", "replace")[:120] if first_url else None
        raise ValueError(f"none of the {entries:,} index URLs (e.g. {url!r}) is the URL of any of "
                         f"the {len(keys):,} shard samples (the 'url' in {key}.json): were these "
                         "shards downloaded from the URLs of this index?")

    pairs = np.concatenate(pairs)
    pairs.sort()
    if len(pairs):  # a tag listed twice for one URL, or two entries for one sample, counts once
        pairs = pairs[np.concatenate(([True], pairs[1:] != pairs[:-1]))]
    unlisted, distinct = int((~listed).sum()), len(keys)
    # rows of the listed samples only (every pair comes from a listed row)
    new_row = np.cumsum(listed) - 1
    pairs = new_row[pairs >> 32] << 32 | (pairs & 0xFFFFFFFF)
    keys = keys[listed]
    n = len(keys)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs >> 32, minlength=n), out=offsets[1:])
    indices = (pairs & 0xFFFFFFFF).astype(np.int32)
    del pairs
    tag_counts = np.bincount(indices, minlength=K).tolist()
    vocab = {"objects": [{"tag": t, "count": c, "freq": c / n} for t, c in zip(names, tag_counts)],
             "attributes": [], "num_samples": n}
    save_labels(out_dir, vocab, torch.from_numpy(keys) if width else "\n".join(keys.tolist()),
                width,
                {"objects": torch.from_numpy(offsets),
                 "attributes": torch.zeros(n + 1, dtype=torch.int64)},
                {"objects": torch.from_numpy(indices),
                 "attributes": torch.zeros(0, dtype=torch.int32)})
    untagged = int((offsets[1:] == offsets[:-1]).sum())
    return {"tags": K, "tag_column": csv_info["column"], "tag_header": csv_info["header"],
            "duplicate_tag_names": csv_info["duplicate_names"], "index_urls": entries,
            "index_urls_found": found,
            "index_urls_found_pct": round(100 * found / max(entries, 1), 2),
            "index_entries_out_of_range": bad_entries, "index_range": [lo, hi],
            "shards": len(shard_files),
            "bad_shards": counts["bad_shards"], "samples": n, "samples_without_tags": untagged,
            "samples_without_tags_pct": round(100 * untagged / n, 2),
            "samples_without_url": counts["without_url"],
            "samples_not_in_index": unlisted,
            "duplicate_keys": samples_read - distinct, "not_success_skipped": counts["not_success"],
            "keys_without_metadata": counts["without_metadata"],
            "tags_without_samples": tag_counts.count(0),
            "tags_not_in_index": int((tag_uses == 0).sum()), "index_entries_at_K": at_k,
            "found_urls_listed_twice": int((url_hits > 1).sum()),
            "samples_with_unreadable_metadata": counts["unreadable_metadata"],
            "parquet_files_not_used": counts["parquet_not_used"]}



def import_summary(r, out, errors):
    """The import report for a person: what was matched, what was lost, and what to look at."""
    lines = [f"imported {r['tags']:,} tags: {r['index_urls_found']:,} of {r['index_urls']:,} index "
             f"URLs found in the shards ({r['index_urls_found_pct']}%); {r['samples']:,} shard "
             f"samples listed, {r['samples_without_tags']:,} of them with an empty list "
             f"({r['samples_without_tags_pct']}%) -> {out}/vocab.json, labels.pt; "
             f"{r['samples_not_in_index']:,} samples not in the index get no row "
             "(train.py skips them)",
             f"  tags: {r['tags_without_samples']:,} on no shard sample, "
             f"{r['tags_not_in_index']:,} in no index entry, "
             f"{r['duplicate_tag_names']:,} duplicate names; index tag range {r['index_range']}, "
             f"{r['index_entries_out_of_range']:,} entries with indices outside the list (those "
             "indices dropped)",
             f"  samples: {r['samples_without_url']:,} without a url, "
             f"{r['samples_with_unreadable_metadata']:,} with an unreadable .json, "
             f"{r['keys_without_metadata']:,} keys without .json, "
             f"{r['not_success_skipped']:,} failed downloads skipped, {r['duplicate_keys']:,} keys "
             f"read twice (merged); {r['found_urls_listed_twice']:,} of the URLs found are listed "
             "twice in the index (tags merged)"]
    problems = [f"{count:,} {what}" for count, what in (
        (r["bad_shards"], "unreadable shards (what was read before the error is kept)"),
        (r["parquet_files_not_used"],
         "parquet files unreadable or describing another tar (their tars were read)"),
        (r["samples_with_unreadable_metadata"],
         "unreadable .json members (those samples have no tags)")) if count]
    if problems:
        lines.append(f"  {', '.join(problems)}: see {errors}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="the authors' released tags -> vocab.json + labels.pt")
    parser.add_argument("--out", required=True,
                        help="output folder (vocab.json, labels.pt, errors.import.jsonl)")
    parser.add_argument("--tags", required=True,
                        help="the authors' object_list.csv (tag names, one row per tag index)")
    parser.add_argument("--index", required=True,
                        help="the authors' CC12M_url_object_index.json ({url: [tag indices]})")
    parser.add_argument("--shards", nargs="+", required=True,
                        help="img2dataset .tar shards whose {key}.json (or {shard}.parquet) gives "
                        "each sample's url; globs and {a..b} braces")
    parser.add_argument("--tag-column", default=None,
                        help="the column of --tags holding the names, a header name or 0-based "
                        "number (default: the one column that is not all integers)")
    parser.add_argument("--tags-header", choices=["auto", "yes", "no"], default="auto",
                        help="whether --tags starts with a header row (auto: a word like 'name' or "
                        "'tag', or a non-number above a column of numbers)")
    parser.add_argument("--index-base", type=int, choices=[0, 1], default=0,
                        help="the number the index gives the CSV's first tag (0: the authors' row "
                        "numbers, as their loader reads them; 1 for an index counting from 1, "
                        "refused otherwise)")
    parser.add_argument("--workers", type=int, default=default_threads(),
                        help="shards read at a time, in worker processes (default: the cores this "
                        "process may use)")
    args = parser.parse_args(argv)
    try:
        errors = os.path.join(args.out, "errors.import.jsonl")
        os.makedirs(args.out, exist_ok=True)
        report = import_tags(args.tags, args.index, input_files(args.shards), args.out,
                             bad_file_reporter(errors), args.tag_column, args.tags_header,
                             args.workers, index_base=args.index_base)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(report))
    print(import_summary(report, args.out, errors), file=sys.stderr)


if __name__ == "__main__":
    main()
