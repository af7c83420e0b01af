"""The paper's ablations that need their own code path: the NLTK parser (Table 4: nouns as objects, adjectives as
attributes, through the LLM path's normalisation, records and vocabulary), `vocab --restrict-to` (Table 4's
Tag2Text rows). NLTK's tagger data is the user's download, so the tests train NLTK's own PerceptronTagger on a
small corpus tagged by hand and check captions labelled by hand. The long-tail losses (Table 6) are checked in
test_tagalign (formulas) and test_train (2 gloo processes)."""
import json
import os
import sys

import pytest

import parse_io
import parse_tags
import tag_rules
import train
from test_train import base_args, jpeg, samples, write_shard

# A small corpus tagged by hand (Penn Treebank tags), enough for the perceptron to learn these words.
CORPUS = [
    "a/DT small/JJ kitten/NN lying/VBG on/IN the/DT green/JJ grass/NN ./.",
    "two/CD red/JJ buses/NNS parked/VBN next/JJ to/TO a/DT tall/JJ building/NN ./.",
    "a/DT brown/JJ dog/NN and/CC a/DT teddy/NN bear/NN on/IN a/DT wooden/JJ table/NN",
    "the/DT old/JJ man/NN holds/VBZ a/DT blue/JJ umbrella/NN in/IN the/DT rain/NN",
    "John/NNP rides/VBZ a/DT black/JJ bicycle/NN down/IN the/DT street/NN",
    "a/DT red/JJ circle/NN on/IN a/DT plain/JJ background/NN",
    "a/DT large/JJ green/JJ square/NN and/CC a/DT small/JJ blue/JJ triangle/NN ./.",
    "there/EX is/VBZ a/DT yellow/JJ circle/NN in/IN the/DT picture/NN ./.",
    "a/DT dog/NN 's/POS red/JJ ball/NN in/IN the/DT man/NN 's/POS hand/NN",
]


def trained_tagger():
    from nltk.tag import PerceptronTagger
    tagger = PerceptronTagger(load=False)
    with train.seeded(0):  # the perceptron shuffles the corpus with Python's random
        tagger.train([[tuple(t.rsplit("/", 1)) for t in s.split()] for s in CORPUS], nr_iter=8)
    return tagger


def test_nltk_parser_tags_captions_labelled_by_hand():
    """Adjacent nouns form one object, adjectives are attributes, proper nouns are no objects; the answer goes
    through the LLM path's normalisation (plural -> singular, 'next' is no describing word)."""
    tagger = parse_tags.NltkTagger(trained_tagger())
    cases = {
        "a brown dog and a teddy bear on a wooden table": (["dog", "teddy bear", "table"], ["brown", "wooden"]),
        "two red buses parked next to a tall building.": (["bus", "building"], ["red", "tall"]),  # parked: VBN
        "John rides a black bicycle down the street": (["bicycle", "street"], ["black"]),
        "a large green square and a small blue triangle.": (["square", "triangle"],
                                                              ["large", "green", "small", "blue"]),
    }
    for caption, expected in cases.items():
        raw = tagger(caption)
        assert tag_rules.parse_answer(raw, caption) == expected, (caption, raw)
    assert tagger("the old man holds a blue umbrella in the rain") == "man, umbrella, rain | old, blue"
    # Penn Treebank tokens, as the tagger was trained on: the possessive is a token of its own
    assert tag_rules.parse_answer(tagger("the old man's blue umbrella"), "the old man's blue umbrella") == \
        (["man", "umbrella"], ["old", "blue"])


def test_nltk_data_missing_is_one_line(monkeypatch, tmp_path):
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(FileNotFoundError, match=r"^NLTK's tagger data is missing: run `python -m nltk.downloader "
                                                r"averaged_perceptron_tagger_eng`$"):
        parse_tags.NltkTagger()


def test_parse_with_nltk_end_to_end_then_restricted_vocab_and_training(tmp_path, monkeypatch, capsys):
    """`parse --parser nltk` on img2dataset shards (the demo's format): records, resume, merge, then
    `vocab --restrict-to` keeps only the listed tags, and train.py trains on the result."""
    import nltk.tag
    tagger = trained_tagger()
    monkeypatch.setattr(nltk.tag, "PerceptronTagger", lambda *a, **k: tagger)
    items = samples(12)  # "a red circle on a plain background", ...
    write_shard(tmp_path / "000000.tar", items)
    out = tmp_path / "tags"

    def cli(*argv):
        monkeypatch.setattr(sys, "argv", ["parse_tags.py", *argv, "--out", str(out)])
        parse_tags.main()
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    stats = cli("parse", "--parser", "nltk", "--input", str(tmp_path / "000000.tar"))
    assert stats.get("failed", 0) == 0
    records = [json.loads(l) for l in open(out / "parsed.0-of-1.jsonl")]
    assert [r["key"] for r in records] == [k for k, _, _ in items]
    first = records[0]  # "a red circle on a plain background"
    assert first["objects"] == ["circle", "background"] and first["attributes"] == ["red", "plain"]
    assert cli("parse", "--parser", "nltk", "--input", str(tmp_path / "000000.tar"))["resumed"] == 12
    settings = json.load(open(out / "parsed.0-of-1.settings.json"))
    assert settings["parser"] == "nltk"
    with pytest.raises(parse_io.SettingsMismatch, match="other settings"):  # no LLM records on NLTK ones
        parse_tags.parse_captions([("x", "a dog")], lambda text, strict=False: "dog | -", str(out),
                                  settings={"model_bytes": 1, "model_head": "0", "grounding": "all", "prompt": "p"})
    cli("merge")
    (tmp_path / "tag2text.txt").write_text("Circles\nsquare\nred\nblue\ngreen\nzebra\n")
    cli("vocab", "--restrict-to", str(tmp_path / "tag2text.txt"))
    vocab = json.load(open(out / "vocab.json"))
    assert [e["tag"] for e in vocab["objects"]] == ["circle", "square"]  # no background: not on the list
    assert sorted(e["tag"] for e in vocab["attributes"]) == ["blue", "green", "red"]
    assert vocab["restricted_to"]["entries"] == 6 and vocab["restricted_to"]["entries_used"] == 5  # no zebra
    import torch
    from conftest import TINY, random_state_dict
    torch.save(random_state_dict(TINY, seed=2), tmp_path / "clip.pt")
    train.main(base_args(tmp_path, tmp_path / "run", **{"--data": tmp_path / "000000.tar", "--labels": out,
                                                        "--steps": 1}))
    assert os.path.isfile(tmp_path / "run" / "ckpt.pt")
