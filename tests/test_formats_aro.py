"""ARO: VG-Relation / VG-Attribution round trips and accuracies, the order perturbations, the
COCO-Order / Flickr-Order reader (dropped captions) and the POS tagger dispatch (spaCy or lexicon)."""
from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from t2i_common import formats as F

from formats_helpers import corrupt, pattern, px, solid


def vg_records(kind="relation"):
    base = dict(image_path="1.png", bbox_x=3, bbox_y=2, bbox_w=5, bbox_h=4, image=pattern(10, 20),
                true_caption="the cup is on the table", false_caption="the table is on the cup")
    if kind == "relation":
        second = {k: v for k, v in base.items() if k != "image"}  # same image: 'image' only needed once
        return [dict(base, relation_name="on"), dict(second, relation_name="next to", bbox_x=0, bbox_y=0)]
    return [dict(base, attributes=["red", "blue"]), dict(base, attributes=["big", "small"])]


def test_aro_vg_round_trip_and_bbox_crop(tmp_path):
    F.write_aro_vg(vg_records(), tmp_path)
    items = F.read_aro_vg(tmp_path, "relation")
    assert len(items) == 2 and (tmp_path / "images" / "1.png").is_file()
    it = items[0]
    assert it.captions == ["the table is on the cup", "the cup is on the table"] and it.gold_caption == 1
    assert it.meta == {"aro_task": "vg_relation", "index": 0, "image_path": "1.png", "relation_name": "on"}
    crop = np.asarray(it.images[0])
    assert crop.shape == (4, 5, 3) and np.array_equal(crop, pattern(10, 20)[2:6, 3:8])
    assert np.array_equal(np.asarray(items[1].images[0]), pattern(10, 20)[0:4, 0:5])
    F.write_aro_vg(vg_records("attribution"), tmp_path, "attribution")
    att = F.read_aro_vg(tmp_path / "visual_genome_attribution.json", "attribution")
    assert att[1].meta["attributes"] == ["big", "small"] and att[1].meta["attribute_pair"] == "big_small"


def test_aro_vg_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="visual_genome_relation.json"):
        F.read_aro_vg(tmp_path)
    recs = [{k: v for k, v in r.items() if k != "image"} for r in vg_records()]
    del recs[1]["bbox_w"]
    F._write_json(tmp_path / "visual_genome_relation.json", recs)
    with pytest.raises(F.FormatError, match=r"visual_genome_relation\.json.*entry 1.*bbox_w"):
        F.read_aro_vg(tmp_path)
    F._write_json(tmp_path / "visual_genome_relation.json", recs[:1])
    with pytest.raises(FileNotFoundError, match="1.png"):  # image folder missing
        F.read_aro_vg(tmp_path)
    corrupt(tmp_path / "images" / "1.png")
    with pytest.raises(F.FormatError, match=r"1\.png.*entry 0"):  # found while reading (the boxes are checked)
        F.read_aro_vg(tmp_path)
    items = F.read_aro_vg(tmp_path, check_images=False)
    with pytest.raises(F.FormatError, match=r"1\.png.*entry 0"):
        items[0].images[0]
    F._write_json(tmp_path / "visual_genome_relation.json", [])
    with pytest.raises(F.FormatError, match="has no items"):
        F.read_aro_vg(tmp_path)


def test_aro_symmetric_list_is_aros():
    assert len(F.ARO_SYMMETRIC_RELATIONS) == 157  # the notebook list has 157 distinct names
    assert {"next to", "near", "with", "of", "wrapped in"} <= F.ARO_SYMMETRIC_RELATIONS
    assert not {"on", "above", "below", "behind", "to the left of"} & F.ARO_SYMMETRIC_RELATIONS


