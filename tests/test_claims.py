"""The claims schema, the generated claims page, and results.json compared under tolerances."""
import copy
import json

import pytest

from t2i_common import claims, paths

GOOD = dict(id="x-holds", paper="attribution", place="Sec. 1", claim="X holds.", toy_value=0.5,
            verdict="confirmed", why="0.5 > 0.4")


def test_claim_validates_every_field():
    c = claims.claim(**GOOD, paper_value="0.6")
    assert c["figure"] is None and c["paper_value"] == "0.6"
    for field, bad, msg in [("paper", "attrib", "choose one of"),
                            ("verdict", "holds", "choose one of"),
                            ("id", "x holds", "no spaces"),
                            ("claim", "", "non-empty"),
                            ("why", "a | b", "without '|'"),
                            ("toy_value", float("nan"), "finite number"),
                            ("toy_value", [1, 2], "finite number")]:
        with pytest.raises(ValueError, match=msg) as e:
            claims.claim(**dict(GOOD, **{field: bad}))
        assert field in str(e.value) and "x-holds" in str(e.value) or field == "id"
    with pytest.raises(ValueError, match="needs a toy_value"):
        claims.claim(**dict(GOOD, toy_value=None))
    assert claims.claim(**dict(GOOD, toy_value=None, verdict="not testable here"))["toy_value"] is None
    with pytest.raises(ValueError, match="unknown field"):
        claims.validate(dict(GOOD, paper_value=None, extra=1))
    assert claims.verdict(True) == "confirmed" and claims.verdict(False) == "not confirmed"


def test_record_show_and_collect(tmp_path, capsys):
    out = tmp_path / "20_attribution"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"mAP": 0.5}))
    cl = [claims.claim(**GOOD), claims.claim(**dict(GOOD, id="y", verdict="not confirmed"))]
    claims.record(out, cl)
    res = claims.read(out)
    assert res["mAP"] == 0.5 and [c["id"] for c in res["claims"]] == ["x-holds", "y"]
    claims.show(cl)
    assert capsys.readouterr().out.split("\n")[1].split() == ["y", "not", "confirmed"]
    with pytest.raises(ValueError, match="duplicate"):
        claims.record(out, cl + cl[:1])
    got = claims.collect(tmp_path)
    assert [c["notebook"] for c in got] == ["20_attribution"] * 2
    page = claims.render(got)
    assert "| attribution | 2 | 1 | 1 | 0 |" in page
    assert "| y | Sec. 1 | X holds. | - | 0.5 | **not confirmed** | 0.5 > 0.4 | `20_attribution` |" in page
    # an id used by two notebooks is an error naming the file
    other = tmp_path / "21_leave_k_out"
    other.mkdir()
    claims.record(other, cl[:1])
    with pytest.raises(ValueError, match="also used by 20_attribution"):
        claims.collect(tmp_path)


def test_committed_claims_page_is_generated_from_the_committed_results():
    """figures/CLAIMS.md is what `python -m t2i_common.claims` makes of the committed
    results.json files (regenerate it after running notebooks)."""
    text = claims.render(claims.collect(paths.REFERENCE_FIGURES))
    assert (paths.REFERENCE_FIGURES / claims.CLAIMS_PAGE).read_text() == text
    assert claims.write_page(paths.REFERENCE_FIGURES, check=True)


def test_committed_results_agree_with_themselves_and_a_change_beyond_tolerance_fails():
    spec = claims.load_tolerances()
    for p in sorted(paths.REFERENCE_FIGURES.glob("*/results.json")):
        ref = json.loads(p.read_text())
        assert claims.compare_results(ref, ref, spec, p.parent.name) == []
    ref = json.loads((paths.REFERENCE_FIGURES / "11_ad_poisoning" / "results.json").read_text())
    rule = claims.rule_for(spec, "11_ad_poisoning", "ad_by_rate.0.5")
    tol = rule["abs"] + rule["rel"] * ref["ad_by_rate"]["0.5"]
    for change, n_bad in [(0.5 * tol, 0), (2 * tol, 1)]:
        fresh = copy.deepcopy(ref)
        fresh["ad_by_rate"]["0.5"] += change
        bad = claims.compare_results(fresh, ref, spec, "11_ad_poisoning")
        assert len(bad) == n_bad
    assert "ad_by_rate.0.5" in bad[0] and "tolerance" in bad[0]


