"""parse_tags.py import: the authors' released tags (object_list.csv + CC12M_url_object_index.json) joined with
img2dataset shards through each sample's metadata URL. Fixtures are written in the released formats (the CSV in
several shapes, the index with json.dump: pretty, compact, ASCII-escaped) and checked against labels written out
by hand; the streaming index reader is checked against json.load; train.py trains on the result."""
import importlib.util
import io
import json
import os
import sys
import tarfile

import pytest

import parse_tags
import import_tags
import train
from labels import LabelTable
from test_train import base_args, jpeg

NAMES = ["person", "dog", "teddy bear", "café", "tree"]  # "tree" is on no downloaded sample
URL = {
    "a": "http://a.example/1.jpg",
    "b": 'https://b.example/p?x=1&y="q"',                 # a quote: escaped in JSON
    "c": "http://c.example/фото.jpg",                     # non-ASCII: \u-escaped by json.dump's default
    "d": "http://d.example/empty.jpg",                    # in the index with no tags
    "e": "http://gone.example/rot.jpg",                   # in the index, not downloaded (link rot)
    "f": "http://f.example/back\\slash/x.jpg",            # a backslash
    "g": "http://g.example/twice.jpg",                    # downloaded twice, as two samples
    "z": "http://z.example/not-in-index.jpg",             # downloaded, not in the index
}
INDEX = {URL["a"]: [0, 1], URL["b"]: [2], URL["c"]: [3, 0, 3], URL["d"]: [], URL["e"]: [1, 4], URL["f"]: [1],
         URL["g"]: [2, 1]}
SHARDS = [  # (key, url) per shard; None: the sample's .json has no url
    [("000000000", URL["a"]), ("000000001", URL["b"]), ("000000002", URL["z"]), ("000000003", URL["g"])],
    [("000010000", URL["c"]), ("000010001", URL["d"]), ("000010002", URL["f"]), ("000010003", URL["g"]),
     ("000010005", None)],
]
# by hand: the tag indices of each sample (sorted, each once) and the counts they add up to; None: no row (the
# URL is not a key of the index, or there is no URL), as the authors' dataset skips such samples
EXPECTED = {"000000000": [0, 1], "000000001": [2], "000000002": None, "000000003": [1, 2], "000010000": [0, 3],
            "000010001": [], "000010002": [1], "000010003": [1, 2], "000010005": None}
EXPECTED_COUNTS = [2, 4, 3, 1, 0]
EXPECTED_REPORT = {"tags": 5, "index_urls": 7, "index_urls_found": 6, "samples": 7, "samples_without_tags": 1,
                   "samples_not_in_index": 2,
                   "samples_without_url": 1, "tags_without_samples": 1, "index_entries_out_of_range": 0,
                   "duplicate_keys": 0, "bad_shards": 0, "index_range": [0, 4],
                   "tags_not_in_index": 0, "index_entries_at_K": 0, "found_urls_listed_twice": 0,
                   "parquet_files_not_used": 0, "samples_with_unreadable_metadata": 0}
CSV_SHAPES = {  # the same five tags as the released list might be laid out
    "one column, no header": ("object_list.csv", "\n".join(NAMES) + "\n"),
    "one column, header": ("object_list.csv", "name\n" + "\n".join(NAMES) + "\n"),
    "index, name, count with header": ("object_list.csv", "index,name,count\n" +
                                       "".join(f'{i},"{n}",{10 * i}\n' for i, n in enumerate(NAMES))),
    "tsv, id and name, no header": ("object_list.tsv", "".join(f"{i + 1}\t{n}\n" for i, n in enumerate(NAMES))),
}
INDEX_STYLES = {"pretty": dict(indent=2, ensure_ascii=False), "compact": dict(separators=(",", ":")),
                "ascii-escaped, spaced": dict(indent=None)}


def member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, samples, image=lambda key: b"\xff\xd8 not decoded here"):
    """An img2dataset tar: {key}.jpg, {key}.txt and {key}.json (with url, key, status) per sample."""
    with tarfile.open(path, "w") as tar:
        for key, url in samples:
            meta = {"key": key, "status": "success", "caption": "a caption"}
            if url is not None:
                meta["url"] = url
            member(tar, f"{key}.jpg", image(key))
            member(tar, f"{key}.txt", b"a caption")
            member(tar, f"{key}.json", json.dumps(meta).encode())


