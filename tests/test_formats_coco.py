"""COCO: RLE and polygon masks through pycocotools on hand-checked fixtures, instances json, COCO-IT csv."""
from __future__ import annotations

import json

import numpy as np
import pytest

from t2i_common import formats as F

from formats_helpers import pattern


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