def test_aro_accuracy_macro_vs_micro():
    rel = ["on"] * 4 + ["above"] * 2 + ["next to"] * 3
    correct = [1, 0, 0, 0] + [1, 1] + [0, 0, 0]
    metas = [{"aro_task": "vg_relation", "relation_name": r} for r in rel]
    # macro: mean(on 1/4, above 2/2); 'next to' is symmetric and excluded. micro: 3 / 9.
    assert F.aro_accuracy(metas, correct, "macro") == pytest.approx(0.625)
    assert F.aro_accuracy(metas, correct, "micro") == pytest.approx(1 / 3)
    table = F.aro_group_accuracy(metas, correct)
    assert table.set_index("group").loc["next to", "included"] == False  # noqa: E712
    att = [["red", "blue"]] * 3 + [["big", "small"]]
    metas_a = [{"aro_task": "vg_attribution", "attributes": a} for a in att]
    ca = [1, 1, 0, 0]
    assert F.aro_accuracy(metas_a, ca, vga_min_count=2) == pytest.approx(2 / 3)  # big_small has 1 < 2 items
    assert F.aro_accuracy(metas_a, ca, vga_min_count=1) == pytest.approx((2 / 3 + 0) / 2)
    assert F.aro_accuracy(metas_a, ca, "micro") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="vga_min_count"):
        F.aro_accuracy(metas_a, ca)  # ARO's default 25 excludes every pair here
    with pytest.raises(ValueError, match="mix"):
        F.aro_accuracy(metas + metas_a, correct + ca)
    order = [{"aro_task": "coco_order"}] * 4
    assert F.aro_accuracy(order, [1, 1, 1, 0]) == F.aro_accuracy(order, [1, 1, 1, 0], "micro") == 0.75


def test_normalize_caption():
    assert F.normalize_caption('A Dog (brown)  runs!  "fast"; ok: yes~') == "a dog brown runs fast ok yes"
    assert F.normalize_caption("a, b.") == "a, b"
    assert F.normalize_caption(" ".join(str(i) for i in range(40))) == " ".join(str(i) for i in range(30))
    assert F.normalize_caption("one two three", max_words=2) == "one two"


CAPTIONS = ["A small red circle is to the left of a big blue square.",
            "Two young men ride old bikes on a wet street near the tall green trees",
            "a cat"]


@pytest.mark.parametrize("fn", F.ORDER_PERTURBATIONS)
def test_order_perturbations_keep_words_and_are_seeded(fn):
    for cap in CAPTIONS:
        tokens = F.tokenize(cap)
        outs = {seed: fn(cap, np.random.default_rng(seed)) for seed in range(6)}
        for out in outs.values():
            assert Counter(out.split(" ")) == Counter(tokens)
        assert fn(cap, np.random.default_rng(3)) == outs[3]
    long_outs = {fn(CAPTIONS[1], np.random.default_rng(s)) for s in range(6)}
    assert len(long_outs) > 1  # the seed matters


def test_order_perturbation_structure():
    cap = CAPTIONS[1]
    toks = F.tokenize(cap)
    tags = F.LexiconTagger()(toks)
    assert tags[toks.index("men")] == "NOUN" and tags[toks.index("young")] == "ADJ" and tags[0] == "OTHER"
    rng = np.random.default_rng(0)
    out = F.shuffle_nouns_and_adj(cap, rng).split(" ")
    for kind in ("NOUN", "ADJ", "OTHER"):
        pos = [i for i, t in enumerate(tags) if t == kind]
        if kind == "OTHER":
            assert [out[i] for i in pos] == [toks[i] for i in pos]  # untouched
        else:
            assert Counter(out[i] for i in pos) == Counter(toks[i] for i in pos)
    out = F.shuffle_allbut_nouns_and_adj(cap, rng).split(" ")
    keep = [i for i, t in enumerate(tags) if t != "OTHER"]
    assert [out[i] for i in keep] == [toks[i] for i in keep]
    out = F.shuffle_within_trigrams(cap, rng).split(" ")
    for s in range(0, len(toks), 3):
        assert Counter(out[s:s + 3]) == Counter(toks[s:s + 3])
    out = F.shuffle_trigrams(cap, rng).split(" ")
    grams = [toks[s:s + 3] for s in range(0, len(toks), 3)]
    orders = [perm for perm in itertools.permutations(range(len(grams)))
              if sum((grams[j] for j in perm), []) == out]
    assert orders and orders[0] != tuple(range(len(grams)))  # a reordering of the original trigrams
    # a custom tagger calling everything a noun makes perturbation 2 the identity
    all_nouns = lambda ws: ["NOUN"] * len(ws)  # noqa: E731
    assert F.shuffle_allbut_nouns_and_adj(cap, rng, all_nouns) == " ".join(toks)
    with pytest.raises(ValueError, match="pos_tagger"):
        F.shuffle_nouns_and_adj(cap, rng, lambda ws: ["VERB"] * len(ws))


