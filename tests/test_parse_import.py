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
import train
from test_train import base_args, jpeg

NAMES = ["person", "dog", "teddy bear", "café", "tree"]  # "tree" is on no sample
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
INDEX = {URL["a"]: [0, 1], URL["b"]: [2], URL["c"]: [3, 0, 3], URL["d"]: [], URL["e"]: [1], URL["f"]: [1],
         URL["g"]: [2, 1]}
SHARDS = [  # (key, url) per shard; None: the sample's .json has no url
    [("000000000", URL["a"]), ("000000001", URL["b"]), ("000000002", URL["z"]), ("000000003", URL["g"])],
    [("000010000", URL["c"]), ("000010001", URL["d"]), ("000010002", URL["f"]), ("000010003", URL["g"]),
     ("000010005", None)],
]
# by hand: the tag indices of each sample (sorted, each once) and the counts they add up to
EXPECTED = {"000000000": [0, 1], "000000001": [2], "000000002": [], "000000003": [1, 2], "000010000": [0, 3],
            "000010001": [], "000010002": [1], "000010003": [1, 2], "000010005": []}
EXPECTED_COUNTS = [2, 4, 3, 1, 0]
EXPECTED_REPORT = {"tags": 5, "index_urls": 7, "index_urls_found": 6, "samples": 9, "samples_without_tags": 3,
                   "samples_without_url": 1, "tags_without_samples": 1, "index_entries_out_of_range": 0,
                   "duplicate_keys": 0, "bad_shards": 0, "index_range": [0, 3]}
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
    table = parse_tags.LabelTable(os.path.join(out, "labels.pt"))
    return table, {key: table.get(key)[0].tolist() for key in EXPECTED}


def no_bad_shards(path, error):
    raise AssertionError(f"unexpected bad shard {path}: {error}")


@pytest.mark.parametrize("csv_shape,index_style", list(zip(CSV_SHAPES, list(INDEX_STYLES) * 2)))
def test_labels_are_the_hand_written_ones(tmp_path, csv_shape, index_style):
    tags, index, shards = write_fixture(tmp_path, csv_shape, index_style)
    report = parse_tags.import_tags(tags, index, shards, str(tmp_path / "out"), no_bad_shards)
    assert {k: report[k] for k in EXPECTED_REPORT} == EXPECTED_REPORT
    table, labels = decoded(tmp_path / "out")
    assert labels == EXPECTED
    assert table.numeric and len(table) == 9 and table.get("000010004") is None
    assert table.tags == {"objects": NAMES, "attributes": []}
    vocab = json.load(open(tmp_path / "out" / "vocab.json", encoding="utf-8"))
    assert vocab == {"objects": [{"tag": t, "count": c, "freq": c / 9} for t, c in zip(NAMES, EXPECTED_COUNTS)],
                     "attributes": [], "num_samples": 9}
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
        got = [(url.decode("utf-8"), ids) for url, ids in parse_tags.read_url_index(str(path), chunk_size=7)]
        assert got == list(expected.items()), doc


@pytest.mark.parametrize("doc,offset", [
    ('[["http://a", [1]]]', 0),             # not an object
    ('{"a": [1], "b": [x]}', 11),           # not an integer: the offset of the entry
    ('{"é": [1], "b": [1.5]}', 12),         # byte offset, not characters
    ('{"a": [1],}', 10),                    # trailing comma
    ('{"a": [1]', 1),                       # cut short
    ('{"a": {"b": 1}}', 1),                 # not a list
    ('{"a": [1]} {}', 11),                  # data after the object
    ('{"a\\q": [1]}', 1),                   # bad escape
])
def test_index_reader_names_the_byte_of_malformed_input(tmp_path, doc, offset):
    path = tmp_path / "bad.json"
    path.write_text(doc, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"bad.json: byte {offset}: .*expected one JSON object"):
        list(parse_tags.read_url_index(str(path), chunk_size=4))


