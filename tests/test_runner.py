"""The notebook runner: parameters, outputs, and a failure that names notebook and cell."""
import json

import nbformat as nbf
import pytest

from t2i_common import paths, runner


def _nb(path, cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for src, tags in cells:
        c = nbf.v4.new_code_cell(src)
        if tags:
            c.metadata["tags"] = tags
        nb.cells.append(c)
    nbf.write(nb, path)


@pytest.fixture()
def nbdir(tmp_path, monkeypatch):
    d = tmp_path / "notebooks"
    d.mkdir()
    monkeypatch.setattr(paths, "NOTEBOOKS", d)
    monkeypatch.setattr(paths, "ROOT", tmp_path)
    _nb(d / "01_ok.ipynb", [("x = 2\nout = 'o.json'", ["parameters"]),
                            ("import json; json.dump({'x2': x * x}, open(out, 'w'))", None)])
    _nb(d / "02_fail.ipynb", [("y = 1", ["parameters"]), ("z = y + 1", None),
                              ("raise RuntimeError('boom')", None)])
    return d


def test_runs_with_overrides_and_writes_runs_dir(nbdir, tmp_path, capsys):
    assert runner.main(["01", "-p", "x", "7"]) == 0
    assert json.loads((nbdir / "o.json").read_text()) == {"x2": 49}
    assert (tmp_path / "runs" / "01_ok.ipynb").exists()  # parametrized runs never overwrite defaults
    assert "done in" in capsys.readouterr().out


def test_params_file_per_notebook(nbdir, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("01_ok:\n  x: 5\n")
    assert runner.load_params(f, None, "01_ok") == {"x": 5}
    assert runner.load_params(f, [("x", "6")], "01_ok") == {"x": 6}
    flat = tmp_path / "flat.yaml"
    flat.write_text("x: 3\n")
    assert runner.load_params(flat, None, "01_ok") == {"x": 3}


def test_failure_names_notebook_and_cell(nbdir, capsys):
    assert runner.main(["02_fail"]) == 1
    err = capsys.readouterr().err
    assert "02_fail" in err and "cell 2" in err and "boom" in err


def test_unknown_notebook_and_parameter(nbdir):
    with pytest.raises(SystemExit, match="no notebook named 'zz'"):
        runner.main(["zz"])
    with pytest.raises(SystemExit, match="no parameter"):
        runner.main(["01", "-p", "nope", "1"])
