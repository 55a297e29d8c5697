"""The shared input checks (t2i_common.validate): messages name the input, the first bad index,
what was found; records of reused artefacts; the CLI wrapper prints one line."""
import json

import numpy as np
import pytest
import torch

from t2i_common import validate as V


@pytest.mark.parametrize("x,index", [
    (np.array([1.0, np.nan, np.inf]), "index 1 "),
    (torch.tensor([[0.0, 1.0], [2.0, float("-inf")]]), r"index \(1, 1\)"),
    (np.float64(np.nan), "its only entry"),
])
def test_finite_array_names_the_first_bad_entry(x, index):
    with pytest.raises(V.BadInput, match=rf"arr holds a non-finite value .* at {index}"):
        V.finite_array(x, "arr")


def test_finite_array_index_across_blocks():
    a = np.zeros((5, 2 ** 22), np.float16)          # checked in blocks of 4 rows
    a[4, 7] = np.nan
    a[4, 9] = np.inf
    with pytest.raises(V.BadInput, match=r"at index \(4, 7\) \(2 of 20971520 entries"):
        V.finite_array(a, "big")
    assert V.finite_array(np.arange(5), "ints") is not None           # integers are finite


@pytest.mark.parametrize("v,kw,match", [
    (0, {}, "must be positive, got 0"), (-2, dict(low=0), "must be >= 0"), (2.5, {}, "whole number"),
    (True, {}, "whole number"), ("3", {}, "whole number"), (float("nan"), {}, "whole number"),
    (5, dict(high=4), "must be <= 4"),
])
def test_count(v, kw, match):
    with pytest.raises(V.BadInput, match=rf"^n (must be )?.*{match}"):
        V.count(v, "n", **kw)
    assert V.count(3.0, "n") == 3 and V.count(np.int64(2), "n") == 2


@pytest.mark.parametrize("v,kw,match", [
    (float("nan"), {}, "finite number"), (float("inf"), {}, "finite number"), ("1", {}, "a number"),
    (None, {}, "a number"), (0.0, dict(low=0, low_open=True), "> 0"), (1.0, dict(high=1, high_open=True), "< 1"),
])
def test_real(v, kw, match):
    with pytest.raises(V.BadInput, match=match):
        V.real(v, "x", **kw)
    assert V.real(np.float32(0.5), "x") == 0.5 and V.real(torch.tensor(2.0), "x") == 2.0


@pytest.mark.parametrize("v,match", [("a red circle", "got the string 'a red circle'; wrap it"),
                                     (b"x", "got the string"), ([], "is empty"), (["a", 3], r"\[1\] is int"),
                                     (None, "got NoneType"), (5, "got int")])
def test_text_list(v, match):
    with pytest.raises(V.BadInput, match=match):
        V.text_list(v, "prompts")


def test_records(tmp_path):
    f = tmp_path / "x.npy"
    np.save(f, np.zeros(2))
    assert V.record_differences(f, {"a": 1}) is None and not V.check_record(f, {"a": 1}, "x", "fix")
    V.write_record(f, {"a": 1, "b": "s"})
    assert json.loads((tmp_path / "x.npy.meta.json").read_text()) == {"a": 1, "b": "s"}
    assert V.check_record(f, {"a": 1, "b": "s"}, "x", "fix")
    with pytest.raises(V.BadInput, match=r"x: .*x.npy was made with other parameters: a=1 \(now 2\); fix"):
        V.check_record(f, {"a": 2, "b": "s"}, "x", "fix")
    (tmp_path / "x.npy.meta.json").write_text("{broken")
    with pytest.raises(V.BadInput, match="is not readable JSON"):
        V.read_record(f)


def test_out_dir_and_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(V.BadInput, match=r"lies under .*f, which is a file"):
        V.out_dir(tmp_path / "f" / "a" / "b", "--out")
    with pytest.raises(V.BadInput, match="is a folder, expected a file path"):
        V.out_file(tmp_path, "--file")
    assert V.out_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()                  # nothing is created


def test_cli_wrapper_one_line_and_debug(capsys):
    def boom(argv):
        raise ValueError("--x: bad\n  value")
    assert V.cli(boom, "prog", []) == 2
    err = capsys.readouterr().err
    assert err == "prog: error: --x: bad value (--debug shows the traceback)\n"
    with pytest.raises(ValueError):
        V.cli(boom, "prog", ["--debug"])

    def key(argv):
        raise KeyError("missing thing")
    assert V.cli(key, "prog", []) == 2
    assert "prog: error: missing thing" in capsys.readouterr().err
