"""Bad input to the format readers and writers: each error names the file, the record and the field,
and says how to fix it (issue 13, section 4); written files honour the umask."""
from __future__ import annotations

import os
import pickle
import stat

import numpy as np
import pytest

from t2i_common import formats as F

from formats_helpers import pattern, solid


def vg(tmp_path, **fields):
    """A one-entry VG-Relation file over a 20x10 pattern image, with ``fields`` overriding the record."""
    rec = dict(image_path="1.png", bbox_x=3, bbox_y=2, bbox_w=5, bbox_h=4, relation_name="on",
               true_caption="the cup is on the table", false_caption="the table is on the cup")
    F.save_image(pattern(10, 20), tmp_path / "images" / "1.png")
    F._write_json(tmp_path / "visual_genome_relation.json", [dict(rec, **fields)])
    return tmp_path / "visual_genome_relation.json"


# ---------------------------------------------------------------------------- ARO VG boxes and fields
def test_vg_box_entirely_outside_the_image_is_an_error(tmp_path):
    vg(tmp_path, bbox_x=25, bbox_y=2)  # the image is 20 px wide
    with pytest.raises(F.FormatError, match=r"visual_genome_relation\.json: entry 0 fields bbox_x/bbox_y/bbox_w/"
                       r"bbox_h give the box \(25\.0, 2\.0, 30\.0, 6\.0\), entirely outside its image 1\.png "
                       r"\(20x10\)\. Fix: correct the bbox fields"):
        F.read_aro_vg(tmp_path)
    # without the up-front check, loading the crop raises (never a black image)
    item = F.read_aro_vg(tmp_path, check_images=False)[0]
    with pytest.raises(F.FormatError, match=r"crop box .* lies outside image .*1\.png of size 20x10 \(referenced "
                       r"by .*visual_genome_relation\.json entry 0\)\. Fix: correct the annotation's bbox"):
        item.images[0]


def test_vg_box_partly_outside_is_clipped_and_flagged(tmp_path):
    vg(tmp_path, bbox_x=16, bbox_y=7, bbox_w=8, bbox_h=8)  # right/bottom beyond the 20x10 image
    item = F.read_aro_vg(tmp_path)[0]
    assert item.meta["bbox_clipped"] == [16.0, 7.0, 24.0, 15.0]
    crop = np.asarray(item.images[0])
    assert np.array_equal(crop, pattern(10, 20)[7:10, 16:20])  # the inside part only: no black padding
    lazy = F.read_aro_vg(tmp_path, check_images=False)[0]  # the same rule when the crop is loaded lazily
    assert np.array_equal(np.asarray(lazy.images[0]), crop) and "bbox_clipped" not in lazy.meta
    inside = F.read_aro_vg(vg(tmp_path, bbox_x=3))[0]  # a box inside the image is untouched
    assert inside.image_refs[0].box == (3.0, 2.0, 8.0, 6.0) and "bbox_clipped" not in inside.meta


@pytest.mark.parametrize("field,value", [("bbox_w", "wide"), ("bbox_x", None), ("bbox_y", "nan"), ("bbox_h", [4])])
def test_vg_non_numeric_bbox_names_file_entry_field(tmp_path, field, value):
    want = "a finite number"
    vg(tmp_path, **{field: value})
    with pytest.raises(F.FormatError, match=rf"visual_genome_relation\.json: entry 0 field '{field}' is .*, not "
                       rf"{want}\. Fix: write {field} as {want}"):
        F.read_aro_vg(tmp_path)


def test_vg_caption_must_be_a_string(tmp_path):
    vg(tmp_path, false_caption=["the table", "the cup"])
    with pytest.raises(F.FormatError, match=r"relation\.json: entry 0 field 'false_caption' is \['the table'.*"
                       r"Fix: captions are non-empty strings"):
        F.read_aro_vg(tmp_path)


# ---------------------------------------------------------------------------- ARO order entries
@pytest.mark.parametrize("caption,what", [([], r"field 'caption' is \[\]"), (None, "field 'caption' is None"),
                                          (["a dog and a cat", ""], "caption 1 is ''"),
                                          (["a dog and a cat", 7], "caption 1 is 7")])