def test_compare_rules(tmp_path):
    spec = {"default": {"abs": 0.01},
            "nb": {"table.*.found": {"abs": 2}, "seconds": "ignore"},
            "*": {"claims.*.verdict": "exact", "claims.*.why": "ignore"}}
    ref = {"table": [{"found": 10, "name": "a"}], "seconds": 3.0, "x": 0.5, "flag": True,
           "claims": [dict(GOOD, paper_value=None, figure=None)]}
    fresh = copy.deepcopy(ref)
    fresh["table"][0]["found"], fresh["seconds"], fresh["x"] = 12, 99.0, 0.505
    fresh["claims"][0]["why"] = "other words"
    assert claims.compare_results(fresh, ref, spec, "nb") == []
    fresh["table"][0]["found"] = 13
    fresh["claims"][0]["verdict"] = "not confirmed"
    fresh["flag"] = False
    del fresh["x"]
    bad = claims.compare_results(fresh, ref, spec, "nb")
    assert len(bad) == 4
    assert any("table.0.found = 13" in b for b in bad)
    assert any("claims.x-holds.verdict" in b for b in bad)
    assert any("x only in the reference" in b for b in bad)
    # the command line: exit status 1 and the differences, 0 when they agree
    for root, res in (("fresh", fresh), ("ref", ref)):
        (tmp_path / root / "nb").mkdir(parents=True)
        (tmp_path / root / "nb" / "results.json").write_text(json.dumps(res))
    import yaml
    (tmp_path / "tol.yaml").write_text(yaml.safe_dump(spec))
    assert claims.main(["compare", str(tmp_path / "fresh"), str(tmp_path / "ref"),
                        "--tolerances", str(tmp_path / "tol.yaml")]) == 1
    assert claims.main(["compare", str(tmp_path / "ref"), str(tmp_path / "ref"),
                        "--tolerances", str(tmp_path / "tol.yaml")]) == 0
    (tmp_path / "bad.yaml").write_text("default: {abs: 1}\nnb: {x: loose}\n")
    with pytest.raises(ValueError, match="use 'ignore', 'exact'"):
        claims.load_tolerances(tmp_path / "bad.yaml")


def test_claims_command_names_a_bad_file_in_one_line(tmp_path, capsys):
    """A corrupt results.json, a missing fresh folder and broken tolerance YAML: exit 2, one line
    naming the file, no traceback; the files are left as they were."""
    ref = tmp_path / "ref" / "nb"
    ref.mkdir(parents=True)
    (ref / "results.json").write_text(json.dumps({"x": 1.0}))
    fresh = tmp_path / "fresh" / "nb"
    fresh.mkdir(parents=True)
    (fresh / "results.json").write_text('{"x": 1.0')            # cut short
    tol = tmp_path / "tol.yaml"
    tol.write_text("default: {abs: 0.1}\n")
    cases = [
        (["compare", str(tmp_path / "fresh"), str(tmp_path / "ref"), "--tolerances", str(tol)],
         str(fresh / "results.json")),
        (["compare", str(tmp_path / "nowhere"), str(tmp_path / "ref"), "--tolerances", str(tol)],
         str(tmp_path / "nowhere")),
    ]
    bad_tol = tmp_path / "broken.yaml"
    bad_tol.write_text("default: [abs: 0.1\n")
    (fresh / "results.json").write_text(json.dumps({"x": 1.0}))
    cases.append((["compare", str(tmp_path / "fresh"), str(tmp_path / "ref"), "--tolerances",
                   str(bad_tol)], str(bad_tol)))
    (fresh / "results.json").write_text('{"x": 1.0')
    for argv, named in cases:
        capsys.readouterr()
        assert claims.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0] and "Traceback" not in err[0], err
    assert (fresh / "results.json").read_text() == '{"x": 1.0'
