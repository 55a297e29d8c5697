"""Paper claims tested by the notebooks: one schema, the claims page, and results under tolerances.

Every notebook records each claim of its paper that it tests into its ``results.json`` (key
``claims``, a list) with :func:`record`; one claim is a dict made by :func:`claim`:

* ``id`` - short, unique within the package (e.g. ``"abu-beats-baselines"``);
* ``paper`` - one of :data:`PAPERS` (``implosion``, ``attribution``, ``unclip``, ``diffusion-itm``,
  ``info-decomp``);
* ``place`` - where in the paper (section / table / figure);
* ``claim`` - the claim in one sentence;
* ``paper_value`` - the paper's number where it has one (number or short text), else None;
* ``toy_value`` - our number on the toy world (number or short text), None when not testable;
* ``verdict`` - ``confirmed`` | ``not confirmed`` | ``not testable here``;
* ``why`` - the margin, the test, or what the toy world lacks;
* ``figure`` - optional: the figure / table file (in the notebook's figures folder) that shows it.

``python -m t2i_common.claims`` writes ``figures/CLAIMS.md`` (one table per paper) from the
committed ``results.json`` files; ``--check`` only compares.  ``python -m t2i_common.claims
compare FRESH [REFERENCE]`` compares the ``results.json`` files of a fresh run with the committed
ones under the per-quantity tolerances of ``figures/tolerances.yaml`` (:func:`compare_results`).
"""
from __future__ import annotations

import fnmatch
import json
import math
import sys
from pathlib import Path

from . import paths
from .validate import BadInput, cli
from .report import save_results

#: paper keys -> citation (the order of the claims page)
PAPERS = {
    "implosion": "Ding et al., *Understanding Implosion in Text-to-Image Generative Models*, CCS '24",
    "attribution": "Wang et al., *Data Attribution for Text-to-Image Models by Unlearning "
                   "Synthesized Images*, NeurIPS '24",
    "unclip": "Ramesh et al., *Hierarchical Text-Conditional Image Generation with CLIP Latents* "
              "(unCLIP), 2022",
    "diffusion-itm": "Krojer et al., *Are Diffusion Models Vision-and-Language Reasoners?* "
                     "(DiffusionITM), NeurIPS '23",
    "info-decomp": "Kong et al., *Interpretable Diffusion via Information Decomposition*, ICLR '24",
}
VERDICTS = ("confirmed", "not confirmed", "not testable here")
FIELDS = ("id", "paper", "place", "claim", "paper_value", "toy_value", "verdict", "why", "figure")
CLAIMS_PAGE = "CLAIMS.md"
TOLERANCES = "tolerances.yaml"


def _value_ok(v) -> bool:
    if v is None or isinstance(v, (str, bool, int)):
        return True
    return isinstance(v, float) and math.isfinite(v)


def claim(id: str, paper: str, place: str, claim: str, toy_value, verdict: str, why: str,
          paper_value=None, figure: str | None = None) -> dict:
    """One validated claim (see the module docstring for the fields); a bad field raises a
    ValueError naming the claim, the field and what it accepts."""
    c = dict(id=id, paper=paper, place=place, claim=claim, paper_value=paper_value,
             toy_value=toy_value, verdict=verdict, why=why, figure=figure)
    for k in ("paper_value", "toy_value"):
        if hasattr(c[k], "item") and getattr(c[k], "ndim", 1) == 0:   # numpy scalars
            c[k] = c[k].item()
    validate(c)
    return c


