"""Readers and writers of the published dataset formats (data_formats.md).

Real datasets are read from their published layouts; the toy world is exported
through the writers below and read back through the same readers, so every
writer produces exactly the layout its reader (and the original code) expects.

Conventions
- Image-text matching data become :class:`MatchItem` s: text retrieval items have
  one image and several captions, image retrieval items several images and one
  caption, Winoground rows a 2x2 item. Image files load lazily (``item.images``);
  a missing or unreadable file raises an error naming the file.
- Every reader fails early with :class:`FormatError` (a ``ValueError``) or
  ``FileNotFoundError`` whose message names the file, the field and the fix, and
  refuses an empty dataset ("dataset X has no items").
- Writers accept PIL images or uint8 numpy arrays ((H,W) or (H,W,3)); they write
  JSON/CSV atomically (temporary file + rename) so an interrupted export never
  leaves a half-written annotation file.

One module per dataset family; every public name is re-exported here
(``from t2i_common import formats; formats.read_aro_vg(...)``):

- ``_common``: :class:`FormatError`, atomic writes, json / table readers;
- ``images``: :class:`ImageRef`, :class:`MatchItem`, image loading and saving, the candidate
  scores of a retrieval item (:func:`candidate_scores`);
- ``implosion``: implosion text-image pickles and the embedding cache;
- ``aro``: ARO VG-Relation / VG-Attribution and the ARO accuracies;
- ``captions``: caption normalisation, tokenisation and POS taggers;
- ``aro_order``: COCO-Order / Flickr-Order perturbations and files;
- ``winoground``: Winoground rows, files and scores;
- ``coco``: COCO instances (polygons, RLE) and COCO-IT / COCO-WL csv;
- ``clevr``, ``svo``, ``imagecode``, ``flickr``, ``negclip``: the other GDBench tasks;
- ``bias``: MMBias and the gender-bias folders.
"""
from ._common import (FormatError, PathLike, _atomic_write_bytes, _fail, _nonempty, _read_json, _read_table,
                      _require_dir, _require_file, _require_keys, _write_csv, _write_json)
from .images import (IMAGE_EXTS, ImageRef, LazyImages, MatchItem, _check_exists, _find_image, candidate_scores,
                     clip_box, read_images, save_image, to_pil)
from .implosion import (class_pairs, implosion_pickle_paths, read_embedding_cache, read_implosion_pickle,
                        read_implosion_pickles, write_embedding_cache, write_implosion_pickles)
from .aro import (ARO_SYMMETRIC_RELATIONS, VG_FILES, aro_accuracy, aro_group_accuracy, read_aro_vg,
                  write_aro_vg)
from .captions import (DEFAULT_ADJECTIVES, DEFAULT_NOUNS, PENN_ADJ_TAGS, PENN_NOUN_TAGS, POS_ADJ, POS_NOUN,
                       POS_OTHER, SPACY_MODEL, LexiconTagger, SpacyTagger, default_pos_tagger, normalize_caption,
                       penn_to_pos, pos_tagger_name, tokenize)
from .aro_order import (ORDER_FILES, ORDER_PERTURBATIONS, NoOrderNegative, OrderItems, order_caption_options,
                        read_aro_order, shuffle_allbut_nouns_and_adj, shuffle_nouns_and_adj, shuffle_trigrams,
                        shuffle_within_trigrams, write_aro_order)
from .winoground import WINOGROUND_COLUMNS, read_winoground, winoground_items, winoground_scores, write_winoground
from .coco import (COCO_IT_COLUMNS, CocoInstances, CocoITItem, annotation_mask, coco_masks, polygons_to_mask,
                   read_coco_instances, read_coco_it, resize_mask, rle_counts_to_string, rle_decode, rle_encode,
                   rle_string_to_counts, write_coco_instances, write_coco_it)
from .clevr import CLEVR_SUBTASKS, read_clevr, write_clevr
from .svo import SVO_COLUMNS, read_svo, write_svo
from .imagecode import read_imagecode, write_imagecode
from .flickr import (read_flickr30k_retrieval, read_flickr30k_text_retrieval, write_flickr30k_retrieval,
                     write_flickr30k_text_retrieval)
from .negclip import NEGCLIP_COLUMNS, NegClipRow, read_negclip_tsv, write_negclip_tsv
from .bias import (GENDER_WORD_PAIRS, MMBIAS_GROUPS, MMBias, read_gender_bias, read_mmbias, write_gender_bias,
                   write_mmbias)

__all__ = [n for n in dir() if not n.startswith("_") and n not in (
    "aro", "aro_order", "bias", "captions", "clevr", "coco", "flickr", "imagecode", "images", "implosion",
    "negclip", "svo", "winoground")]
