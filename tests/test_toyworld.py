"""Tests of the toy world generator, its negatives, variants and the automatic checker."""
from collections import Counter

import numpy as np
import pytest

from t2i_common import toyworld as tw


@pytest.fixture(scope="module")
def samples():
    return tw.make_samples(300, seed=7)


def test_constants_fixed():
    assert list(tw.COLOURS) == ["red", "green", "blue", "yellow", "purple"]
    assert tw.COLOURS["purple"] == (150, 60, 190) and tw.BACKGROUND == (118, 118, 118)
    assert tw.SHAPES == ("circle", "square", "triangle", "diamond")
    assert tw.SIZES == {"small": 8, "large": 14}
    assert tw.VOCAB == sorted(tw.VOCAB) and {"a", "an", "and", "photo", "of", "_"} <= set(tw.VOCAB)


def test_deterministic_and_prefix_stable():
    a = tw.make_samples(40, seed=3)
    b = tw.make_samples(40, seed=3)
    c = tw.make_samples(15, seed=3)
    d = tw.make_samples(40, seed=4)
    for x, y in zip(a, b):
        assert x.image.tobytes() == y.image.tobytes() and x.captions == y.captions and x.scene == y.scene
    for x, y in zip(a, c):
        assert x.image.tobytes() == y.image.tobytes() and x.captions == y.captions
    assert sum(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, d)) > 30
    assert tw.make_sample(3, 22).captions == a[22].captions


def test_images_masks_exact(samples):
    kinds = Counter(s.scene.kind for s in samples)
    assert set(kinds) == set(tw.KINDS)
    bg = np.array(tw.BACKGROUND)
    for s in samples:
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert s.masks.shape == (len(s.scene.objects), 32, 32) and s.masks.dtype == bool
        assert s.masks.sum(0).max() <= 1  # no overlap
        for obj, m in zip(s.scene.objects, s.masks):
            assert (s.image[m] == tw.COLOURS[obj.colour]).all()
            ys, xs = np.nonzero(m)
            x0, y0, x1, y1 = obj.bbox
            # the mask fills its bbox exactly (no empty border rows) and stays 1 px inside the image
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            assert x0 >= 1 and y0 >= 1 and x1 <= 31 and y1 <= 31 and x1 - x0 == tw.SIZES[obj.size]
        backgr = ~s.masks.any(0)
        assert np.abs(s.image[backgr].astype(int) - bg).max() <= 6
        # bounding boxes keep >= 2 px gap
        objs = s.scene.objects
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, b = objs[i].bbox, objs[j].bbox
                assert b[0] >= a[2] + 2 or a[0] >= b[2] + 2 or b[1] >= a[3] + 2 or a[1] >= b[3] + 2
        if len(objs) > 1:
            assert len({o.colour for o in objs}) == len(objs) and len({o.shape for o in objs}) == len(objs)


def test_shape_fill_fractions():
    fill = {s: tw.shape_mask(s, (0, 0, 14, 14), 14, 14).mean() for s in tw.SHAPES}
    assert fill["square"] == 1.0
    assert abs(fill["circle"] - np.pi / 4) < 0.06
    assert abs(fill["triangle"] - 0.5) < 0.08 and abs(fill["diamond"] - 0.5) < 0.08
    tri = tw.shape_mask("triangle", (0, 0, 14, 14), 14, 14).sum(1)
    dia = tw.shape_mask("diamond", (0, 0, 14, 14), 14, 14).sum(1)
    assert (np.diff(tri) >= 0).all() and tri[0] < tri[-1]  # widens downwards (apex up)
    assert dia[0] == dia[-1] and dia.argmax() in (6, 7)


def test_relations_unambiguous(samples):
    pairs = [s for s in samples if s.scene.kind == "pair"]
    assert len(pairs) > 40
    for s in pairs:
        i, rel, j = s.scene.relation
        a, b = s.scene.objects[i], s.scene.objects[j]
        if rel == "to the left of":
            assert a.bbox[2] + 2 <= b.bbox[0] and abs(a.cy - b.cy) <= (b.cx - a.cx) / 2
        elif rel == "to the right of":
            assert b.bbox[2] + 2 <= a.bbox[0] and abs(a.cy - b.cy) <= (a.cx - b.cx) / 2
        elif rel == "above":
            assert a.bbox[3] + 2 <= b.bbox[1] and abs(a.cx - b.cx) <= (b.cy - a.cy) / 2
        else:
            assert b.bbox[3] + 2 <= a.bbox[1] and abs(a.cx - b.cx) <= (a.cy - b.cy) / 2