def validate(c: dict) -> None:
    """Check one claim dict against the schema (clear one-line errors)."""
    name = f"claim {c.get('id')!r}" if isinstance(c, dict) else "claim"
    if not isinstance(c, dict):
        raise ValueError(f"{name}: a claim is a dict made by claims.claim(...), got {type(c).__name__}")
    extra, missing = set(c) - set(FIELDS), [f for f in FIELDS if f not in c and f != "figure"]
    if extra or missing:
        raise ValueError(f"{name}: unknown field(s) {sorted(extra)} / missing field(s) {missing}; "
                         f"the fields are {list(FIELDS)}")
    for f in ("id", "place", "claim", "why"):
        if not isinstance(c[f], str) or not c[f].strip():
            raise ValueError(f"{name}: field {f!r} must be a non-empty string, got {c[f]!r}")
    if any(ch in c["id"] for ch in " |\n"):
        raise ValueError(f"{name}: field 'id' must have no spaces, '|' or newlines; use e.g. "
                         f"'abu-beats-baselines'")
    for f in ("claim", "why", "place"):
        if "\n" in c[f] or "|" in c[f]:
            raise ValueError(f"{name}: field {f!r} must be one line without '|' (it is a table "
                             f"cell of the claims page)")
    if c["paper"] not in PAPERS:
        raise ValueError(f"{name}: field 'paper' is {c['paper']!r}; choose one of {list(PAPERS)}")
    if c["verdict"] not in VERDICTS:
        raise ValueError(f"{name}: field 'verdict' is {c['verdict']!r}; choose one of {list(VERDICTS)}")
    for f in ("paper_value", "toy_value"):
        if not _value_ok(c[f]):
            raise ValueError(f"{name}: field {f!r} must be a finite number, a short text or None, "
                             f"got {c[f]!r}")
    if c["verdict"] != "not testable here" and c["toy_value"] is None:
        raise ValueError(f"{name}: verdict {c['verdict']!r} needs a toy_value (the number the "
                         f"verdict rests on); use 'not testable here' when there is none")
    if c.get("figure") is not None and not isinstance(c["figure"], str):
        raise ValueError(f"{name}: field 'figure' must be a file name or None, got {c['figure']!r}")


def verdict(holds: bool) -> str:
    """``confirmed`` if the test ``holds`` else ``not confirmed``."""
    return "confirmed" if bool(holds) else "not confirmed"


def record(out, claims: list) -> None:
    """Validate ``claims`` and write them into ``out/results.json`` (key ``claims``, replacing the
    notebook's previous list); ids must be unique.  Prints nothing (see :func:`show`)."""

    if not claims:
        raise ValueError("claims.record: no claims given; a notebook that tests none should not call it")
    for c in claims:
        validate(c)
    ids = [c["id"] for c in claims]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"claims.record: duplicate claim id(s) {dup}; every id must be unique")
    save_results(out, {"claims": [dict(c) for c in claims]})


def _json(p: Path) -> dict:
    """``p`` parsed; an unreadable or non-JSON file is a :class:`BadInput` naming it."""
    try:
        return json.loads(Path(p).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{p} is not a readable results.json ({e}); regenerate it by running its "
                       f"notebook (python -m t2i_common.runner NN)") from None


def read(out) -> dict:
    """The ``results.json`` a notebook has written to its figures folder ``out`` (claim cells
    compute their verdicts from it, so the page can be regenerated from the saved numbers)."""
    p = Path(out) / "results.json"
    if not p.exists():
        raise FileNotFoundError(f"{p} not found; the cells that save the notebook's results must "
                                f"run before its claims cell")
    return _json(p)


def show(claims: list) -> None:
    """Print one line per claim, ``id: verdict`` (what a notebook's checked line prints)."""
    for c in claims:
        print(f"{c['id']:34s} {c['verdict']}")


