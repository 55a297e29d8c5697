"""The toy world read back through the published-format readers, against its ground truth."""
import numpy as np
import pytest

from t2i_common import formats, toyworld
from t2i_common.toyworld import export as toyexport


def test_implosion_roundtrip_and_poison(tmp_path):
    glob, poisoned = toyexport.export_implosion(tmp_path / "imp", 40, seed=3, poison_rate=0.25)
    pairs = formats.read_implosion_pickles(glob)
    assert len(pairs) == 40 and poisoned.sum() == 10
    clean = toyworld.make_samples(40, 3)
    for (path, img, text), s, p in zip(pairs, clean, poisoned):
        assert np.array_equal(img, s.image)
        assert (text != s.captions[0]) == bool(p)  # exactly the poisoned captions changed
        if p:
            assert not toyworld.check_prompt(img, text)["both"] or len(s.scene.objects) > 1


def test_class_dataset(tmp_path):
    glob = toyexport.export_implosion_classes(tmp_path / "cls", 12, seed=0)
    pairs = formats.read_implosion_pickles(glob)
    for path, img, text in pairs:
        assert text == f"a photo of a {path.parent.name}"
        assert toyworld.classify_object(img)[1] == path.parent.name


@pytest.mark.parametrize("kind", ["relation", "attribution"])
def test_aro_vg_true_caption_matches_image(tmp_path, kind):
    items = formats.read_aro_vg(toyexport.export_aro_vg(tmp_path, 10, 0, kind).parent, kind)
    assert len(items) == 10
    for it in items:
        img = np.asarray(it.images[0])
        true, false = it.captions[it.gold_caption], it.captions[1 - it.gold_caption]
        assert true != false and sorted(true.split()) == sorted(false.split())
        if kind == "attribution":  # the checker binds colours to shapes: only the true caption passes
            assert toyworld.check_prompt(img, true.replace(" and ", " and "))["both"]


def test_order_winoground_clevr_cocoit(tmp_path):
    items = formats.read_aro_order(toyexport.export_aro_order(tmp_path / "o", 3, 0),
                                   pos_tagger=toyexport.toy_pos_tagger)
    assert all(len(it.captions) == 5 and it.gold_caption == 0 for it in items)
    assert all(sorted(c.split()) == sorted(it.captions[0].split()) for it in items for c in it.captions)
    wino = formats.read_winoground(toyexport.export_winoground(tmp_path / "w", 4, 0))
    for it in wino:
        for k in (0, 1):
            assert toyworld.check_prompt(np.asarray(it.images[k]), it.captions[k])["both"]
    clevr = formats.read_clevr(toyexport.export_clevr(tmp_path / "c", 6, 0))
    assert {i.meta["subtask"] for i in clevr} >= {"recognition_color", "recognition_shape",
                                                   "pair_binding_color", "spatial"}
    for it in clevr:
        if it.meta["subtask"].startswith("recognition"):
            img = np.asarray(it.images[0])
            assert toyworld.check_prompt(img, it.captions[0])["both"]
            assert not toyworld.check_prompt(img, it.captions[1])["both"]
    csv, inst, imgs = toyexport.export_coco_it(tmp_path / "coco", 8, 0)
    rows = formats.read_coco_it(csv, inst, imgs)
    samples = toyworld.make_samples(8, 70, kinds=("single", "pair", "triple"))
    by_id = {100000 + i: s for i, s in enumerate(samples)}
    assert rows
    for r in rows:  # the COCO mask of the Label is exactly the word's ground-truth pixels
        s = by_id[r.image_id]
        gt = next(m for w, t, m in s.word_masks[0] if w == r.word)
        assert np.array_equal(r.mask.astype(bool), gt)
        assert r.word_type in ("noun", "colour")


@pytest.mark.parametrize("task", ["coco_order", "flickr_order"])
@pytest.mark.parametrize("tagger", [None, toyexport.toy_pos_tagger])
def test_order_export_has_no_tied_negative(tmp_path, task, tagger):
    # before the fix, 43 of the 100 COCO-Order items of this export held a "negative" equal to the caption
    items = formats.read_aro_order(toyexport.export_aro_order(tmp_path, 50, 0, task), pos_tagger=tagger)
    assert items.dropped == [] and len(items) > 90
    for it in items:
        assert len(set(it.captions)) > 1 and all(c != it.captions[0] for c in it.captions[1:]), it.captions


def test_negclip_pairs(tmp_path):
    rows = formats.read_negclip_tsv(toyexport.export_negclip(tmp_path, 3, 0))
    assert len(rows) == 6
    for i, r in enumerate(rows):
        j = r.neg_images[0]
        assert rows[j].neg_images[0] == i and rows[j].title == r.neg_captions[0]


def test_flickr_retrieval(tmp_path):
    items = formats.read_flickr30k_retrieval(toyexport.export_flickr_retrieval(tmp_path, 6, 0))
    assert items and all(len(it.images) == 10 and it.gold_image == 0 for it in items)
    assert all(toyworld.check_prompt(np.asarray(it.images[0]), it.captions[0])["both"] for it in items)


def test_bad_kind(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        toyexport.export_aro_vg(tmp_path, 2, 0, "colour")