def test_aro_order_round_trip(tmp_path):
    entries = [{"image": "val2014/a.png", "caption": CAPTIONS[:2]},
               {"image": "val2014/b.png", "caption": CAPTIONS[2:] + ["the dog chases the cat"]}]
    F.write_aro_order(entries, tmp_path, "coco_order",
                      images={"val2014/a.png": solid((1, 1, 1)), "val2014/b.png": solid((2, 2, 2))})
    items = F.read_aro_order(tmp_path / "coco_karpathy_test.json", seed=7)
    assert len(items) == 3 and all(len(it.captions) == 5 and it.gold_caption == 0 for it in items)
    # "a cat" has one noun: no noun/adjective shuffle can change it, so it is dropped and reported
    assert items.dropped == [{"entry": 1, "caption_index": 0, "caption": "a cat",
                              "perturbation": "shuffle_nouns_and_adj"}]
    assert items[2].meta["caption_index"] == 1
    assert items[0].captions[0] == "a small red circle is to the left of a big blue square"
    assert items[1].meta == {"aro_task": "coco_order", "image": "val2014/a.png", "entry": 0, "caption_index": 1,
                             "pos_tagger": F.pos_tagger_name()}
    assert items.pos_tagger == F.pos_tagger_name() in ("lexicon", F.default_pos_tagger().name)
    assert px(items[2].images[0]) == [2, 2, 2]
    for it in items:
        words = Counter(it.captions[0].split())
        assert all(Counter(c.split()) == words for c in it.captions[1:])  # no ',' in these captions
    again = F.read_aro_order(tmp_path / "coco_karpathy_test.json", seed=7)
    assert [it.captions for it in again] == [it.captions for it in items]
    other = F.read_aro_order(tmp_path / "coco_karpathy_test.json", seed=8)
    assert [it.captions for it in other] != [it.captions for it in items]
    # the perturbations of a caption do not depend on the other entries (seed = [seed, entry, caption])
    F._write_json(tmp_path / "sub" / "flickr30k_test.json", entries[:1])
    sub = F.read_aro_order(tmp_path / "sub" / "flickr30k_test.json", image_root=tmp_path, seed=7)
    assert [it.captions for it in sub] == [it.captions for it in items[:2]]
    assert sub[0].meta["aro_task"] == "flickr_order"


def test_order_options_never_reproduce_the_caption():
    # a two-noun caption: the plain noun shuffle is the identity for half the seeds; redrawn here
    for cap in ("a dog and a cat", "a red cube and a blue ball", CAPTIONS[0]):
        for seed in range(40):
            opts = F.order_caption_options(cap, seed)
            assert all(F.tokenize(o) != F.tokenize(opts[0]) for o in opts[1:]), (cap, seed, opts)
            assert all(Counter(F.tokenize(o)) == Counter(F.tokenize(opts[0])) for o in opts[1:])
    # a draw that changes the caption is kept: the first draw is the plain seeded perturbation
    rng = np.random.default_rng(11)
    assert F.order_caption_options(CAPTIONS[1], 11)[1:] == [F.normalize_caption(fn(CAPTIONS[1], rng))
                                                            for fn in F.ORDER_PERTURBATIONS]