def test_csv_shapes_that_need_a_word_from_the_user(tmp_path):
    def read(text, **kw):
        (tmp_path / "t.csv").write_text(text, encoding="utf-8")
        return parse_tags.read_tag_names(str(tmp_path / "t.csv"), **kw)

    assert read("\ufeffcat\ndog\n\n\n")[0] == ["cat", "dog"]  # BOM and trailing blank lines
    assert read("object\ncat\n", header="no")[0] == ["object", "cat"]  # a real list may start with a header word
    assert read("object\ncat\n")[0] == ["cat"]
    names, info = read("word,definition\ncat,an animal\ndog,another\n", column="word")
    assert names == ["cat", "dog"] and info["column"] == 0 and info["header"] == ["word", "definition"]
    assert read("a,b\ncat,x\ndog,y\n", column="1", header="no")[0] == ["b", "x", "y"]
    with pytest.raises(ValueError, match="several text columns .* --tag-column"):
        read("cat,an animal\ndog,another\n")
    with pytest.raises(ValueError, match="line 3 has no tag name .* shift every later tag"):
        read("name\ncat\n\ndog\n")
    with pytest.raises(ValueError, match="column 0 numbers the tags in another order"):
        read("1,cat\n0,dog\n2,tree\n")
    with pytest.raises(ValueError, match="only a header row"):
        read("name\n")
    with pytest.raises(ValueError, match="no column 'tag'"):
        read("name\ncat\n", column="tag")


def test_mismatched_files_fail_clearly(tmp_path):
    tags, index, shards = write_fixture(tmp_path)
    # a tag list shorter than the index's indices: most entries out of range
    (tmp_path / "short.csv").write_text("person\ndog\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"3 of 7 index entries have tag indices outside 0..1 \(seen 0..3\)"):
        parse_tags.import_tags(str(tmp_path / "short.csv"), index, shards, str(tmp_path / "out"), no_bad_shards)
    # a few out-of-range indices (under 1% of entries) are dropped and counted
    many = {f"http://m.example/{i}.jpg": [i % 5] for i in range(300)}
    many[URL["a"]] = [0, 1, 99]
    (tmp_path / "many.json").write_text(json.dumps(many), encoding="utf-8")
    report = parse_tags.import_tags(tags, str(tmp_path / "many.json"), shards, str(tmp_path / "out"), no_bad_shards)
    assert report["index_entries_out_of_range"] == 1 and report["index_range"] == [0, 99]
    assert decoded(tmp_path / "out")[1]["000000000"] == [0, 1]
    # shards downloaded from other URLs: nothing matches, which is an error rather than a run without tags
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "00000.tar", [("000000000", "http://elsewhere/1.jpg")])
    with pytest.raises(ValueError, match=r"none of the 7 index URLs \(e.g. 'http://a.example/1.jpg'\) is the URL of "
                                         r"any of the 1 shard samples \(the 'url' in 000000000.json\)"):
        parse_tags.import_tags(tags, index, [str(other / "00000.tar")], str(tmp_path / "out"), no_bad_shards)
    write_shard(other / "00000.tar", [("000000000", None)])
    with pytest.raises(ValueError, match="none of the 1 shard samples has a 'url'"):
        parse_tags.import_tags(tags, index, [str(other / "00000.tar")], str(tmp_path / "out"), no_bad_shards)


def test_bad_shard_is_skipped_and_named_with_worker_processes(tmp_path):
    tags, index, shards = write_fixture(tmp_path)
    (tmp_path / "00002.tar").write_bytes(b"this is not a tar archive" * 40)
    bad = []
    report = parse_tags.import_tags(tags, index, [shards[0], str(tmp_path / "00002.tar"), shards[1]],
                                    str(tmp_path / "out"), lambda path, error: bad.append(path), workers=2)
    assert bad == [str(tmp_path / "00002.tar")] and report["bad_shards"] == 1
    assert {k: report[k] for k in EXPECTED_REPORT} == dict(EXPECTED_REPORT, bad_shards=1)
    assert decoded(tmp_path / "out")[1] == EXPECTED