def _truth(scene, objs):
    return {(scene.objects[k].colour, scene.objects[k].shape) for k in objs}


def test_captions_and_word_masks(samples):
    converse_seen = 0
    for s in samples:
        assert len(s.captions) == len(tw.TEMPLATES[s.scene.kind])
        for cap, words in zip(s.captions, s.word_masks):
            assert cap == cap.lower() == " ".join(cap.split()) and cap.startswith("a ")
            assert [w for w, _, _ in words] == cap.split()
            for w, t, m in words:
                assert tw.WORD_TYPES[w] == t
                if t in ("article", "conjunction"):
                    assert m is None
                elif t == "relation":
                    assert (m == s.masks.any(0)).all() and len(s.scene.objects) == 2
                else:
                    # the word's mask is one object's mask, and that object has this attribute
                    k = [q for q in range(len(s.masks)) if (s.masks[q] == m).all()]
                    assert len(k) == 1
                    o = s.scene.objects[k[0]]
                    assert w == {"noun": o.shape, "colour": o.colour, "size": o.size}[t]
        sc = s.scene
        assert s.captions[0] == tw.caption_for(sc, 0, None) or sc.kind != "single"
        if sc.kind == "single":
            o = sc.objects[0]
            assert s.captions == [f"a {o.colour} {o.shape}", f"a {o.size} {o.colour} {o.shape}"]
        if sc.kind == "pair":
            i, rel, j = sc.relation
            a, b = sc.objects[i], sc.objects[j]
            fwd = f"a {a.colour} {a.shape} {rel} a {b.colour} {b.shape}"
            back = f"a {b.colour} {b.shape} {tw.CONVERSE[rel]} a {a.colour} {a.shape}"
            assert s.captions[0] in (fwd, back)
            converse_seen += s.captions[0] == back
    assert converse_seen > 10


def test_vocab_covers_every_generated_word(samples):
    words = set()
    for s in samples:
        for c in s.captions:
            words |= set(c.split())
        if len(s.scene.objects) > 1:
            words |= set(" ".join(tw.attribute_swap(s.scene)).split())
        if s.scene.relation:
            words |= set(" ".join(tw.relation_swap(s.scene)).split())
    for p in tw.class_prompts("shape") + tw.class_prompts("colour"):
        words |= set(p.split())
    words |= set(tw.omit_word("a red circle", "red", "_").split())
    assert words <= set(tw.VOCAB)
    assert set(tw.VOCAB) - words == {"an"}


def test_attribute_and_relation_swap():
    rng = np.random.default_rng(0)
    sc = tw.random_scene(rng, "pair", colours=["red", "blue"], shapes=["circle", "square"],
                         sizes=["small", "large"], relation="to the left of")
    assert tw.attribute_swap(sc) == ("a red circle and a blue square", "a blue circle and a red square")
    assert tw.attribute_swap(sc, "size") == ("a small red circle and a large blue square",
                                             "a large red circle and a small blue square")
    true, false = tw.relation_swap(sc)
    assert (true, false) == ("a red circle to the left of a blue square", "a blue square to the left of a red circle")
    assert tw.relation_swap(sc, with_colour=False)[1] == "a square to the left of a circle"
    img, _ = tw.render(sc, 0)
    assert tw.check_prompt(img, true)["relation_ok"] and not tw.check_prompt(img, false)["relation_ok"]
    with pytest.raises(ValueError):
        tw.attribute_swap(tw.random_scene(rng, "single"))
    same = tw.random_scene(rng, "pair", sizes=["large", "large"])
    with pytest.raises(ValueError, match="same size"):
        tw.attribute_swap(same, "size")


