"""Round trips writer -> reader for the published formats (images, implosion pickles, Winoground,
CLEVR, SVO, ImageCoDe, Flickr30K, NegCLIP, MMBias), error messages and the Winoground scores.
ARO and COCO have their own files (test_formats_aro.py, test_formats_coco.py)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from t2i_common import formats as F

from formats_helpers import corrupt, pattern, px, solid


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
def test_candidate_scores_of_retrieval_items():
    import torch

    img = solid((255, 0, 0))
    text = F.MatchItem([img], ["a", "b", "c"], gold_caption=2)
    image = F.MatchItem([img, img], ["a"], gold_image=1)
    s_text = [[0.5, -1.0, 2.0]]
    for s in (s_text, np.array(s_text), torch.tensor(s_text, dtype=torch.bfloat16)):
        vec, gold = F.candidate_scores(text, s)
        assert vec.dtype == np.float64 and vec.tolist() == [0.5, -1.0, 2.0] and gold == 2
    vec, gold = F.candidate_scores(image, torch.tensor([[3.0], [4.0]]))
    assert vec.tolist() == [3.0, 4.0] and gold == 1
    with pytest.raises(ValueError, match="not a retrieval item"):
        F.candidate_scores(F.MatchItem([img, img], ["a", "b"]), np.zeros((2, 2)))


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