def write_fixture(folder, csv_shape="one column, header", index_style="pretty", index=INDEX, shards=SHARDS):
    name, text = CSV_SHAPES[csv_shape]
    with open(folder / name, "w", encoding="utf-8") as f:
        f.write(text)
    with open(folder / "index.json", "w", encoding="utf-8") as f:
        json.dump(index, f, **INDEX_STYLES[index_style])
    for i, samples in enumerate(shards):
        write_shard(folder / f"{i:05d}.tar", samples)
    return str(folder / name), str(folder / "index.json"), [str(folder / f"{i:05d}.tar") for i in range(len(shards))]


def decoded(out):
    table = LabelTable(os.path.join(out, "labels.pt"))
    return table, {key: table.get(key)[0].tolist() if table.get(key) else None for key in EXPECTED}


def no_bad_shards(path, error):
    raise AssertionError(f"unexpected bad shard {path}: {error}")


@pytest.mark.parametrize("csv_shape,index_style", list(zip(CSV_SHAPES, list(INDEX_STYLES) * 2)))
def test_labels_are_the_hand_written_ones(tmp_path, csv_shape, index_style):
    tags, index, shards = write_fixture(tmp_path, csv_shape, index_style)
    report = import_tags.import_tags(tags, index, shards, str(tmp_path / "out"), no_bad_shards)
    assert {k: report[k] for k in EXPECTED_REPORT} == EXPECTED_REPORT
    table, labels = decoded(tmp_path / "out")
    assert labels == EXPECTED
    assert table.numeric and len(table) == 7 and table.get("000010004") is None
    assert table.tags == {"objects": NAMES, "attributes": []}
    vocab = json.load(open(tmp_path / "out" / "vocab.json", encoding="utf-8"))
    assert vocab == {"objects": [{"tag": t, "count": c, "freq": c / 7} for t, c in zip(NAMES, EXPECTED_COUNTS)],
                     "attributes": [], "num_samples": 7}
    assert table.get("000000000")[1].numel() == 0  # attributes: none released


def test_index_reader_equals_json_load(tmp_path):
    """Chunks of 7 bytes put chunk boundaries inside URLs, escapes, numbers and whitespace."""
    documents = [
        "{}", " \n { \n } \n", '\ufeff{"x": []}',
        json.dumps(INDEX, indent=3), json.dumps(INDEX, ensure_ascii=False, separators=(",", ":")),
        '{\n"http:\\/\\/s.example\\/\\ud83d\\ude00.jpg"\n:\n[\n 7 ,\n8\n]\n,"\\u00e9\\t\\\\":[ ]}\n',
    ]
    for i, doc in enumerate(documents):
        path = tmp_path / f"{i}.json"
        path.write_text(doc, encoding="utf-8")
        expected = json.loads(doc.lstrip("\ufeff"))
        for chunk_size in (1, 7):
            got = [(url.decode("utf-8"), ids) for url, ids in import_tags.read_url_index(str(path), chunk_size)]
            assert got == list(expected.items()), (doc, chunk_size)