def test_relation_swap_by_centroids(samples):
    for s in samples:
        if s.scene.relation is None:
            continue
        true, false = tw.relation_swap(s.scene)
        assert sorted(true.split()) == sorted(false.split()) and true != false
        assert tw.check_prompt(s.image, true)["relation_ok"]
        assert not tw.check_prompt(s.image, false)["relation_ok"]


def test_order_shuffles():
    cap = "a red circle to the left of a blue square"
    outs = tw.order_shuffles(cap, seed=1)
    assert outs == tw.order_shuffles(cap, seed=1) and len(outs) == 4
    for o in outs:
        assert o != cap and sorted(o.split()) == sorted(cap.split())
    toks, n0 = cap.split(), outs[0].split()
    content = [k for k, w in enumerate(toks) if tw.WORD_TYPES[w] in ("noun", "colour", "size")]
    assert [n0[k] for k in range(len(toks)) if k not in content] == [toks[k] for k in range(len(toks)) if k not in content]
    n1 = outs[1].split()
    assert [n1[k] for k in content] == [toks[k] for k in content]
    n2 = outs[2].split()
    assert len(toks) == 10  # trigrams of 3, 3, 3 and 1 words
    for k in range(0, 10, 3):
        assert sorted(n2[k:k + 3]) == sorted(toks[k:k + 3])
    trigrams = sorted(tuple(toks[k:k + 3]) for k in range(0, 10, 3))
    n3 = outs[3].split()
    # trigram order shuffle: the output is a concatenation of the original trigrams
    pos, got = 0, []
    for _ in range(4):
        piece = next(t for t in trigrams if tuple(n3[pos:pos + len(t)]) == t and t not in got)
        got.append(piece)
        pos += len(piece)
    assert sorted(got) == trigrams and pos == 10
    for cap in ("a red circle and a blue square", "a green square and a blue circle and a yellow triangle"):
        assert all(o != cap and sorted(o.split()) == sorted(cap.split()) for o in tw.order_shuffles(cap, 5))


def test_winoground_quadruples():
    items = tw.winoground_quadruples(12, seed=2)
    assert len(items) == 12
    again = tw.winoground_quadruples(12, seed=2)
    for (i0, i1, c0, c1), (j0, j1, d0, d1) in zip(items, again):
        assert i0.tobytes() == j0.tobytes() and i1.tobytes() == j1.tobytes() and (c0, c1) == (d0, d1)
    for img0, img1, cap0, cap1 in items:
        assert cap0 != cap1 and sorted(cap0.split()) == sorted(cap1.split())
        assert img0.tobytes() != img1.tobytes()

        def true(img, cap):
            r = tw.check_prompt(img, cap)
            return r["both"] and r["relation_ok"] and r["count_ok"]

        assert true(img0, cap0) and true(img1, cap1)
        assert not true(img1, cap0) and not true(img0, cap1)


def test_prompts_and_word_interventions():
    assert tw.class_prompts() == ["a photo of a circle", "a photo of a square", "a photo of a triangle",
                                  "a photo of a diamond"]
    assert tw.class_prompts("colour")[0] == "a photo of a red object" and len(tw.class_prompts("colour")) == 5
    assert tw.omit_word("a red circle and a blue square", "circle") == "a red and a blue square"
    assert tw.omit_word("a red circle", "red", placeholder="_") == "a _ circle"
    assert tw.swap_word("a red circle", "circle", "square") == "a red square"
    with pytest.raises(ValueError, match="does not occur"):
        tw.omit_word("a red circle", "blue")
    with pytest.raises(ValueError):
        tw.class_prompts("texture")