def test_order_entry_without_captions_is_an_error(tmp_path, caption, what):
    F._write_json(tmp_path / "coco_karpathy_test.json", [{"image": "a.png", "caption": ["the dog chases the cat"]},
                                                         {"image": "b.png", "caption": caption}])
    with pytest.raises(F.FormatError, match=rf"coco_karpathy_test\.json: entry 1 \(image 'b\.png'\) {what}\. Fix:"):
        F.read_aro_order(tmp_path / "coco_karpathy_test.json", check_images=False)


# ---------------------------------------------------------------------------- COCO instances
def instances(tmp_path, image=None, ann=None):
    im = {**dict(id=1, file_name="a.png", height=4, width=6), **(image or {})}
    a = {**dict(id=7, image_id=1, category_id=3, segmentation=[[0, 0, 2, 0, 2, 2, 0, 2]]), **(ann or {})}
    F._write_json(tmp_path / "inst.json",
                  {"images": [im], "annotations": [a], "categories": [{"id": 3, "name": "dog"}]})
    return tmp_path / "inst.json"


@pytest.mark.parametrize("seg", [[], [[]], {"size": [4, 6], "counts": [24]}, {"size": [4, 6], "counts": "h0"}])
def test_empty_segmentation_is_an_error(tmp_path, seg):
    path = instances(tmp_path, ann={"segmentation": seg})
    with pytest.raises(F.FormatError, match=r"inst\.json annotations\[0\] \(id 7\).*(no polygon|0 coordinates|covers "
                       r"no pixel).*Fix: "):
        F.coco_masks(path, 1, "dog")


def test_empty_segmentation_in_coco_it_names_the_row(tmp_path):
    path = instances(tmp_path, ann={"segmentation": {"size": [4, 6], "counts": [24]}})
    F.write_coco_it([dict(image_id=1, label="dog", caption="a dog", context="a ", word="dog")], tmp_path / "it.csv")
    with pytest.raises(F.FormatError, match=r"it\.csv row 0 \(Image ID 1, Label 'dog'\): .*inst\.json "
                       r"annotations\[0\] \(id 7\): field 'segmentation' covers no pixel of the 4x6 image\. "
                       r"Fix: remove the annotation"):
        F.read_coco_it(tmp_path / "it.csv", path)


def test_writer_refuses_an_empty_mask(tmp_path):
    with pytest.raises(ValueError, match=r"annotation 0: mask covers no pixel.*Fix: leave the annotation out"):
        F.write_coco_instances(tmp_path / "i.json", [dict(id=1, file_name="a.png", height=2, width=2)],
                               [dict(image_id=1, category_id=1, mask=np.zeros((2, 2), bool))], [dict(id=1, name="x")])


@pytest.mark.parametrize("image,ann,where", [({"height": "tall"}, None, r"images\[0\] field 'height' is 'tall'"),
                                             ({"id": "one"}, None, r"images\[0\] field 'id' is 'one'"),
                                             (None, {"image_id": 1.5}, r"annotations\[0\] field 'image_id' is 1\.5"),
                                             (None, {"category_id": "dog"}, r"annotations\[0\] field 'category_id'")])
def test_coco_non_numeric_fields_name_file_record_field(tmp_path, image, ann, where):
    path = instances(tmp_path, image, ann)
    with pytest.raises(F.FormatError, match=rf"inst\.json: {where}.*not an integer\. Fix: write"):
        F.read_coco_instances(path)


def test_coco_bad_polygon_coordinates(tmp_path):
    path = instances(tmp_path, ann={"segmentation": [[0, 0, 2, "x", 2, 2]]})
    with pytest.raises(F.FormatError, match=r"inst\.json annotations\[0\] \(id 7\): polygon 0 field 'segmentation' "
                       r"is 'x', not a finite number"):
        F.coco_masks(path, 1, "dog")
    path = instances(tmp_path, ann={"segmentation": [[0, 0, 2, 0]]})  # 4 numbers: pycocotools would read a bbox
    with pytest.raises(F.FormatError, match=r"annotations\[0\] \(id 7\): polygon 0 has 4 coordinates.*>= 3 points"):
        F.coco_masks(path, 1, "dog")