@pytest.mark.parametrize("doc,offset", [
    ('[["http://a", [1]]]', 0),             # not an object
    ('{"a": [1], "b": [x]}', 11),           # not an integer: the offset of the entry
    ('{"é": [1], "b": [1.5]}', 12),         # byte offset, not characters
    ('{"a": [1],}', 10),                    # trailing comma
    ('{"a": [1]', 1),                       # cut short
    ('{"a": {"b": 1}}', 1),                 # not a list
    ('{"a": [1]} {}', 11),                  # data after the object
    ('{"a\\q": [1]}', 1),                   # bad escape
    ('{"a": [+1]}', 1),                     # JSON integers have no plus sign,
    ('{"a": [01]}', 1),                     # no leading zero,
    ('{"a": [1_0]}', 1),                    # no underscore (all three are fine for Python's int())
    ('{"a\x01": [1]}', 1),                   # a raw control character inside a string
])
def test_index_reader_names_the_byte_of_malformed_input(tmp_path, doc, offset):
    path = tmp_path / "bad.json"
    path.write_text(doc, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad.json: byte {offset}: .*expected one JSON object"):
        list(import_tags.read_url_index(str(path), chunk_size=4))


def test_csv_shapes_that_need_a_word_from_the_user(tmp_path):
    def read(text, **kw):
        (tmp_path / "t.csv").write_text(text, encoding="utf-8")
        return import_tags.read_tag_names(str(tmp_path / "t.csv"), **kw)

    assert read("\ufeffcat\ndog\n\n\n")[0] == ["cat", "dog"]  # BOM and trailing blank lines
    assert read("object\ncat\n", header="no")[0] == ["object", "cat"]  # a real list may start with a header word
    assert read("object\ncat\n")[0] == ["cat"]
    names, info = read("word,definition\ncat,an animal\ndog,another\n", column="word")
    assert names == ["cat", "dog"] and info["column"] == 0 and info["header"] == ["word", "definition"]
    assert read("Word,Definition\ncat,an animal\n", column="WORD")[0] == ["cat"]  # header names in any case
    assert read("a,b\ncat,x\ndog,y\n", column="1", header="no")[0] == ["b", "x", "y"]
    with pytest.raises(ValueError, match="several text columns .* --tag-column"):
        read("cat,an animal\ndog,another\n")
    with pytest.raises(ValueError, match="line 3 has no tag name .* shift every later tag"):
        read("name\ncat\n\ndog\n")
    with pytest.raises(ValueError, match="column 0 numbers the tags in another order"):
        read("1,cat\n0,dog\n2,tree\n")
    with pytest.raises(ValueError, match="only a header row"):
        read("name\n")
    # what would put a name at another index, or cut it, is refused with the fix
    with pytest.raises(ValueError, match=r"1 row\(s\) have more cells than the 1 of most rows, e.g. line 2 "
                                         r"\['salt', ' pepper'\]: a name holding an unquoted ','\? quote such names"):
        read("person\nsalt, pepper\ndog\n", column="0")  # (--tag-column 0 would have kept 'salt')
    assert read('person\n"salt, pepper"\ndog\n')[0] == ["person", "salt, pepper", "dog"]
    # a header naming more columns than the data fill, and a column filled in some rows, are no stray cells
    assert read("id,name,description\n0,cat,\n1,dog,\n2,tree,\n")[0] == ["cat", "dog", "tree"]
    assert read("name,alias\ncat,\ndog,puppy\ntree,\n")[0] == ["cat", "dog", "tree"]
    for text in ("id,name\n0,cat\n1,dog\n3,tree\n", "1\tcat\n2\tdog\n4\ttree\n"):
        with pytest.raises(ValueError, match=r"column 0 looks like tag ids but skips from \d to \d \(line [34]\).* "
                                             "put a placeholder row"):
            read(text)
    assert read("name,count\ncat,1\ndog,2\ntree,5\n")[0] == ["cat", "dog", "tree"]  # counts are not ids
    assert read("cat,1\ndog,3\ntree,7\nbird,9\n")[0] == ["cat", "dog", "tree", "bird"]  # nor with no header
    assert read("person,\ndog,\n")[0] == ["person", "dog"]  # an empty trailing column is no second text column
    with pytest.raises(ValueError, match=r"several text columns \[0, 1\], 2 of them named like a tag column "
                                         r"\(name, category\)"):
        read("name,category\ncat,animal\n")
    (tmp_path / "t.csv").write_bytes("café\ncat\n".encode("latin1"))
    with pytest.raises(ValueError, match=r"t.csv is not UTF-8 \(byte 0xe9 at offset 3\); convert it"):
        import_tags.read_tag_names(str(tmp_path / "t.csv"))
    with pytest.raises(ValueError, match="no column 'tag'"):
        read("name\ncat\n", column="tag")
    # the names written on one line: refused in a short message (not the whole line), as are 5,000 text columns
    many = [f"tag{i}" for i in range(5000)]
    for text in (",".join(many) + "\n", "\n".join(",".join(many) for _ in range(2)) + "\n"):
        with pytest.raises(ValueError) as e:
            read(text)
        assert len(str(e.value)) < 400 and "5,000 in all" in str(e.value), str(e.value)[:500]


def test_a_wrong_header_guess_is_caught_by_the_index(tmp_path):
    """A header guessed wrongly shifts every tag index by one, which trains fine and is wrong: the index's range
    catches both directions, and --tags-header settles it."""
    _, index, shards = write_fixture(tmp_path)
    out = str(tmp_path / "out")
    # "object" is a real tag here (tag 0) but a header word: the index's largest index is one past the list
    names = ["object"] + NAMES[1:]
    (tmp_path / "object.csv").write_text("\n".join(names) + "\n", encoding="utf-8")
    for extra in ({}, {f"http://m.example/{i}.jpg": [i % 4] for i in range(600)} | {"http://x.example/": [999]}):
        # (also when one stray index far above the list would hide the off-by-one behind a larger maximum)
        (tmp_path / "index2.json").write_text(json.dumps(INDEX | extra), encoding="utf-8")
        with pytest.raises(ValueError, match=r"1 index entries use tag index 4, one past the last of the 4 tags .* "
                                             r"first row \['object'\] was read as a header; pass --tags-header no"):
            import_tags.import_tags(str(tmp_path / "object.csv"), str(tmp_path / "index2.json"), shards, out,
                                   no_bad_shards)
    import_tags.import_tags(str(tmp_path / "object.csv"), index, shards, out, no_bad_shards, tags_header="no")
    assert LabelTable(os.path.join(out, "labels.pt")).tags["objects"] == names
    assert decoded(out)[1] == EXPECTED
    # said explicitly: the user is trusted, the entries using index 4 lose that index, and the log says so
    said = []
    report = import_tags.import_tags(str(tmp_path / "object.csv"), str(tmp_path / "index2.json"), shards, out,
                                    no_bad_shards, tags_header="yes", log=said.append)  # (the 607-entry index)
    assert report["index_entries_at_K"] == 1 and report["index_entries_out_of_range"] == 2
    assert "if the skipped first row ['object'] is a tag, every tag is shifted by one" in said[-1]
    # a header that is no known word: read as tag 0, so the list's last row is used by no index entry
    (tmp_path / "titled.csv").write_text("CC12M objects v1\n" + "\n".join(NAMES) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no entry uses the last tag \(5: 'tree'\) while the first row 'CC12M "
                                         r"objects v1' was read as tag 0.*--tags-header yes if it is a header"):
        import_tags.import_tags(str(tmp_path / "titled.csv"), index, shards, out, no_bad_shards)
    import_tags.import_tags(str(tmp_path / "titled.csv"), index, shards, out, no_bad_shards, tags_header="yes")
    assert decoded(out)[1] == EXPECTED
    # an index counting from 1 (said to have a header, so only the index can be wrong)
    one_based = {url: [i + 1 for i in ids] for url, ids in INDEX.items()}
    (tmp_path / "one.json").write_text(json.dumps(one_based), encoding="utf-8")
    with pytest.raises(ValueError, match="use tag index 5, one past .* none uses 0: the index counts tags from 1, "
                                         ".* pass --index-base 1"):
        import_tags.import_tags(str(tmp_path / "titled.csv"), str(tmp_path / "one.json"), shards, out, no_bad_shards,
                               tags_header="yes")
    report = import_tags.import_tags(str(tmp_path / "titled.csv"), str(tmp_path / "one.json"), shards, out,
                                    no_bad_shards, tags_header="yes", index_base=1)
    assert decoded(out)[1] == EXPECTED and report["index_range"] == [1, 5]  # the index's own numbers
    with pytest.raises(ValueError, match=r"2 of 7 index entries have tag indices outside 1..5 \(seen 0..4\).* the "
                                         r"index uses 0: does it count from 0, not --index-base 1\?"):  # 0-based
        import_tags.import_tags(str(tmp_path / "titled.csv"), index, shards, out, no_bad_shards, tags_header="yes",
                               index_base=1)
    # ... also when tag 0 is rare (under 1% of the entries, which as out-of-range indices would merely be dropped)
    rare = {f"http://m.example/{i}.jpg": [1 + i % 4] for i in range(300)} | {URL["a"]: [0, 1]}
    (tmp_path / "rare.json").write_text(json.dumps(rare), encoding="utf-8")
    with pytest.raises(ValueError, match=r"an entry uses tag index 0, below 1 \(--index-base 1\): the index counts "
                                         "from 0; drop --index-base"):
        import_tags.import_tags(str(tmp_path / "titled.csv"), str(tmp_path / "rare.json"), shards, out,
                               no_bad_shards, tags_header="yes", index_base=1)


def test_two_downloads_sharing_keys_are_refused_and_a_huge_index_number_named(tmp_path):
    tags, index, shards = write_fixture(tmp_path)
    write_shard(tmp_path / "other.tar", [("000000001", URL["c"])])  # key of shard 0's sample b, another URL
    with pytest.raises(ValueError, match="key 000000001 belongs to two shard samples with different URLs"):
        import_tags.import_tags(tags, index, shards + [str(tmp_path / "other.tar")], str(tmp_path / "out"),
                               no_bad_shards)
    (tmp_path / "huge.json").write_text('{"http://a.example/1.jpg": [1, 18446744073709551616]}', encoding="utf-8")
    with pytest.raises(ValueError, match="has the tag index 18446744073709551616, .* the index file is damaged"):
        import_tags.import_tags(tags, str(tmp_path / "huge.json"), shards, str(tmp_path / "out"), no_bad_shards)


def test_a_url_listed_twice_in_the_index_gets_both_lists(tmp_path):
    """JSON allows a key twice (json.load keeps the last): the import takes the union and counts the URL."""
    tags, _, shards = write_fixture(tmp_path)
    text = json.dumps(INDEX)[:-1] + f', {json.dumps(URL["a"])}: [3]}}'
    (tmp_path / "twice.json").write_text(text, encoding="utf-8")
    report = import_tags.import_tags(tags, str(tmp_path / "twice.json"), shards, str(tmp_path / "out"), no_bad_shards)
    assert report["found_urls_listed_twice"] == 1 and report["index_urls"] == 8
    assert decoded(tmp_path / "out")[1] == dict(EXPECTED, **{"000000000": [0, 1, 3]})


def test_mismatched_files_fail_clearly(tmp_path):
    tags, index, shards = write_fixture(tmp_path)
    # a tag list shorter than the index's indices: most entries out of range
    (tmp_path / "short.csv").write_text("person\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"4 of 7 index entries have tag indices outside 0..1 \(seen 0..4\)"):
        import_tags.import_tags(str(tmp_path / "short.csv"), index, shards, str(tmp_path / "out"), no_bad_shards)
    # a few out-of-range indices (under 1% of entries) are dropped and counted
    many = {f"http://m.example/{i}.jpg": [i % 5] for i in range(300)}
    many[URL["a"]] = [0, 1, 99]
    (tmp_path / "many.json").write_text(json.dumps(many), encoding="utf-8")
    report = import_tags.import_tags(tags, str(tmp_path / "many.json"), shards, str(tmp_path / "out"), no_bad_shards)
    assert report["index_entries_out_of_range"] == 1 and report["index_range"] == [0, 99]
    assert decoded(tmp_path / "out")[1]["000000000"] == [0, 1]
    # shards downloaded from other URLs: nothing matches, which is an error rather than a run without tags
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "00000.tar", [("000000000", "http://elsewhere/1.jpg")])
    with pytest.raises(ValueError, match=r"none of the 7 index URLs \(e.g. 'http://a.example/1.jpg'\) is the URL of "
                                         r"any of the 1 shard samples \(the 'url' in 000000000.json\)"):
        import_tags.import_tags(tags, index, [str(other / "00000.tar")], str(tmp_path / "out"), no_bad_shards)
    write_shard(other / "00000.tar", [("000000000", None)])
    with pytest.raises(ValueError, match="none of the 1 shard samples has a 'url'"):
        import_tags.import_tags(tags, index, [str(other / "00000.tar")], str(tmp_path / "out"), no_bad_shards)


def test_bad_shard_is_skipped_and_named_with_worker_processes(tmp_path):
    tags, index, shards = write_fixture(tmp_path)
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar archive" * 40)
    bad = []
    report = import_tags.import_tags(tags, index, [shards[0], str(tmp_path / "00002.tar"), shards[1]],
                                    str(tmp_path / "out"), lambda path, error: bad.append(path), workers=2)
    assert bad == [str(tmp_path / "00002.tar")] and report["bad_shards"] == 1
    assert {k: report[k] for k in EXPECTED_REPORT} == dict(EXPECTED_REPORT, bad_shards=1)
    assert decoded(tmp_path / "out")[1] == EXPECTED


def test_an_unreadable_json_member_loses_only_its_sample(tmp_path, monkeypatch):
    """A .json member that is not JSON costs its own URL, not the rest of the shard; one warning names it. Only
    .json members are opened (the images are seeked over)."""
    tags, index, shards = write_fixture(tmp_path)
    with tarfile.open(shards[0]) as src, tarfile.open(tmp_path / "damaged.tar", "w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            member(dst, m.name, b"{not json" if m.name == "000000001.json" else data)
    opened = []
    real_extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: opened.append(m.name) or real_extract(self, m))
    bad = []
    report = import_tags.import_tags(tags, index, [str(tmp_path / "damaged.tar"), shards[1]], str(tmp_path / "out"),
                                    lambda *a: bad.append(a))
    assert opened and all(name.endswith(".json") for name in opened)
    assert len(bad) == 1 and bad[0][0] == str(tmp_path / "damaged.tar")
    assert "1 unreadable .json member(s), e.g. 000000001.json: JSONDecodeError" in bad[0][1]
    assert report["samples_with_unreadable_metadata"] == 1 and report["bad_shards"] == 0 and report["samples"] == 6
    assert report["samples_not_in_index"] == 3  # its URL is lost: like a URL the index does not list
    assert decoded(tmp_path / "out")[1] == dict(EXPECTED, **{"000000001": None})  # the samples after it: all there


def test_keys_that_are_not_img2datasets_and_a_shard_listed_twice(tmp_path):
    """A key that is not fixed-width digits turns every key into a string (as build_vocab does); a key read twice
    is one sample with the union of its tags."""
    tags, index, shards = write_fixture(tmp_path)
    write_shard(tmp_path / "extra.tar", [("x/extra", URL["e"])])
    report = import_tags.import_tags(tags, index, shards + [str(tmp_path / "extra.tar"), shards[0]],
                                    str(tmp_path / "out"), no_bad_shards)
    assert report["duplicate_keys"] == 4 and report["samples"] == 8 and report["index_urls_found"] == 7
    table, labels = decoded(tmp_path / "out")
    assert not table.numeric and len(table) == 8
    assert labels == EXPECTED and table.get("x/extra")[0].tolist() == [1, 4]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow (test-only reference) not installed")
def test_parquet_beside_the_tar_is_read_instead_of_its_members(tmp_path):
    """img2dataset's per-shard parquet lists every URL of the shard, failed downloads too (status): those are not
    samples. The tars here carry other URLs in their .json members after the first sample (which the import
    compares with the parquet), so the labels show which was read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tags, index, _ = write_fixture(tmp_path)
    shards = []
    for i, samples in enumerate(SHARDS):
        write_shard(tmp_path / f"{i:05d}.tar", samples[:1] + [(key, "http://wrong.example/") for key, _ in samples[1:]])
        rows = [(key, url, "success") for key, url in samples] + [(f"{i:05d}9999", URL["e"], "failed_to_download")]
        pq.write_table(pa.table({"url": [r[1] for r in rows], "key": [r[0] for r in rows],
                                 "status": [r[2] for r in rows], "caption": ["c"] * len(rows)}),
                       tmp_path / f"{i:05d}.parquet")
        shards.append(str(tmp_path / f"{i:05d}.tar"))
    report = import_tags.import_tags(tags, index, shards, str(tmp_path / "out"), no_bad_shards)
    assert report["not_success_skipped"] == 2 and report["samples"] == 7 and report["index_urls_found"] == 6
    assert decoded(tmp_path / "out")[1] == EXPECTED
    # a damaged parquet file: named, and the tar's own .json members are read instead (here: the wrong URLs)
    (tmp_path / "00001.parquet").write_bytes(b"PAR1 truncated")
    bad = []
    report = import_tags.import_tags(tags, index, shards, str(tmp_path / "out"), lambda *a: bad.append(a))
    assert [path for path, _ in bad] == [str(tmp_path / "00001.parquet")] and "00001.tar instead" in bad[0][1]
    assert report["parquet_files_not_used"] == 1 and report["bad_shards"] == 0 and report["samples"] == 4
    assert report["index_urls_found"] == 4  # a, b, g of shard 0 (its parquet); of shard 1's tar only c (first)
    # a parquet file of another shard (an old download's, say): named, and the tar is read instead
    (tmp_path / "00001.parquet").write_bytes((tmp_path / "00000.parquet").read_bytes())
    bad.clear()
    report = import_tags.import_tags(tags, index, shards, str(tmp_path / "out"), lambda *a: bad.append(a))
    assert [path for path, _ in bad] == [str(tmp_path / "00001.parquet")]
    assert "does not describe 00001.tar (it does not list the tar's first sample 000010000)" in bad[0][1]
    assert report["parquet_files_not_used"] == 1 and report["index_urls_found"] == 4


def test_command_line_and_train_on_the_imported_tags(tmp_path, monkeypatch, capsys):
    """`parse_tags.py import` prints its report; train.py then trains on the labels: the 7 samples whose URL the
    index lists (6 with tags, d's list is empty), the eighth (z) skipped as unlisted, as the authors' dataset
    does."""
    import torch
    from conftest import TINY, random_state_dict
    tags, index, _ = write_fixture(tmp_path, shards=[])
    urls = [URL[c] for c in "abcdefgz"]  # e has tags; d has an empty list; z is not in the index
    samples = [(f"{i:09d}", url) for i, url in enumerate(urls)]
    write_shard(tmp_path / "00000.tar", samples, image=lambda key: jpeg("red", "circle", int(key)))
    out = tmp_path / "labels"
    monkeypatch.setattr(sys, "argv", ["parse_tags.py", "import", "--tags", tags, "--index", index,
                                      "--shards", str(tmp_path / "0000{0..0}.tar"), "--out", str(out)])
    parse_tags.main()
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["samples"] == 7 and report["samples_without_tags"] == 1 and report["index_urls_found"] == 7
    assert report["samples_not_in_index"] == 1
    assert ("7 of 7 index URLs found in the shards (100.0%); 7 shard samples listed, 1 of them with an empty list "
            "(14.29%)") in printed.err and "1 samples not in the index get no row" in printed.err
    torch.save(random_state_dict(TINY, seed=2), tmp_path / "clip.pt")
    train.main(base_args(tmp_path, tmp_path / "run", **{"--data": tmp_path / "00000.tar", "--labels": out,
                                                        "--batch-size": 7, "--steps": 1}))
    line = open(tmp_path / "run" / "log.txt").read().splitlines()[-1]
    assert " tagged 85.7% found 100.0% " in line and line.endswith(" unlisted 1"), line
    assert os.path.isfile(tmp_path / "run" / "ckpt.pt")


def test_command_line_names_bad_shards_once_per_run(tmp_path, monkeypatch, capsys):
    tags, index, shards = write_fixture(tmp_path)
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar archive" * 40)
    out = tmp_path / "out"
    for _ in range(2):  # an import starts over: its errors file too
        monkeypatch.setattr(sys, "argv", ["parse_tags.py", "import", "--tags", tags, "--index", index, "--shards",
                                          *shards, str(tmp_path / "00002.tar"), "--out", str(out), "--workers", "1"])
        parse_tags.main()
    errors = open(out / "errors.import.jsonl").read().splitlines()
    assert len(errors) == 1 and json.loads(errors[0])["file"] == str(tmp_path / "00002.tar")
    err = capsys.readouterr().err
    assert "1 unreadable shards (what was read before the error is kept)" in err
    assert "object_list.csv: 5 tags from column 0; header row ['name'] skipped (guessed" in err


def test_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys):
    tags, index, shards = write_fixture(tmp_path)
    monkeypatch.setattr(sys, "argv", ["parse_tags.py", "import", "--tags", tags, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        parse_tags.main()
    assert "error: the following arguments are required: --index, --shards" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["parse_tags.py", "import", "--tags", tags, "--index", index, "--shards",
                                      str(tmp_path / "nothing-*.tar"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="error: no input files match"):
        parse_tags.main()