def test_poison_rate_and_mismatch(samples):
    out, poisoned = tw.poison(samples, 0.25, seed=1)
    assert poisoned.sum() == round(0.25 * len(samples)) and len(out) == len(samples)
    for s, o, p in zip(samples, out, poisoned):
        assert o.image is s.image
        if p:
            assert all(c != d for c, d in zip(o.captions, s.captions))
            assert not tw.check_prompt(o.image, o.captions[0])["both"]
        else:
            assert o.captions == s.captions and tw.check_prompt(o.image, o.captions[0])["both"]
    out2, poisoned2 = tw.poison(samples, 0.25, seed=1)
    assert (poisoned2 == poisoned).all() and [o.captions for o in out2] == [o.captions for o in out]
    # concept-limited poisoning: only images containing a circle, only circle words changed
    out, poisoned = tw.poison(samples, 0.5, seed=2, concepts=["circle"])
    has_circle = np.array([any(o.shape == "circle" for o in s.scene.objects) for s in samples])
    assert poisoned.sum() == round(0.5 * has_circle.sum()) and not (poisoned & ~has_circle).any()
    for s, o, p in zip(samples, out, poisoned):
        if p:
            assert "circle" not in " ".join(o.captions)
            assert tw.swap_word(s.captions[0], "circle", "square") == o.captions[0]
    with pytest.raises(ValueError, match="not shapes"):
        tw.poison(samples, 0.1, 0, concepts=["dog"])


def test_rare_concept_exactly_k():
    concept = ("purple", "diamond")
    samples, idx = tw.rare_concept(200, 3, concept, seed=5)
    assert len(samples) == 200 and len(idx) == 3
    holders = [i for i, s in enumerate(samples) if any((o.colour, o.shape) == concept for o in s.scene.objects)]
    assert holders == sorted(idx.tolist())
    for i in idx:
        assert samples[i].captions[0] == "a purple diamond"
    held = tw.make_samples(200, 5, exclude_combinations=[("red", "circle")])
    assert not any((o.colour, o.shape) == ("red", "circle") for s in held for o in s.scene.objects)


def _single_images(n, seed):
    s = tw.make_samples(n, seed, kinds=("single",))
    return [x.image for x in s], [(x.scene.objects[0].colour, x.scene.objects[0].shape) for x in s], s


def test_checker_clean_and_noisy():
    images, truth, samples = _single_images(500, seed=11)
    assert len(set(truth)) == 20
    clean = np.mean([tw.classify_object(im) == t for im, t in zip(images, truth)])
    assert clean >= 0.99
    rng = np.random.default_rng(0)
    noisy = [np.clip(im + rng.normal(0, 10, im.shape), 0, 255).astype(np.uint8) for im in images]
    acc = np.mean([tw.classify_object(im) == t for im, t in zip(noisy, truth)])
    assert acc >= 0.99
    # classify_object with the ground-truth mask
    assert all(tw.classify_object(s.image, s.masks[0]) == t for s, t in zip(samples[:50], truth))
    # check_prompt accepts the true prompt and rejects wrong colour / shape
    for im, (c, s) in zip(noisy[:100], truth):
        r = tw.check_prompt(im, f"a {c} {s}")
        assert r["both"] and r["colour_ok"] and r["shape_ok"] and r["count_ok"]
        wrong_c = [x for x in tw.COLOURS if x != c][0]
        wrong_s = [x for x in tw.SHAPES if x != s][0]
        r = tw.check_prompt(im, f"a {wrong_c} {s}")
        assert not r["colour_ok"] and r["shape_ok"] and not r["both"]
        r = tw.check_prompt(im, f"a {c} {wrong_s}")
        assert r["colour_ok"] and not r["shape_ok"] and not r["both"]
    blank, _ = tw.render(tw.Scene((), None, "single"), 0)
    assert not tw.check_prompt(blank, "a red circle")["both"]
    with pytest.raises(ValueError, match="no object"):
        tw.classify_object(blank)
    with pytest.raises(ValueError, match="VOCAB"):
        tw.check_prompt(blank, "a red dog")


def test_checker_sizes_and_multi(samples):
    for s in samples:
        for cap in s.captions:
            r = tw.check_prompt(s.image, cap)
            assert all(r.values()), (cap, r)
        if s.scene.kind != "single":
            assert not tw.check_prompt(s.image, tw.attribute_swap(s.scene)[1])["both"]
    sc = tw.random_scene(np.random.default_rng(1), "single", sizes=["large"])
    img, _ = tw.render(sc, 0)
    o = sc.objects[0]
    assert tw.check_prompt(img, f"a large {o.colour} {o.shape}")["size_ok"]
    assert not tw.check_prompt(img, f"a small {o.colour} {o.shape}")["size_ok"]


