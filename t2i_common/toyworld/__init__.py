"""The toy world: a procedural 32x32 scene generator whose ground truth is known exactly.

Every notebook falls back to this world when no real model or dataset is at hand
(see specs/toy_world.md).  It provides

- scenes of one to three flat-coloured objects (4 shapes x 5 colours x 2 sizes) on
  a lightly textured gray background, drawn without anti-aliasing so that the
  object masks are exact;
- captions from several templates (word order and phrasing vary), with the
  pixels each caption word refers to (``Sample.word_masks``);
- hard negatives built from the scene graph, the families the papers use on real
  data: attribute swap (ARO VG-Attribution / CLEVR binding), relation swap
  (ARO VG-Relation), the four ARO order perturbations (COCO/Flickr-Order),
  Winoground-style quadruples, class prompts (zero-shot classification) and
  omit/swap-one-word interventions (Information decomposition);
- controlled variants: Nightshade-style poisoned captions (model implosion),
  a rare concept in exactly k known images (attribution), held-out attribute
  combinations (compositional generalisation);
- an automatic pixel-rule checker (``check_prompt``) that scores generated images.

Conventions: x is the column (grows to the right), y the row (grows downwards), so
"above" means a smaller y.  ``Obj.bbox = (x0, y0, x1, y1)`` with exclusive ends.
Everything is deterministic given the seeds passed in; sample ``i`` of
``make_samples(n, seed)`` depends only on ``(seed, i)``.

Deliberate simplifications: objects of one multi-object scene have distinct colours
and distinct shapes (so each caption names every object unambiguously and a swap
always yields a false caption); the order perturbations use the word types of the
toy vocabulary instead of spaCy POS tags.

Modules: ``world`` (constants, scenes, rendering, samples), ``negatives`` (hard negatives and
controlled variants), ``checker`` (the automatic checker); every public name is re-exported here
(``from t2i_common import toyworld; toyworld.make_samples(...)``).
"""
from .world import (BACKGROUND, COLOURS, CONVERSE, DEFAULT_WEIGHTS, IMAGE_SIZE, KINDS, MARGIN, MIN_GAP, N_OBJECTS,
                    RELATIONS, SHAPES, SIZES, TEMPLATES, TEXTURE_AMPLITUDE, VOCAB, WORD_TYPES, Obj, Sample, Scene,
                    caption_for, caption_tokens, make_obj, make_sample, make_samples, random_scene, render,
                    sample_from_scene, shape_mask, to_pil)
from .negatives import (WINOGROUND_FAMILIES, attribute_swap, class_prompts, omit_word, order_shuffles, poison,
                        rare_concept, relation_swap, swap_word, winoground_quadruples)
from .checker import (CHECK_TOLERANCE, COVERAGE_FLOOR, LARGE_THRESHOLD, MIN_AREA, WINDOW_PAD, check_prompt,
                      classify_object, classify_shape, detect_objects, parse_prompt, shape_features,
                      shape_prototypes)

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("world", "negatives", "checker")]