# ------------------------------------------------------------------------------------------------
# the claims page
# ------------------------------------------------------------------------------------------------
def collect(root=None) -> list:
    """Every claim of every ``<root>/<notebook>/results.json`` (default: the committed figures),
    with its ``notebook`` added, in notebook order; checks the schema and that ids are unique."""
    root = Path(root or paths.REFERENCE_FIGURES)
    out, seen = [], {}
    for p in sorted(root.glob("*/results.json")):
        for c in _json(p).get("claims", []):
            try:
                validate(c)
            except ValueError as e:
                raise ValueError(f"{p}: {e}") from None
            if c["id"] in seen:
                raise ValueError(f"{p}: claim id {c['id']!r} is also used by {seen[c['id']]}")
            seen[c["id"]] = p.parent.name
            out.append(dict(c, notebook=p.parent.name))
    return out


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def render(claims: list) -> str:
    """The claims page: counts per paper, then one table per paper."""
    mark = {"confirmed": "confirmed", "not confirmed": "**not confirmed**",
            "not testable here": "*not testable here*"}
    lines = ["# Claims of the five papers, tested on the toy world", "",
             "Generated by `python -m t2i_common.claims` from the `results.json` files under "
             "`figures/` (do not edit by hand).  Every row is computed by its notebook from the "
             "quantities of its run; the exact numbers are in `figures/<notebook>/results.json`.", "",
             "| paper | claims | confirmed | not confirmed | not testable here |",
             "|---|---|---|---|---|"]
    for key, cite in PAPERS.items():
        cs = [c for c in claims if c["paper"] == key]
        n = {v: sum(c["verdict"] == v for c in cs) for v in VERDICTS}
        lines.append(f"| {key} | {len(cs)} | {n['confirmed']} | {n['not confirmed']} | "
                     f"{n['not testable here']} |")
    for key, cite in PAPERS.items():
        cs = [c for c in claims if c["paper"] == key]
        lines += ["", f"## {key}: {cite}", ""]
        if not cs:
            lines.append("No claim recorded.")
            continue
        lines += ["| id | place | claim | paper value | toy value | verdict | why | notebook, figure |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in cs:
            where = f"`{c['notebook']}`"
            if c.get("figure"):
                where += f", [{c['figure']}]({c['notebook']}/{c['figure']})"
            lines.append(f"| {c['id']} | {c['place']} | {c['claim']} | {_cell(c['paper_value'])} | "
                         f"{_cell(c['toy_value'])} | {mark[c['verdict']]} | {c['why']} | {where} |")
    return "\n".join(lines) + "\n"


def write_page(root=None, check: bool = False) -> bool:
    """Write (or with ``check`` only compare) ``<root>/CLAIMS.md``; returns whether the file on
    disk already held the generated text."""
    root = Path(root or paths.REFERENCE_FIGURES)
    text, p = render(collect(root)), root / CLAIMS_PAGE
    same = p.exists() and p.read_text() == text
    if not check and not same:
        p.write_text(text)
    return same


# ------------------------------------------------------------------------------------------------
# results under tolerances
# ------------------------------------------------------------------------------------------------
def flatten(obj, prefix: str = "") -> dict:
    """{dotted path: leaf}; list items are indexed by position, claims by their id."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "claims" and isinstance(v, list) and all(isinstance(c, dict) and "id" in c for c in v):
                for c in v:
                    out.update(flatten({kk: vv for kk, vv in c.items() if kk != "id"},
                                       f"{prefix}claims.{c['id']}."))
            else:
                out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def load_tolerances(path=None) -> dict:
    """The tolerance spec: ``{notebook or '*': {key pattern: rule}}`` plus ``default``.  A rule is
    ``ignore``, ``exact`` or ``{abs: a, rel: r}`` (|fresh - ref| <= a + r |ref|)."""
    import yaml

    path = Path(path or paths.REFERENCE_FIGURES / TOLERANCES)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BadInput(f"{path} is not valid YAML ({' '.join(str(e).split())}); fix the file "
                       f"(git checkout figures/{TOLERANCES} restores the committed one)") from None
    if not isinstance(spec, dict) or "default" not in spec:
        raise ValueError(f"{path}: a tolerance spec is a mapping with a 'default' rule and "
                         f"per-notebook sections")
    for sec, rules in spec.items():
        for pat, rule in ([("default", rules)] if sec == "default" else (rules or {}).items()):
            if rule not in ("ignore", "exact") and not (isinstance(rule, dict) and rule
                                                        and set(rule) <= {"abs", "rel"}):
                raise ValueError(f"{path}: rule for {sec}/{pat} is {rule!r}; use 'ignore', 'exact' "
                                 f"or {{abs: ..., rel: ...}}")
    return spec


def rule_for(spec: dict, notebook: str, key: str):
    """The first matching pattern of the notebook's section, then of ``'*'``, else the default."""
    for sec in (notebook, "*"):
        for pat, rule in (spec.get(sec) or {}).items():
            if fnmatch.fnmatchcase(key, pat):
                return rule
    return spec["default"]


def compare_results(fresh: dict, ref: dict, spec: dict, notebook: str) -> list:
    """Differences of a fresh ``results.json`` from the reference beyond the declared tolerances,
    one line each (empty: agreement).  Numbers (bools and text exactly) within ``abs + rel |ref|``;
    a key present on one side only is a difference unless its rule is ``ignore``."""
    a, b = flatten(fresh), flatten(ref)
    bad = []
    for key in sorted(set(a) | set(b)):
        rule = rule_for(spec, notebook, key)
        if rule == "ignore":
            continue
        if key not in a or key not in b:
            bad.append(f"{notebook}: {key} only in the {'reference' if key in b else 'fresh run'}")
            continue
        x, y = a[key], b[key]
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if rule == "exact" or not (num(x) and num(y)):
            if x != y:
                bad.append(f"{notebook}: {key} = {x!r}, reference {y!r} (must be equal)")
            continue
        tol = rule.get("abs", 0.0) + rule.get("rel", 0.0) * abs(y)
        if not abs(x - y) <= tol:
            bad.append(f"{notebook}: {key} = {x:.6g}, reference {y:.6g}: differs by "
                       f"{abs(x - y):.3g} > tolerance {tol:.3g}")
    return bad


def compare_folders(fresh_root, ref_root=None, spec=None) -> list:
    """:func:`compare_results` for every notebook whose ``results.json`` the fresh run wrote."""
    ref_root = Path(ref_root or paths.REFERENCE_FIGURES)
    spec = spec if isinstance(spec, dict) else load_tolerances(spec)
    found = sorted(Path(fresh_root).glob("*/results.json"))
    if not found:
        raise FileNotFoundError(f"{fresh_root}: no <notebook>/results.json; point at the figures "
                                f"folder of a run (T2I_FIGURES)")
    bad = []
    for p in found:
        r = ref_root / p.parent.name / "results.json"
        if not r.exists():
            bad.append(f"{p.parent.name}: no committed {r}")
            continue
        bad += compare_results(_json(p), _json(r), spec,
                               p.parent.name)
    return bad


def _run(argv) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m t2i_common.claims", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    ap.add_argument("--check", action="store_true", help="only check that CLAIMS.md is up to date")
    ap.add_argument("--root", default=None, help="figures folder (default: the committed figures/)")
    cp = sub.add_parser("compare", help="compare a fresh run's results.json files with the committed")
    cp.add_argument("fresh", help="figures folder of the fresh run (its T2I_FIGURES)")
    cp.add_argument("reference", nargs="?", default=None)
    cp.add_argument("--tolerances", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "compare":
        bad = compare_folders(a.fresh, a.reference, a.tolerances)
        n = len(list(Path(a.fresh).glob("*/results.json")))
        print("\n".join(bad) if bad else f"{n} results.json agree with the reference within the "
                                         f"declared tolerances")
        if bad:
            raise SystemExit(1)
        return
    root = Path(a.root or paths.REFERENCE_FIGURES)
    same = write_page(root, check=a.check)
    if a.check and not same:
        print(f"{root / CLAIMS_PAGE} is out of date; run `python -m t2i_common.claims`")
        raise SystemExit(1)
    print(f"{root / CLAIMS_PAGE}: {len(collect(root))} claims" + ("" if same else " (written)"))


def main(argv=None) -> int:
    """``python -m t2i_common.claims [--check] | compare FRESH [REF]``: exit 1 when the page is out
    of date or results differ beyond tolerance; a bad file or argument is one line on stderr (exit
    2, ``--debug`` shows the traceback)."""
    try:
        return cli(_run, "python -m t2i_common.claims", argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


if __name__ == "__main__":
    sys.exit(main())