def test_keys_that_are_not_img2datasets_and_a_shard_listed_twice(tmp_path):
    """A key that is not fixed-width digits turns every key into a string (as build_vocab does); a key read twice
    is one sample with the union of its tags."""
    tags, index, shards = write_fixture(tmp_path)
    write_shard(tmp_path / "extra.tar", [("x/extra", URL["e"])])
    report = parse_tags.import_tags(tags, index, shards + [str(tmp_path / "extra.tar"), shards[0]],
                                    str(tmp_path / "out"), no_bad_shards)
    assert report["duplicate_keys"] == 4 and report["samples"] == 10 and report["index_urls_found"] == 7
    table = parse_tags.LabelTable(str(tmp_path / "out" / "labels.pt"))
    assert not table.numeric and len(table) == 10
    assert {key: table.get(key)[0].tolist() for key in EXPECTED} == EXPECTED and table.get("x/extra")[0].tolist() == [1]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow (test-only reference) not installed")
def test_parquet_beside_the_tar_is_read_instead_of_its_members(tmp_path):
    """img2dataset's per-shard parquet lists every URL of the shard, failed downloads too (status): those are not
    samples. The tars here carry other URLs in their .json members, so the labels show which was read."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tags, index, _ = write_fixture(tmp_path)
    shards = []
    for i, samples in enumerate(SHARDS):
        write_shard(tmp_path / f"{i:05d}.tar", [(key, "http://wrong.example/") for key, _ in samples])
        rows = [(key, url, "success") for key, url in samples] + [(f"{i:05d}9999", URL["e"], "failed_to_download")]
        pq.write_table(pa.table({"url": [r[1] for r in rows], "key": [r[0] for r in rows],
                                 "status": [r[2] for r in rows], "caption": ["c"] * len(rows)}),
                       tmp_path / f"{i:05d}.parquet")
        shards.append(str(tmp_path / f"{i:05d}.tar"))
    report = parse_tags.import_tags(tags, index, shards, str(tmp_path / "out"), no_bad_shards)
    assert report["not_success_skipped"] == 2 and report["samples"] == 9 and report["index_urls_found"] == 6
    assert decoded(tmp_path / "out")[1] == EXPECTED


def test_command_line_and_train_on_the_imported_tags(tmp_path, monkeypatch, capsys):
    """`parse_tags.py import` prints its report; train.py then trains on the labels: 6 of the 8 samples of the
    shard have tags (two URLs are not in the index), and every key is found."""
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
    assert report["samples"] == 8 and report["samples_without_tags"] == 2 and report["index_urls_found"] == 7
    assert "7 of 7 index URLs found in the shards (100.0%); 8 shard samples, 2 without tags (25.0%)" in printed.err
    torch.save(random_state_dict(TINY, seed=2), tmp_path / "clip.pt")
    train.main(base_args(tmp_path, tmp_path / "run", **{"--data": tmp_path / "00000.tar", "--labels": out,
                                                        "--batch-size": 8, "--steps": 1}))
    line = open(tmp_path / "run" / "log.txt").read().splitlines()[-1]
    assert " tagged 75.0% found 100.0% " in line, line
    assert os.path.isfile(tmp_path / "run" / "ckpt.pt")


def test_command_line_errors_are_one_line(tmp_path, monkeypatch):
    tags, index, shards = write_fixture(tmp_path)
    monkeypatch.setattr(sys, "argv", ["parse_tags.py", "import", "--tags", tags, "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="error: import needs --tags object_list.csv, --index"):
        parse_tags.main()
    monkeypatch.setattr(sys, "argv", ["parse_tags.py", "import", "--tags", tags, "--index", index, "--shards",
                                      str(tmp_path / "nothing-*.tar"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="error: no input files match"):
        parse_tags.main()
