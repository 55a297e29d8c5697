"""Caption text for the ARO order perturbations: ARO/BLIP normalisation, tokenisation and the
part-of-speech taggers (NOUN / ADJ / OTHER per word)."""
from __future__ import annotations

import re
from typing import Iterable, Sequence


_PUNCT = re.compile(r'([.!"()*#:;~])')
_TOKEN = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")


def normalize_caption(caption: str, max_words: int = 30) -> str:
    """ARO/BLIP ``pre_caption``: lower case, ``.!"()*#:;~`` -> space, collapse spaces, keep max_words words."""
    text = re.sub(r"\s{2,}", " ", _PUNCT.sub(" ", caption.lower())).rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def tokenize(text: str) -> list[str]:
    """Word/punctuation tokens (stand-in for nltk.word_tokenize, which is not installed)."""
    return _TOKEN.findall(text)


POS_NOUN, POS_ADJ, POS_OTHER = "NOUN", "ADJ", "OTHER"

#: Default noun lexicon: COCO category words + frequent caption nouns.
DEFAULT_NOUNS = frozenset("""
person people man men woman women child children boy girl kid baby player group crowd couple family
bicycle bike car motorcycle airplane plane jet bus train truck boat ship light hydrant sign meter bench
bird cat dog horse sheep cow elephant bear zebra giraffe animal backpack umbrella handbag bag tie
suitcase frisbee skis ski snowboard ball kite bat glove skateboard surfboard racket bottle glass cup
fork knife spoon bowl banana apple sandwich orange broccoli carrot pizza donut doughnut cake chair couch
sofa plant bed table toilet tv television laptop computer mouse remote keyboard phone microwave oven
toaster sink refrigerator fridge book clock vase scissors toothbrush street road sidewalk field grass
water ocean sea beach wave sand snow hill mountain slope sky cloud tree building city house room kitchen
bathroom wall window door floor ground park lot area picture photo image food plate shirt hat jacket
game track pole fence lake river counter shelf desk head hand top side front back middle tower wood
circle square triangle star cross hexagon diamond shape object cube sphere cylinder
""".split())

#: Default adjective lexicon: colours, sizes, ages and frequent caption adjectives.
DEFAULT_ADJECTIVES = frozenset("""
red blue green yellow white black brown gray grey orange pink purple cyan silver golden dark bright
small large big little tiny huge tall short long wide narrow young old older new empty full open closed
busy clean dirty grassy sunny cloudy snowy wooden metal plastic several various many other different
whole single double round flat striped colorful cute pretty beautiful hot cold wet dry
""".split())


class LexiconTagger:
    """Fallback POS tagger: a word is ADJ if in ``adjectives``, NOUN if in ``nouns`` (also after
    stripping a plural -s/-es/-ies->y), else OTHER. Adjectives win ties ("orange").

    The original uses spaCy's tagger (NN*/JJ* tags); spaCy and nltk are not installed here,
    so this lexicon approximation is the default. A spaCy tagger can be passed instead::

        nlp = spacy.load("en_core_web_sm")
        tagger = lambda ws: ["NOUN" if t.tag_.startswith("NN") else "ADJ" if t.tag_.startswith("JJ")
                             else "OTHER" for t in nlp(spacy.tokens.Doc(nlp.vocab, words=ws))]
    """

    def __init__(self, nouns: Iterable[str] = DEFAULT_NOUNS, adjectives: Iterable[str] = DEFAULT_ADJECTIVES):
        self.nouns = {w.lower() for w in nouns}
        self.adjectives = {w.lower() for w in adjectives}

    def _is_noun(self, w: str) -> bool:
        cands = [w]
        if w.endswith("ies"):
            cands.append(w[:-3] + "y")
        if w.endswith("es"):
            cands.append(w[:-2])
        if w.endswith("s"):
            cands.append(w[:-1])
        return any(c in self.nouns for c in cands)

    def __call__(self, words: Sequence[str]) -> list[str]:
        tags = []
        for w in words:
            lw = w.lower()
            tags.append(POS_ADJ if lw in self.adjectives else POS_NOUN if self._is_noun(lw) else POS_OTHER)
        return tags


def _check_tags(tags: Sequence[str], words: Sequence[str]) -> list[str]:
    tags = list(tags)
    if len(tags) != len(words) or any(t not in (POS_NOUN, POS_ADJ, POS_OTHER) for t in tags):
        raise ValueError(f"pos_tagger must return one of NOUN/ADJ/OTHER per word; got {tags} for {list(words)}")
    return tags