@pytest.mark.parametrize("counts,msg", [("T3", "sum to 100"), ("h", "ends inside a count"), ("~~", "invalid character"),
                                        ([30], "sum to 30"), ([10, -2, 16], "min -2"), (["a"], "'counts' is 'a'")])
def test_rle_checked_before_pycocotools_decodes(tmp_path, counts, msg):
    # pycocotools' C decoder writes runs without a bounds check: a count sum above H*W must never reach it
    path = instances(tmp_path, ann={"segmentation": {"size": [4, 6], "counts": counts}})
    with pytest.raises(F.FormatError, match=rf"inst\.json annotations\[0\] \(id 7\).*{msg}.*Fix: "):
        F.coco_masks(path, 1, "dog")


# ---------------------------------------------------------------------------- other readers
def test_winoground_non_numeric_num_main_preds(tmp_path):
    F.write_winoground([dict(id=0, caption_0="a b", caption_1="b a", image_0=solid((1, 1, 1)),
                             image_1=solid((2, 2, 2)))], tmp_path, "csv")
    text = (tmp_path / "winoground.csv").read_text().replace(",1,", ",many,")
    (tmp_path / "winoground.csv").write_text(text)
    with pytest.raises(F.FormatError, match=r"winoground\.csv: row 0 field 'num_main_preds' is 'many', not an "
                       r"integer\. Fix: write num_main_preds as an integer"):
        F.read_winoground(tmp_path / "winoground.csv")


def test_embedding_cache_non_numeric_vector(tmp_path):
    with open(tmp_path / "emb.pickle", "wb") as f:
        pickle.dump({"a.png": {"img_emb": ["x", "y"], "txt_emb": [1.0, 0.0]}}, f)
    with pytest.raises(F.FormatError, match=r"emb\.pickle: entry 'a\.png' field 'img_emb' is not numeric.*Fix: the "
                       r"cache must map"):
        F.read_embedding_cache(tmp_path / "emb.pickle")


def test_flickr_candidates_must_be_paths(tmp_path):
    F._write_json(tmp_path / "f.json", {"a dog": ["a.png", 3]})
    with pytest.raises(F.FormatError, match=r"f\.json: caption 'a dog' has candidates \['a\.png', 3\]\. Fix: the json"):
        F.read_flickr30k_retrieval(tmp_path / "f.json")
    F._write_json(tmp_path / "t.json", {"a.png": ["a dog", None]})
    with pytest.raises(F.FormatError, match=r"t\.json: image 'a\.png' has captions \['a dog', None\]\. Fix:"):
        F.read_flickr30k_text_retrieval(tmp_path / "t.json")


def test_clevr_pair_must_hold_captions(tmp_path):
    F._write_json(tmp_path / "captions" / "spatial.json", {"1.png": [["a red cube", 0]]})
    with pytest.raises(F.FormatError, match=r"spatial\.json: image '1\.png' pair 0 is \['a red cube', 0\]\. Fix:"):
        F.read_clevr(tmp_path)


def test_mmbias_phrases_must_be_a_list(tmp_path):
    F.write_mmbias(tmp_path, {"Christian": [solid((1, 1, 1))]}, ["good"], ["bad"])
    F._write_json(tmp_path / "textual_phrases.txt", {"pleasant_phrases": "good", "unpleasant_phrases": ["bad"]})
    with pytest.raises(F.FormatError, match=r"textual_phrases\.txt: field 'pleasant_phrases' is 'good'\. Fix: give a "
                       r"JSON list"):
        F.read_mmbias(tmp_path)


# ---------------------------------------------------------------------------- written files honour the umask
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        written = [F._write_json(tmp_path / "a.json", {"x": 1}),
                   F._write_csv(tmp_path / "b.csv", ["h"], [[1]]),
                   F.save_image(solid((1, 2, 3)), tmp_path / "c.png"),
                   F.write_embedding_cache({"a": {"img_emb": [1.0, 0.0], "txt_emb": [0.0, 1.0]}}, tmp_path / "e.pkl"),
                   *F.write_implosion_pickles([(pattern(4, 4), "t")], tmp_path / "imp")]
    finally:
        os.umask(old)
    for p in written:  # mkstemp alone would give 0600 whatever the umask
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~umask, p
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