def test_order_options_unshufflable_caption():
    with pytest.raises(F.NoOrderNegative, match=r"'a red dog'.*shuffle_nouns_and_adj.*Fix") as e:
        F.order_caption_options("a red dog", 0)
    assert e.value.perturbation == "shuffle_nouns_and_adj"
    # every token a noun: perturbation 2 ("all but nouns and adjectives") has nothing to permute
    with pytest.raises(F.NoOrderNegative, match="shuffle_allbut_nouns_and_adj"):
        F.order_caption_options("dog cat", 0, pos_tagger=lambda ws: ["NOUN"] * len(ws))
    with pytest.raises(ValueError, match="max_tries"):
        F.order_caption_options("a dog and a cat", 0, max_tries=0)


def test_aro_order_drop_count(tmp_path):
    entries = [{"image": "a.png", "caption": ["a red dog", "the dog chases the cat", "dog"]},
               {"image": "b.png", "caption": "a man rides a horse on the beach"},
               {"image": "c.png", "caption": ["cat"]}]
    F.write_aro_order(entries, tmp_path, "flickr_order",
                      images={n: solid((3, 3, 3)) for n in ("a.png", "b.png", "c.png")})
    items = F.read_aro_order(tmp_path / "flickr30k_test.json")
    assert [(it.meta["entry"], it.meta["caption_index"]) for it in items] == [(0, 1), (1, 0)]
    assert [(d["entry"], d["caption_index"], d["caption"]) for d in items.dropped] == \
        [(0, 0, "a red dog"), (0, 2, "dog"), (2, 0, "cat")]
    head = items[:1]  # read_gdbench's max_items slice keeps the file's drop count and tagger
    assert len(head) == 1 and head.dropped == items.dropped and head.pos_tagger == items.pos_tagger
    F._write_json(tmp_path / "flickr30k_test.json", entries[2:])
    with pytest.raises(F.FormatError, match=r"flickr30k_test\.json has no items.*1 caption\(s\) were dropped"):
        F.read_aro_order(tmp_path / "flickr30k_test.json")


def test_aro_order_errors(tmp_path):
    F._write_json(tmp_path / "coco_karpathy_test.json", [{"image": "a.png"}])
    with pytest.raises(F.FormatError, match=r"coco_karpathy_test\.json.*'caption'"):
        F.read_aro_order(tmp_path / "coco_karpathy_test.json")
    F._write_json(tmp_path / "coco_karpathy_test.json", [{"image": "a.png", "caption": ["the dog chases the cat"]}])
    with pytest.raises(FileNotFoundError, match="a.png"):
        F.read_aro_order(tmp_path / "coco_karpathy_test.json")
    F._write_json(tmp_path / "coco_karpathy_test.json", [])
    with pytest.raises(F.FormatError, match="no items"):
        F.read_aro_order(tmp_path / "coco_karpathy_test.json")
    (tmp_path / "coco_karpathy_test.json").write_text("[{")
    with pytest.raises(F.FormatError, match="not valid JSON"):
        F.read_aro_order(tmp_path / "coco_karpathy_test.json")


# ---------------------------------------------------------------------------- POS tagger dispatch
class _FakeDoc(list):
    """Stands in for spacy.tokens.Doc: a list of tokens with .text and .tag_."""

    def __init__(self, vocab, words):
        super().__init__(type("Tok", (), {"text": w, "tag_": ""})() for w in words)
        self.vocab = vocab


def _fake_spacy(load):
    """A fake ``spacy`` package (module + ``spacy.tokens``) whose ``load`` is ``load``."""
    import types

    spacy = types.ModuleType("spacy")
    tokens = types.ModuleType("spacy.tokens")
    tokens.Doc = _FakeDoc
    spacy.tokens, spacy.load = tokens, load
    return {"spacy": spacy, "spacy.tokens": tokens}


class _FakeNLP:
    """A pipeline tok2vec -> tagger -> parser; the tagger tags from a fixed table, the parser must never run."""

    meta = {"lang": "en", "name": "core_web_sm", "version": "9.9.9"}
    vocab = object()
    TAGS = {"dog": "NN", "dogs": "NNS", "red": "JJ", "bigger": "JJR", "runs": "VBZ", "Paris": "NNP"}

    def __init__(self):
        def tagger(doc):
            for t in doc:
                t.tag_ = self.TAGS.get(t.text, "DT")
            return doc

        def parser(doc):
            raise AssertionError("the pipeline must stop after the tagger")

        self.pipeline = [("tok2vec", lambda doc: doc), ("tagger", tagger), ("parser", parser)]


