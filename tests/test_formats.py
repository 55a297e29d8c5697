"""Round trips writer -> reader for every published format, error messages, and the metrics
(Winoground, ARO macro/micro), COCO RLE/polygon decoding and the ARO order perturbations."""
from __future__ import annotations

import itertools
import json
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from t2i_common import formats as F


# ---------------------------------------------------------------------------- helpers
def solid(rgb, size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, tuple(rgb))


def pattern(h: int, w: int) -> np.ndarray:
    """uint8 HxWx3 image whose pixel (y, x) is (x, y, x + 10 y) -> crops are checkable exactly."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x, y, x + 10 * y], axis=-1).astype(np.uint8)


def px(img: Image.Image) -> tuple:
    return np.asarray(img)[0, 0].tolist()


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image")
    return path


# ---------------------------------------------------------------------------- images / MatchItem
def test_read_images_errors_name_the_file(tmp_path):
    good = F.save_image(solid((1, 2, 3)), tmp_path / "a.png")
    assert px(F.read_images([good])[0]) == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        F.read_images([tmp_path / "missing.png"])
    with pytest.raises(F.FormatError, match="broken.png"):
        F.read_images([corrupt(tmp_path / "broken.png")])


def test_to_pil_rejects_float_arrays():
    with pytest.raises(F.FormatError, match="uint8"):
        F.to_pil(np.zeros((4, 4, 3), dtype=np.float32))
    assert F.to_pil(np.full((2, 3), 7, np.uint8)).size == (3, 2)


def test_match_item_validation_and_lazy_images(tmp_path):
    p = F.save_image(solid((9, 8, 7)), tmp_path / "x.png")
    item = F.MatchItem([str(p)], ["a", "b"], 0, 1, {"k": 1})
    assert isinstance(item.image_refs[0], F.ImageRef) and item.image_paths == [str(p)]
    assert px(item.images[0]) == [9, 8, 7] and item.task == "text"
    assert F.MatchItem([solid((0, 0, 0)), solid((1, 1, 1))], ["c"]).task == "image"
    with pytest.raises(ValueError, match="gold"):
        F.MatchItem([solid((0, 0, 0))], ["a"], gold_caption=1)
    p.unlink()
    assert len(item.images) == 1  # len() does not load
    with pytest.raises(FileNotFoundError, match="x.png"):
        item.images[0]
    with pytest.raises(FileNotFoundError, match="x.png"):
        list(item.images)


# ---------------------------------------------------------------------------- 1. implosion pickles
def test_implosion_pickles_round_trip(tmp_path):
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    pairs = [(pattern(4, 5), "a red circle"), (gray, "a gray square"), (solid((5, 6, 7), (2, 2)), "pil")]
    paths = F.write_implosion_pickles(pairs, tmp_path / "flat")
    got = F.read_implosion_pickles(str(tmp_path / "flat" / "*.pickle"))
    assert [g[0] for g in got] == sorted(paths)
    assert np.array_equal(got[0][1], pattern(4, 5)) and got[0][2] == "a red circle"
    assert np.array_equal(got[1][1], gray) and got[1][1].shape == (3, 4)
    assert got[2][1][0, 0].tolist() == [5, 6, 7]
    # class subfolders: PATH/*/*.pickle, and a folder argument finds them too
    F.write_implosion_pickles(pairs[:2], tmp_path / "cls", class_subfolders=["cat", "dog"])
    sub = F.read_implosion_pickles(str(tmp_path / "cls" / "*" / "*.pickle"))
    assert [p.parent.name for p, _, _ in sub] == ["cat", "dog"]
    assert [t for _, _, t in F.read_implosion_pickles(tmp_path / "cls")] == ["a red circle", "a gray square"]


def test_implosion_pickle_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        F.read_implosion_pickles(str(tmp_path / "nothing" / "*.pickle"))
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps({"img": np.zeros((2, 2, 3), np.uint8)}))
    with pytest.raises(F.FormatError, match=r"bad\.pickle.*'text'"):
        F.read_implosion_pickles(str(tmp_path / "*.pickle"))
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps({"img": np.zeros((2, 2, 3)), "text": "x"}))
    with pytest.raises(F.FormatError, match=r"bad\.pickle.*float64"):
        F.read_implosion_pickles(str(tmp_path / "*.pickle"))
    (tmp_path / "bad.pickle").write_bytes(b"garbage")
    with pytest.raises(F.FormatError, match="cannot unpickle"):
        F.read_implosion_pickle(tmp_path / "bad.pickle")


def test_class_pairs():
    imgs = ["i0", "i1"]
    assert F.class_pairs(imgs, ["cat", "dog"]) == [("i0", "cat"), ("i1", "dog")]
    assert F.class_pairs(imgs, [1, 0], "a photo of a {label}", class_names=["plane", "car"]) == \
        [("i0", "a photo of a car"), ("i1", "a photo of a plane")]
    with pytest.raises(ValueError):
        F.class_pairs(imgs, ["cat"])


def test_embedding_cache_round_trip_and_validation(tmp_path):
    v = np.array([0.6, 0.8, 0.0], np.float32)
    cache = {"a.pickle": {"img_emb": v, "txt_emb": v[[1, 0, 2]]}, "b.pickle": {"img_emb": v, "txt_emb": v}}
    path = F.write_embedding_cache(cache, tmp_path / "emb.pkl")
    assert [p.name for p in tmp_path.iterdir()] == ["emb.pkl"]  # atomic: no temporary file left
    got = F.read_embedding_cache(path)
    assert set(got) == {"a.pickle", "b.pickle"} and np.allclose(got["a.pickle"]["txt_emb"], [0.8, 0.6, 0])
    bad = {"a": {"img_emb": v}}
    with pytest.raises(F.FormatError, match="txt_emb"):
        F.write_embedding_cache(bad, tmp_path / "x.pkl")
    (tmp_path / "wrong_d.pkl").write_bytes(pickle.dumps(
        {"a": {"img_emb": v, "txt_emb": v}, "b": {"img_emb": np.ones(2) / 2 ** .5, "txt_emb": v}}))
    with pytest.raises(F.FormatError, match=r"wrong_d\.pkl.*d=2"):
        F.read_embedding_cache(tmp_path / "wrong_d.pkl")
    with pytest.raises(F.FormatError, match="norm"):
        F.write_embedding_cache({"a": {"img_emb": 2 * v, "txt_emb": v}}, tmp_path / "n.pkl")
    F.write_embedding_cache({"a": {"img_emb": 2 * v, "txt_emb": v}}, tmp_path / "n.pkl", check_norm=None)
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        F.read_embedding_cache(tmp_path / "nope.pkl")
    with pytest.raises(F.FormatError, match="no items"):
        F.write_embedding_cache({}, tmp_path / "e.pkl")


# ---------------------------------------------------------------------------- 2. ARO
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
    items = F.read_aro_vg(tmp_path)
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
    assert items[1].meta == {"aro_task": "coco_order", "image": "val2014/a.png", "entry": 0, "caption_index": 1}
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
    F.write_aro_order(entries, tmp_path, "flickr_order", images={n: solid((3, 3, 3)) for n in ("a.png", "b.png", "c.png")})
    items = F.read_aro_order(tmp_path / "flickr30k_test.json")
    assert [(it.meta["entry"], it.meta["caption_index"]) for it in items] == [(0, 1), (1, 0)]
    assert [(d["entry"], d["caption_index"], d["caption"]) for d in items.dropped] == \
        [(0, 0, "a red dog"), (0, 2, "dog"), (2, 0, "cat")]
    assert len(items[:1]) == 1 and len(items.dropped) == 3
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


# ---------------------------------------------------------------------------- 3. Winoground
def wino_rows():
    return [dict(id=0, caption_0="a dog bites a man", caption_1="a man bites a dog", image_0=solid((10, 0, 0)),
                 image_1=solid((20, 0, 0)), tag="Noun", secondary_tag="", num_main_preds=1, collapsed_tag="Object"),
            dict(id=1, caption_0="red over blue", caption_1="blue over red", image_0=solid((30, 0, 0)),
                 image_1=solid((40, 0, 0)), tag="Adjective-Color", secondary_tag="Symbolic", num_main_preds=2,
                 collapsed_tag="Relation")]


@pytest.mark.parametrize("fmt,name", [("jsonl", "examples.jsonl"), ("json", "data.json"), ("csv", "winoground.csv")])
def test_winoground_round_trip(tmp_path, fmt, name):
    path = F.write_winoground(wino_rows(), tmp_path, fmt)
    assert path.name == name and (tmp_path / "images" / "ex_1_img_0.png").is_file()
    items = F.read_winoground(path)
    assert [it.captions for it in items] == [["a dog bites a man", "a man bites a dog"],
                                             ["red over blue", "blue over red"]]
    assert [px(i)[0] for i in items[1].images] == [30, 40] and items[1].task == "group"
    assert items[1].meta == {"id": 1, "tag": "Adjective-Color", "secondary_tag": "Symbolic", "num_main_preds": 2,
                             "collapsed_tag": "Relation"}


def test_winoground_diffusionitm_data_json_without_image_columns(tmp_path):
    F.write_winoground(wino_rows(), tmp_path, "json")
    rows = json.loads((tmp_path / "data.json").read_text())
    F._write_json(tmp_path / "data.json", [{k: v for k, v in r.items() if not k.startswith("image")} for r in rows])
    items = F.read_winoground(tmp_path / "data.json")
    assert [px(i)[0] for i in items[0].images] == [10, 20]
    # in-memory rows with PIL images (HF datasets)
    mem = F.winoground_items(wino_rows())
    assert px(mem[0].images[1])[0] == 20


def test_winoground_errors(tmp_path):
    path = F.write_winoground(wino_rows(), tmp_path, "csv")
    (tmp_path / "images" / "ex_1_img_1.png").unlink()
    with pytest.raises(FileNotFoundError, match="ex_1_img_1"):
        F.read_winoground(path)
    F._write_csv(tmp_path / "w.csv", ["id", "caption_0"], [[0, "x"]])
    with pytest.raises(F.FormatError, match=r"w\.csv.*caption_1"):
        F.read_winoground(tmp_path / "w.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(F.FormatError, match=r"e\.jsonl has no items"):
        F.read_winoground(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        F.read_winoground(tmp_path / "nothing.jsonl")


def test_winoground_scores_hand_made():
    s = np.array([
        [[2, 0], [0, 2]],   # all correct
        [[2, 1], [3, 4]],   # text: 2>3 false; image: 2>1 and 4>3 -> image only
        [[2, 3], [1, 4]],   # text: 2>1 and 4>3 -> text only; image: 2>3 false
        [[1, 0], [0, 1]],   # all correct
        [[1, 1], [0, 1]],   # tie s(c0,i0) = s(c0,i1): text 1>0,1>1? no; image 1>1 no -> both fail
        [[1, 0], [1, 2]],   # tie s(c0,i0) = s(c1,i0): text fails; image 1>0 and 2>1 -> image only
    ], dtype=float)
    r = F.winoground_scores(s, per_example=True)
    assert r["text_correct"].tolist() == [True, False, True, True, False, False]
    assert r["image_correct"].tolist() == [True, True, False, True, False, True]
    assert r["group_correct"].tolist() == [True, False, False, True, False, False]
    assert (r["text"], r["image"], r["group"], r["n"]) == (pytest.approx(3 / 6), pytest.approx(4 / 6),
                                                           pytest.approx(2 / 6), 6)
    assert F.winoground_scores(np.ones((3, 2, 2))) == {"text": 0.0, "image": 0.0, "group": 0.0, "n": 3}
    with pytest.raises(ValueError, match="shape"):
        F.winoground_scores(np.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        F.winoground_scores(np.full((1, 2, 2), np.nan))


# ---------------------------------------------------------------------------- 4. COCO
def test_rle_literal_examples_verified_by_hand():
    # mask (3x3)      column-major: col0 000, col1 111, col2 001 -> counts [3, 3, 2, 1]
    # 0 1 0           string: 3 -> '3', 3 -> '3', 2 -> '2', then 1 - counts[1] = -2:
    # 0 1 0           -2 & 0x1f = 30 (sign bit 0x10 set), -2 >> 5 = -1 -> last group,
    # 0 1 1           chr(30 + 48) = 'N'
    mask = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 1]], bool)
    assert F.rle_encode(mask) == {"size": [3, 3], "counts": [3, 3, 2, 1]}
    assert F.rle_counts_to_string([3, 3, 2, 1]) == "332N"
    assert np.array_equal(F.rle_decode({"size": [3, 3], "counts": "332N"}), mask)
    # 100 = 3 * 32 + 4 -> groups 4 (+0x20 'more') = 36 -> 'T', then 3 -> '3'
    assert F.rle_counts_to_string([100]) == "T3" and F.rle_string_to_counts("T3") == [100]
    assert not F.rle_decode({"size": [10, 10], "counts": "T3"}).any()
    # a mask starting with a 1 begins with a zero-length run
    assert F.rle_encode(np.ones((2, 2), bool))["counts"] == [0, 4]


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(100):
        h, w = rng.integers(1, 30, size=2)
        m = rng.random((h, w)) < rng.random()
        r = F.rle_encode(m)
        assert np.array_equal(F.rle_decode(r), m)
        s = F.rle_counts_to_string(r["counts"])
        assert F.rle_string_to_counts(s) == r["counts"]
        assert np.array_equal(F.rle_decode({"size": r["size"], "counts": s.encode()}), m)
    with pytest.raises(F.FormatError, match="sum"):
        F.rle_decode({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(F.FormatError, match="ends inside"):
        F.rle_string_to_counts("T")


def test_polygon_masks_pixel_centre_rule():
    rect = F.polygons_to_mask([[2, 2, 6, 2, 6, 5, 2, 5]], 8, 8)
    exp = np.zeros((8, 8), bool)
    exp[2:5, 2:6] = True  # rows y=2..4, cols x=2..5: area 12 = polygon area
    assert np.array_equal(rect, exp)
    tri = F.polygons_to_mask([[0, 0, 4, 0, 0, 4]], 4, 4)  # centre (x+.5, y+.5) inside iff x + y < 3
    assert np.array_equal(tri, np.add.outer(np.arange(4), np.arange(4)) < 3)
    two = F.polygons_to_mask([[0, 0, 1, 0, 1, 1, 0, 1], [3, 3, 4, 3, 4, 4, 3, 4]], 4, 4)
    assert two.sum() == 2 and two[0, 0] and two[3, 3]
    with pytest.raises(F.FormatError, match="polygon"):
        F.polygons_to_mask([[0, 0, 1]], 4, 4)


def coco_fixture(tmp_path, compress=False):
    h, w = 4, 6
    dog_rle = np.zeros((h, w), bool)
    dog_rle[0:2, 4:6] = True
    cat = np.zeros((h, w), bool)
    cat[3, 0] = True
    images = [{"id": 397133, "file_name": "000000397133.png", "height": h, "width": w}]
    anns = [{"image_id": 397133, "category_id": 18, "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},  # dog polygon
            {"image_id": 397133, "category_id": 18, "mask": dog_rle, "iscrowd": 1},
            {"image_id": 397133, "category_id": 17, "mask": cat}]
    cats = [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"}]
    path = F.write_coco_instances(tmp_path / "annotations" / "instances_val2017.json", images, anns, cats, compress)
    F.save_image(pattern(h, w), tmp_path / "val2017" / "000000397133.png")
    dog = dog_rle.copy()
    dog[0:2, 0:2] = True
    return path, dog, cat


@pytest.mark.parametrize("compress", [False, True])
def test_coco_instances_masks(tmp_path, compress):
    path, dog, cat = coco_fixture(tmp_path, compress)
    data = json.loads(path.read_text())
    counts = data["annotations"][1]["segmentation"]["counts"]
    assert isinstance(counts, str) == compress
    assert data["annotations"][1]["area"] == 4 and data["annotations"][1]["bbox"] == [4, 0, 2, 2]
    assert np.array_equal(F.coco_masks(path, 397133, "dog"), dog)
    assert np.array_equal(F.coco_masks(path, 397133, "cat"), cat)
    big = F.coco_masks(path, 397133, "dog", shape=(8, 12))
    assert np.array_equal(big, np.kron(dog, np.ones((2, 2), bool)))
    with pytest.raises(KeyError, match="zebra"):
        F.coco_masks(path, 397133, "zebra")
    with pytest.raises(KeyError, match="12345"):
        F.coco_masks(path, 12345, "dog")


def test_coco_instances_errors(tmp_path):
    F._write_json(tmp_path / "inst.json", {"images": [], "categories": []})
    with pytest.raises(F.FormatError, match=r"inst\.json.*annotations"):
        F.read_coco_instances(tmp_path / "inst.json")
    ann = {"image_id": 1, "category_id": 1, "segmentation": {"size": [3, 3], "counts": [9]}}
    F._write_json(tmp_path / "inst2.json", {"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
                                            "annotations": [ann], "categories": [{"id": 1, "name": "dog"}]})
    with pytest.raises(F.FormatError, match="RLE size"):
        F.coco_masks(tmp_path / "inst2.json", 1, "dog")


def test_coco_it_round_trip(tmp_path):
    path, dog, _ = coco_fixture(tmp_path)
    rows = [dict(image_id=397133, label="dog", caption="A dog by a cat.", context="A  by a cat.", word="dog"),
            dict(image_id=397133, label="cat", caption="A dog by a cat.", context="A dog by a .", word="cat")]
    csv_path = F.write_coco_it(rows, tmp_path / "COCO-IT.csv")
    assert csv_path.read_text().splitlines()[0] == "Image ID,Label,correct_obj+context,context,correct_obj"
    items = F.read_coco_it(csv_path, path, tmp_path / "val2017", mask_shape=(8, 12))
    assert [(i.caption, i.context, i.word, i.label) for i in items] == \
        [("A dog by a cat.", "A  by a cat.", "dog", "dog"), ("A dog by a cat.", "A dog by a .", "cat", "cat")]
    assert np.array_equal(items[0].mask, np.kron(dog, np.ones((2, 2), bool)))
    assert np.array_equal(np.asarray(items[0].image), pattern(4, 6))
    # COCO-WL layout: context_ and an unnamed word-type column; labels are words -> no masks
    wl = [dict(image_id=397133, label="run", caption="A dog runs.", context="A dog  .", word="runs",
               context_="A dog _ .", word_type="verb")]
    wl_path = F.write_coco_it(wl, tmp_path / "COCO-WL.csv")
    assert wl_path.read_text().splitlines()[0].endswith("correct_obj,context_,")
    got = F.read_coco_it(wl_path, image_dir=tmp_path / "x", check_images=False)
    assert (got[0].context_, got[0].word_type, got[0].mask) == ("A dog _ .", "verb", None)
    assert got[0].image_ref.path == tmp_path / "x" / "000000397133.jpg"
    with pytest.raises(F.FormatError, match=r"COCO-WL\.csv.*row 0.*'run'.*instances=None"):
        F.read_coco_it(wl_path, path)


def test_coco_it_errors(tmp_path):
    F._write_csv(tmp_path / "c.csv", ["Image ID", "Label", "correct_obj+context", "context"], [[1, "dog", "a", "b"]])
    with pytest.raises(F.FormatError, match=r"c\.csv.*correct_obj"):
        F.read_coco_it(tmp_path / "c.csv")
    F._write_csv(tmp_path / "e.csv", list(F.COCO_IT_COLUMNS), [])
    with pytest.raises(F.FormatError, match=r"e\.csv has no items"):
        F.read_coco_it(tmp_path / "e.csv")
    with pytest.raises(FileNotFoundError, match="none.csv"):
        F.read_coco_it(tmp_path / "none.csv")


# ---------------------------------------------------------------------------- 5. CLEVR
def test_clevr_round_trip_and_errors(tmp_path):
    pairs = {"spatial": {"CLEVR_0.png": [["On the left is a red cube.", "On the right is a red cube."]]},
             "recognition_color": {"CLEVR_0.png": [["A red cube.", "A blue cube."], ["A green ball.", "A red ball."]],
                                   "CLEVR_1.png": [["A gray cylinder.", "A cyan cylinder."]]}}
    F.write_clevr(tmp_path, pairs, {"CLEVR_0.png": solid((3, 3, 3)), "CLEVR_1.png": solid((4, 4, 4))})
    items = F.read_clevr(tmp_path)
    assert [it.meta["subtask"] for it in items] == ["recognition_color"] * 3 + ["spatial"]  # published order
    assert items[1].captions == ["A green ball.", "A red ball."] and items[1].gold_caption == 0
    assert px(items[2].images[0]) == [4, 4, 4]
    assert len(F.read_clevr(tmp_path, ["spatial"])) == 1
    with pytest.raises(FileNotFoundError, match="binding_color_shape.json"):
        F.read_clevr(tmp_path, ["binding_color_shape"])
    F._write_json(tmp_path / "captions" / "spatial.json", {"CLEVR_0.png": [["only one"]]})
    with pytest.raises(F.FormatError, match=r"spatial\.json.*pair 0"):
        F.read_clevr(tmp_path, ["spatial"])
    with pytest.raises(FileNotFoundError, match="captions"):
        F.read_clevr(tmp_path / "nowhere")


# ---------------------------------------------------------------------------- 6. SVO
SVO_ROWS = [dict(pos_id="0.jpg", neg_id="1.jpg", sentence="Girl is standing in the grass.",
                 pos_triplet="girl,stand,grass",
                 neg_triplet="dog,stand,grass", neg_type="subj"),
            dict(pos_id="6.jpg", neg_id="7.jpg", sentence="A car passes another on a street.",
                 pos_triplet="car,pass,street", neg_triplet="car,hit,street", neg_type="verb")]


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_svo_round_trip(tmp_path, fmt):
    imgs = {n: solid((10 * i, 0, 0)) for i, n in enumerate(["0.jpg", "1.jpg", "6.jpg", "7.jpg"])}
    path = F.write_svo(SVO_ROWS, tmp_path, imgs, fmt)
    items = F.read_svo(path)
    assert [it.captions for it in items] == [["Girl is standing in the grass."], ["A car passes another on a street."]]
    assert items[1].task == "image" and items[1].gold_image == 0 and items[1].meta["neg_triplet"] == "car,hit,street"
    reds = [px(i)[0] for i in items[1].images]
    assert abs(reds[0] - 20) <= 2 and abs(reds[1] - 30) <= 2  # JPEG, as published
    assert [it.meta["neg_type"] for it in F.read_svo(path, neg_types=["verb"])] == ["verb"]
    with pytest.raises(F.FormatError, match="no items"):
        F.read_svo(path, neg_types=["obj"])


def test_svo_errors(tmp_path):
    F._write_json(tmp_path / "svo.json", [{k: v for k, v in SVO_ROWS[0].items() if k != "neg_type"}])
    with pytest.raises(F.FormatError, match=r"svo\.json.*neg_type"):
        F.read_svo(tmp_path / "svo.json")
    F._write_json(tmp_path / "svo.json", SVO_ROWS[:1])
    with pytest.raises(FileNotFoundError, match="0.jpg"):
        F.read_svo(tmp_path / "svo.json")


# ---------------------------------------------------------------------------- 7. ImageCoDe
def test_imagecode_round_trip(tmp_path):
    sets = {"open-images-42": [solid((k, 0, 0)) for k in range(12)], "video-7": [solid((0, k, 0)) for k in range(10)]}
    desc = {"open-images-42": {2: "the third one", 11: "the last one"}, "video-7": {0: "first"}}
    path = F.write_imagecode(tmp_path, sets, desc, image_ext=".png")
    assert path.name == "valid_data.json"
    items = F.read_imagecode(path)
    assert len(items) == 3 and all(it.task == "image" for it in items)
    last = items[1]
    assert last.gold_image == 11 and last.captions == ["the last one"] and len(last.image_refs) == 12
    assert [px(i)[0] for i in last.images] == list(range(12))  # img10, img11 sorted numerically after img9
    assert [it.meta["set"] for it in F.read_imagecode(path, static_only=True)] == ["open-images-42"] * 2
    F._write_json(path, {"video-7": {"12": "x"}})
    with pytest.raises(F.FormatError, match="index 12"):
        F.read_imagecode(path)
    F._write_json(path, {"missing-set": {"0": "x"}})
    with pytest.raises(FileNotFoundError, match="missing-set"):
        F.read_imagecode(path)


# ---------------------------------------------------------------------------- 8. Flickr30K
def test_flickr30k_retrieval_round_trip(tmp_path):
    for k in range(4):
        F.save_image(solid((k, k, k)), tmp_path / "datasets" / "flickr30k" / "images" / f"{k}.jpg")
    rel = [f"datasets/flickr30k/images/{k}.jpg" for k in range(4)]
    entries = [("a dog", [rel[0], rel[1], rel[2]]), ("a dog again", [rel[0], rel[3], rel[1]]),
               ("a cat", [rel[1], rel[0], rel[2]])]
    path = F.write_flickr30k_retrieval(entries, tmp_path / "datasets" / "flickr30k" / "val_top10_RN50x64.json")
    items = F.read_flickr30k_retrieval(path, image_root=tmp_path)
    assert [it.captions[0] for it in items] == ["a dog", "a dog again", "a cat"]
    assert items[2].meta["image_paths"] == [rel[1], rel[0], rel[2]] and items[2].gold_image == 0
    assert [it.captions[0] for it in F.read_flickr30k_retrieval(path, image_root=tmp_path, stride=2)] == \
        ["a dog", "a cat"]
    F._write_json(tmp_path / "list.json", [{"caption": c, "images": p} for c, p in entries])
    assert len(F.read_flickr30k_retrieval(tmp_path / "list.json")) == 3
    with pytest.raises(FileNotFoundError, match="0.jpg"):
        F.read_flickr30k_retrieval(path)  # default root = json folder: wrong for these paths
    with pytest.raises(ValueError, match="duplicate caption"):
        F.write_flickr30k_retrieval([("x", rel), ("x", rel)], tmp_path / "d.json")
    tpath = F.write_flickr30k_text_retrieval([(rel[0], ["a dog", "a cat"]), (rel[1], ["a cat", "a dog"])],
                                             tmp_path / "val_top10_RN50x64_text.json")
    titems = F.read_flickr30k_text_retrieval(tpath)
    assert titems[1].captions == ["a cat", "a dog"] and px(titems[1].images[0]) == [1, 1, 1]


# ---------------------------------------------------------------------------- 9. NegCLIP tsv
def test_negclip_tsv_round_trip(tmp_path):
    rows = [F.NegClipRow("A dog's ball.", "coco/val2014/a.jpg", ["A ball's dog .", 'say "hi"'], [1]),
            {"title": "A cat.", "filepath": "coco/val2014/b.jpg", "neg_captions": ["A tac."], "neg_images": [0, 1]}]
    path = F.write_negclip_tsv(rows, tmp_path / "train_neg_clip.tsv")
    assert path.read_text().splitlines()[0] == "\ttitle\tfilepath\tneg_caption\tneg_image"
    got = F.read_negclip_tsv(path)
    assert got[0] == rows[0] and got[1] == F.NegClipRow("A cat.", "coco/val2014/b.jpg", ["A tac."], [0, 1])
    with pytest.raises(ValueError, match="row indices"):
        F.write_negclip_tsv([F.NegClipRow("t", "f", [], [3])], tmp_path / "x.tsv")


def test_negclip_tsv_published_quoting_and_errors(tmp_path):
    # two rows in the published style (pandas to_csv: python-literal lists, csv-quoted when needed)
    text = ("\ttitle\tfilepath\tneg_caption\tneg_image\n"
            "0\tA toilet in a bathroom.\tcoco/val2014/COCO_val2014_000000360772.jpg\t"
            "['A bathroom sitting in a toilet .']\t[1]\n"
            "1\tA white truck filled with motorcycle on it's flatbed.\tcoco/val2014/COCO_val2014_000000551952.jpg\t"
            "\"[\"\"A white motorcycle filled with truck on it 's flatbed .\"\"]\"\t[0, 1]\n")
    (tmp_path / "p.tsv").write_text(text)
    got = F.read_negclip_tsv(tmp_path / "p.tsv")
    assert got[1].neg_captions == ["A white motorcycle filled with truck on it 's flatbed ."]
    assert got[1].neg_images == [0, 1] and got[0].title == "A toilet in a bathroom."
    (tmp_path / "bad.tsv").write_text(text.replace("[0, 1]", "[0, 9]"))
    with pytest.raises(F.FormatError, match=r"bad\.tsv.*row 1.*neg_image"):
        F.read_negclip_tsv(tmp_path / "bad.tsv")
    (tmp_path / "bad2.tsv").write_text(text.replace("['A bathroom sitting in a toilet .']", "not a list"))
    with pytest.raises(F.FormatError, match=r"bad2\.tsv.*row 0.*neg_caption"):
        F.read_negclip_tsv(tmp_path / "bad2.tsv")
    (tmp_path / "cols.tsv").write_text("title\tfilepath\n")
    with pytest.raises(F.FormatError, match=r"cols\.tsv.*neg_caption"):
        F.read_negclip_tsv(tmp_path / "cols.tsv")


# ---------------------------------------------------------------------------- 10. MMBias and gender bias
def test_mmbias_round_trip_and_errors(tmp_path):
    imgs = {"Christian": [solid((1, 0, 0)), solid((2, 0, 0))], "Muslim": [solid((3, 0, 0))],
            "circles": [solid((4, 0, 0))]}
    F.write_mmbias(tmp_path, imgs, ["joy", "love"], ["agony"], image_ext=".png")
    mb = F.read_mmbias(tmp_path)
    assert sorted(mb.groups) == ["Christian", "Muslim", "circles"] and len(mb.groups["Christian"]) == 2
    assert mb.categories == {"Christian": "Religion", "Muslim": "Religion", "circles": "Other"}
    assert (mb.pleasant, mb.unpleasant) == (["joy", "love"], ["agony"])
    assert px(F.read_images(mb.groups["Muslim"])[0]) == [3, 0, 0]
    assert list(F.read_mmbias(tmp_path, ["Muslim"]).groups) == ["Muslim"]
    with pytest.raises(FileNotFoundError, match="Jewish"):
        F.read_mmbias(tmp_path, ["Jewish"])
    F._write_json(tmp_path / "textual_phrases.txt", {"pleasant_phrases": ["x"]})
    with pytest.raises(F.FormatError, match=r"textual_phrases\.txt.*unpleasant_phrases"):
        F.read_mmbias(tmp_path)
    with pytest.raises(FileNotFoundError, match="textual_phrases.txt"):
        F.read_mmbias(tmp_path / "nowhere")


def test_gender_bias(tmp_path):
    assert F.GENDER_WORD_PAIRS == {"clothes": ("suit", "apron"), "bags": ("briefcase", "purse"),
                                   "drinks": ("beer", "wine")}
    images = {w: {"male": [solid((1, 1, 1))] * 2, "female": [solid((2, 2, 2))]}
              for ws in F.GENDER_WORD_PAIRS.values() for w in ws}
    F.write_gender_bias(tmp_path, images, image_ext=".png")
    rows = F.read_gender_bias(tmp_path)
    assert len(rows) == 18
    suit = [r for r in rows if r["path"].parent.name == "suit-images"]
    assert [(r["path"].name, r["gender"], r["target"]) for r in suit] == \
        [("1.png", "male", "clothes"), ("2.png", "male", "clothes"), ("7.png", "female", "clothes")]
    with pytest.raises(ValueError, match="at most 6"):
        F.write_gender_bias(tmp_path / "x", {"suit": {"male": [solid((0, 0, 0))] * 7}})
    with pytest.raises(FileNotFoundError, match="apron-images"):
        F.read_gender_bias(tmp_path / "nowhere")


def test_writers_leave_no_temporary_files(tmp_path):
    F.write_winoground(wino_rows(), tmp_path, "jsonl")
    F.write_svo(SVO_ROWS, tmp_path, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples.jsonl", "images", "svo.json"]
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