def test_bad_input_errors():
    with pytest.raises(ValueError, match="kind"):
        tw.make_samples(3, 0, kinds=("quad",))
    with pytest.raises(ValueError, match="weights"):
        tw.make_samples(3, 0, weights=(1, 2))
    with pytest.raises(ValueError, match="colour, shape"):
        tw.make_samples(3, 0, exclude_combinations=[("circle", "red")])
    with pytest.raises(ValueError):
        tw.to_pil(np.zeros((4, 4), np.uint8))
    assert tw.to_pil(tw.make_sample(0, 0).image).size == (32, 32)


def test_shape_features_closed_form_and_blur_invariant():
    from scipy import ndimage
    # continuous values: square -1/60, diamond +1/60, circle 0, 4-fold shapes have no skew
    sq = tw.shape_features(tw.shape_mask("square", (4, 4, 28, 28)))
    di = tw.shape_features(tw.shape_mask("diamond", (4, 4, 28, 28)))
    ci = tw.shape_features(tw.shape_mask("circle", (4, 4, 28, 28)))
    tr = tw.shape_features(tw.shape_mask("triangle", (4, 4, 28, 28)))
    assert abs(sq[1] + 1 / 60) < 1e-3 and abs(di[1] - 1 / 60) < 1.5e-3 and abs(ci[1]) < 1.5e-3
    assert abs(sq[0]) < 1e-9 and abs(di[0]) < 1e-9 and abs(ci[0]) < 1e-9 and tr[0] < -0.015
    assert sq[2] == 24 * 24
    # Gaussian blur leaves cumulants of order >= 3 (and the mass) unchanged
    for s in tw.SHAPES:
        m = tw.shape_mask(s, (6, 6, 26, 26)).astype(float)
        a, b = tw.shape_features(m), tw.shape_features(ndimage.gaussian_filter(m, 1.0))
        assert np.allclose(a, b, rtol=1e-3, atol=2e-4), (s, a, b)


def test_checker_blurred_noisy_generated_like():
    from scipy import ndimage
    images, truth, samples = _single_images(200, seed=12)
    rng = np.random.default_rng(1)
    ok = 0
    for im, (c, s), smp in zip(images, truth, samples):
        blurred = ndimage.gaussian_filter(im.astype(float), (0.7, 0.7, 0))
        noisy = np.clip(blurred + rng.normal(0, 10, im.shape), 0, 255).astype(np.uint8)
        r = tw.check_prompt(noisy, f"a {smp.scene.objects[0].size} {c} {s}")
        ok += r["both"] and r["size_ok"]
    assert ok / len(images) >= 0.97


def test_triple_scenes_fit():
    rng = np.random.default_rng(0)
    for _ in range(30):
        sc = tw.random_scene(rng, "triple")
        assert [o.size for o in sc.objects].count("large") <= 2
    sc = tw.random_scene(rng, "triple", sizes=["large", "large", "small"])
    assert [o.size for o in sc.objects] == ["large", "large", "small"]
    with pytest.raises(ValueError, match="at most two large"):
        tw.random_scene(rng, "triple", sizes=["large"] * 3)


def test_checker_skips_blobs_of_no_palette_colour():
    # a cyan-gray square is far from the background but covers no palette colour: no object
    # (a random-weight decoder draws such blobs; the checker used to raise on them)
    img = np.full((32, 32, 3), tw.BACKGROUND, np.uint8)
    img[4:14, 4:14] = (120, 200, 180)
    assert tw.detect_objects(img) == []
    r = tw.check_prompt(img, "a red circle")
    assert not r["colour_ok"] and not r["both"] and not r["count_ok"]
    # beside a real object, the blob is left out and the object is read
    img[18:28, 18:28] = tw.COLOURS["red"]
    found = tw.detect_objects(img)
    assert [(d["colour"], d["shape"]) for d in found] == [("red", "square")]
    assert tw.check_prompt(img, "a red square")["both"]
    # classify_object with an explicit mask falls back to the mask's own shape
    mask = np.zeros((32, 32), bool)
    mask[4:14, 4:14] = True
    assert tw.classify_object(img, mask)[1] == "square"