@pytest.fixture
def fresh_default_tagger(monkeypatch):
    from t2i_common.formats import captions

    monkeypatch.setattr(captions, "_DEFAULT_TAGGERS", {})
    return captions


def test_penn_tags_map_as_aro():
    assert [F.penn_to_pos(t) for t in ("NN", "NNS", "NNP", "NNPS", "JJ", "JJR", "JJS", "VBZ", "RB", "DT", "")] == \
        ["NOUN"] * 4 + ["ADJ"] * 3 + ["OTHER"] * 4


def test_default_tagger_is_spacy_when_installed(monkeypatch, fresh_default_tagger):
    import sys

    loaded = []
    for name, mod in _fake_spacy(lambda model: loaded.append(model) or _FakeNLP()).items():
        monkeypatch.setitem(sys.modules, name, mod)
    tagger = F.default_pos_tagger()
    assert isinstance(tagger, F.SpacyTagger) and loaded == ["en_core_web_sm"]
    assert F.default_pos_tagger() is tagger and loaded == ["en_core_web_sm"]  # loaded once per process
    assert F.pos_tagger_name() == "spacy:en_core_web_sm-9.9.9"
    assert tagger(["the", "red", "dog", "runs", "bigger", "dogs", "Paris"]) == \
        ["OTHER", "ADJ", "NOUN", "OTHER", "ADJ", "NOUN", "NOUN"]
    # the reader uses it and says so; with spaCy tags "runs" is no noun, so perturbation 1 swaps dog/dogs only
    opts = F.order_caption_options("the red dog runs after dogs", 0)
    assert opts[1] == "the red dogs runs after dog"


def test_default_tagger_falls_back_to_the_lexicon(monkeypatch, fresh_default_tagger):
    import sys

    monkeypatch.setitem(sys.modules, "spacy", None)  # spaCy not installed: import raises ImportError
    assert isinstance(F.default_pos_tagger(), F.LexiconTagger) and F.pos_tagger_name() == "lexicon"

    def no_model(model):
        raise OSError(f"[E050] Can't find model '{model}'")

    fresh_default_tagger._DEFAULT_TAGGERS.clear()
    for name, mod in _fake_spacy(no_model).items():
        monkeypatch.setitem(sys.modules, name, mod)
    assert isinstance(F.default_pos_tagger(), F.LexiconTagger)  # spaCy without en_core_web_sm


def test_reader_states_the_tagger(tmp_path):
    F.write_aro_order([{"image": "a.png", "caption": ["the dog chases the cat"]}], tmp_path,
                      images={"a.png": solid((1, 1, 1))})

    def odd_positions_are_nouns(words):
        return ["NOUN" if i % 2 else "OTHER" for i in range(len(words))]

    items = F.read_aro_order(tmp_path / "coco_karpathy_test.json", pos_tagger=odd_positions_are_nouns)
    assert items.pos_tagger == "odd_positions_are_nouns" == items[0].meta["pos_tagger"]
    lex = F.read_aro_order(tmp_path / "coco_karpathy_test.json", pos_tagger=F.LexiconTagger())
    assert lex.pos_tagger == "lexicon" == F.pos_tagger_name(F.LexiconTagger())


def test_spacy_tagger_with_the_real_model():
    spacy = pytest.importorskip("spacy")
    try:
        nlp = spacy.load(F.SPACY_MODEL)
    except OSError:
        pytest.skip(f"spaCy is installed but not its {F.SPACY_MODEL} model")
    tags = F.SpacyTagger(nlp)(F.tokenize("a small red circle is to the left of a big blue square"))
    assert [w for w, t in zip(F.tokenize("a small red circle is to the left of a big blue square"), tags)
            if t == "NOUN"] == ["circle", "left", "square"]
