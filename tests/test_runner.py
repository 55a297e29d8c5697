"""The notebook runner: parameters, where outputs go, clear errors, JupyterLab's normal form."""
import configparser
import json
import os
import re
import time
from pathlib import Path

import nbformat as nbf
import pytest

from t2i_common import paths, runner

REPO = paths.ROOT

WRITE_FIG = ("import json, os\n"
             "d = os.environ.get('T2I_FIGURES') or 'REFERENCE'\n"
             "os.makedirs(d, exist_ok=True)\n"
             "json.dump({'x2': x * x, 'where': d}, open(os.path.join(d, 'o.json'), 'w'))\n"
             "print(x * x)")


def _nb(path, cells, display_name="Python 3"):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": display_name,
                                 "language": "python"}
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
    monkeypatch.setattr(paths, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(paths, "FIGURES", tmp_path / "figures")
    monkeypatch.delenv("T2I_FIGURES", raising=False)
    _nb(d / "01_ok.ipynb", [("x = 2         # a number\nlabel = 'a'   # a string\n"
                             "rates = [0.5, 1.0]  # poison rates\nmax_items = 4  # limit\n"
                             "flag = False  # a switch", ["parameters"]),
                            (WRITE_FIG, None)])
    _nb(d / "02_fail.ipynb", [("y = 1", ["parameters"]), ("z = y + 1", None),
                              ("# a comment\nraise RuntimeError('boom')", None)])
    return d


# ---- where outputs go ---------------------------------------------------------------------------
def test_parametrized_run_writes_its_own_folder(nbdir, tmp_path, capsys):
    committed = (nbdir / "01_ok.ipynb").read_bytes()
    assert runner.main(["01", "-p", "x", "7"]) == 0
    run = tmp_path / "runs" / "01_ok"
    assert json.loads((run / "figures" / "o.json").read_text())["x2"] == 49
    assert (run / "01_ok.ipynb").exists()
    assert (nbdir / "01_ok.ipynb").read_bytes() == committed  # the reference is untouched
    assert not (nbdir / "REFERENCE").exists() and not (tmp_path / "figures").exists()
    out = capsys.readouterr().out
    assert "done in" in out and "figures in runs/01_ok/figures/" in out


def test_named_run_and_output_dir(nbdir, tmp_path):
    assert runner.main(["01", "-p", "x", "3", "--name", "mine"]) == 0
    assert json.loads((tmp_path / "runs" / "mine" / "figures" / "o.json").read_text())["x2"] == 9
    assert runner.main(["01", "--output-dir", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "01_ok.ipynb").exists()
    assert (tmp_path / "elsewhere" / "figures" / "o.json").exists()


def test_default_run_in_place_writes_reference_figures(nbdir, tmp_path, monkeypatch):
    monkeypatch.setenv("T2I_FIGURES", str(tmp_path / "figures"))  # as paths.FIGURES in a kernel
    assert runner.main(["01"]) == 0
    nb = nbf.read(nbdir / "01_ok.ipynb", as_version=4)
    assert nb.cells[1].outputs[0]["text"] == "4\n"
    assert (tmp_path / "figures" / "o.json").exists()


def test_figures_root_interactive_unless_reference_is_asked_for():
    assert paths.figures_root({}) == paths.INTERACTIVE_FIGURES == paths.ROOT / "runs" / "interactive"
    assert paths.figures_root({"T2I_REFERENCE": "1"}) == paths.REFERENCE_FIGURES
    assert paths.figures_root({"T2I_REFERENCE": "0"}) == paths.INTERACTIVE_FIGURES
    assert paths.figures_root({"T2I_REFERENCE": "1", "T2I_FIGURES": "/x/y"}) == Path("/x/y")
    # a fresh interpreter (as a JupyterLab kernel): paths.FIGURES and report.outdir follow the flag
    import subprocess
    import sys
    code = "from t2i_common import paths; print(paths.FIGURES)"
    env = {k: v for k, v in os.environ.items() if k not in ("T2I_FIGURES", "T2I_REFERENCE")}
    env["PYTHONPATH"] = str(REPO)
    for flag, want in ((None, paths.INTERACTIVE_FIGURES), ("1", paths.REFERENCE_FIGURES)):
        e = dict(env, **({"T2I_REFERENCE": flag} if flag else {}))
        got = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                             check=True).stdout.strip()
        assert Path(got) == want
    # interactive outputs are ignored by git, the reference is not
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/interactive/00_tour/results.json"],
                             cwd=REPO)
    tracked = subprocess.run(["git", "check-ignore", "-q", "figures/00_tour/results.json"], cwd=REPO)
    assert ignored.returncode == 0 and tracked.returncode == 1


def test_only_the_plain_run_regenerates_the_reference(nbdir, tmp_path):
    _nb(nbdir / "03_flag.ipynb", [("x = 1  # a number", ["parameters"]),
                                  ("import os\nprint(os.environ.get('T2I_REFERENCE'))", None)])
    assert runner.main(["03"]) == 0             # in place: the reference regeneration
    assert nbf.read(nbdir / "03_flag.ipynb", as_version=4).cells[1].outputs[0]["text"] == "1\n"
    assert runner.main(["03", "-p", "x", "2"]) == 0  # parameters: its own folder, no flag
    run = nbf.read(tmp_path / "runs" / "03_flag" / "03_flag.ipynb", as_version=4)
    assert run.cells[2].outputs[0]["text"] == "None\n"


def test_list_is_one_line_per_notebook_and_parameters_on_request(nbdir, capsys):
    md = nbf.v4.new_markdown_cell("# Squares of a number\n\nText.")
    nb = nbf.read(nbdir / "01_ok.ipynb", as_version=4)
    nb.cells.insert(0, md)
    nbf.write(nb, nbdir / "01_ok.ipynb")
    (nbdir / "params").mkdir()
    (nbdir / "params" / "01_ok.yaml").write_text("x: 3\n")
    assert runner.main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].split() == ["01_ok", "not", "measured", "paper", "settings", "Squares", "of",
                                "a", "number"]
    assert lines[1].split()[:2] == ["02_fail", "not"] and "no paper file" in lines[1]
    assert runner.main(["--list", "01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  parameters (-p NAME VALUE; paper settings: -f notebooks/params/01_ok.yaml)"
    assert out[2].split(None, 3) == ["x", "=", "2", "a number"]
    assert out[4].split() == ["rates", "=", "[0.5,", "1.0]", "poison", "rates"]
    assert len(out) == 2 + 5
    # the listed parameters are papermill's
    assert [n for n, _, _ in runner.listed_parameters(nbdir / "01_ok.ipynb")] == \
        list(runner.notebook_parameters(nbdir / "01_ok.ipynb"))


def test_list_imports_neither_torch_nor_papermill():
    import subprocess
    import sys
    code = ("import sys; from t2i_common import runner; runner.main(['--list']); "
            "print(sorted(m for m in ('torch', 'papermill', 'nbformat') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO))).stdout.splitlines()
    assert out[-1] == "[]"
    assert len(out) - 1 == len(runner.all_notebooks())


def test_reference_run_records_its_wall_time(nbdir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(paths, "CACHE", tmp_path / "cache")      # empty: a cold run
    assert runner.main(["01", "--threads", "1"]) == 0
    f = tmp_path / "figures" / "run_times.json"
    entry = json.loads(f.read_text())["notebooks"]["01_ok"]
    assert 0 < entry["seconds"] < 120 and entry["cold"] is True and entry["threads"] == 1
    assert entry["command"] == "python -m t2i_common.runner --threads 1 01_ok"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "x").write_text("")
    assert runner.main(["02"]) == 1                               # a failed run records nothing
    assert runner.main(["01", "-p", "x", "3"]) == 0               # nor a run with parameters
    data = json.loads(f.read_text())["notebooks"]
    assert list(data) == ["01_ok"] and data["01_ok"] == entry
    assert runner.main(["01"]) == 0                               # warm cache: said so
    assert json.loads(f.read_text())["notebooks"]["01_ok"]["cold"] is False
    capsys.readouterr()
    assert runner.main(["--list", "01"]) == 0
    assert "(warm cache)" in capsys.readouterr().out.splitlines()[0]
    table = runner.readme_table(runner.all_notebooks()).splitlines()
    assert table[0] == "| notebook | what it shows | cold run |"
    assert table[3].startswith("| `02_fail` |") and table[3].endswith("| not measured |")


def test_params_file_sections_run_the_named_notebooks(nbdir, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("01_ok:\n  x: 5\n")
    assert runner.load_params(f, None, "01_ok") == {"x": 5}
    assert runner.load_params(f, [("x", "6")], "01_ok") == {"x": 6}
    flat = tmp_path / "flat.yaml"
    flat.write_text("x: 3\n")
    assert runner.load_params(flat, None, "01_ok") == {"x": 3}
    assert runner.main(["-f", str(f)]) == 0  # no names: the notebooks the file names
    assert json.loads((tmp_path / "runs" / "01_ok" / "figures" / "o.json").read_text())["x2"] == 25
    assert not (tmp_path / "runs" / "02_fail").exists()


# ---- bad parameter files and parameters: errors before anything runs -----------------------------
def test_misspelled_notebook_section_is_an_error(nbdir, tmp_path):
    committed = (nbdir / "01_ok.ipynb").read_bytes()
    f = tmp_path / "p.yaml"
    f.write_text("01_okk:\n  x: 5\n")
    with pytest.raises(SystemExit, match=r"p\.yaml: section '01_okk' is not a notebook; did you mean "
                       r"'01_ok'\?"):
        runner.main(["01", "-f", str(f)])
    assert (nbdir / "01_ok.ipynb").read_bytes() == committed


def test_params_file_without_a_section_for_the_notebook(nbdir, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("02_fail:\n  y: 5\n")
    with pytest.raises(SystemExit, match=r"p\.yaml has no section for 01_ok \(its sections: 02_fail\)"):
        runner.main(["01", "-f", str(f)])


def test_params_file_mixing_sections_and_flat_keys(nbdir, tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("01_ok:\n  x: 5\nx: 3\n")
    with pytest.raises(SystemExit, match=r"p\.yaml mixes notebook sections \(\['01_ok'\]\) with flat "
                       r"parameters \(\['x'\]\)"):
        runner.main(["01", "-f", str(f)])


def test_yaml_syntax_error_names_file_and_line(nbdir, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("x: 5\nlabel: [a, b\nflag: true\n")
    with pytest.raises(SystemExit, match=r"parameter file .*bad\.yaml line \d, column \d+: YAML syntax "
                       r"error .*fix that line"):
        runner.main(["01", "-f", str(f)])
    with pytest.raises(SystemExit, match=r"parameter file .*missing\.yaml not found"):
        runner.main(["01", "-f", str(tmp_path / "missing.yaml")])
    f.write_text("- 1\n- 2\n")
    with pytest.raises(SystemExit, match=r"bad\.yaml must hold a mapping"):
        runner.main(["01", "-f", str(f)])


@pytest.mark.parametrize("key, value, expected", [
    ("x", "four", r"parameter 'x' of 01_ok must be an integer \(its default is 2; a number\), got "
                  r"'four'\. Example: -p x 2"),
    ("x", "2.5", r"parameter 'x' of 01_ok must be an integer"),
    ("x", "true", r"parameter 'x' of 01_ok must be an integer"),
    ("x", "null", r"parameter 'x' of 01_ok must be an integer"),
    ("label", "3", r"parameter 'label' of 01_ok must be a string"),
    ("rates", "0.5", r"parameter 'rates' of 01_ok must be a list"),
    ("rates", "[a, b]", r"parameter 'rates' of 01_ok must be a list of numbers"),
    ("flag", "yes please", r"parameter 'flag' of 01_ok must be a bool"),
])
def test_parameter_types_checked_before_running(nbdir, key, value, expected):
    t0 = time.time()
    with pytest.raises(SystemExit, match=expected):
        runner.main(["01", "-p", key, value])
    assert time.time() - t0 < 10  # no kernel was started
    assert not (paths.RUNS / "01_ok").exists()


def test_parameter_values_that_fit(nbdir):
    nb = nbdir / "01_ok.ipynb"
    runner.check_parameters(nb, {"x": 3, "rates": [1, 0.5], "max_items": None, "flag": True,
                                 "label": "b"})


def test_unknown_notebook_and_parameter(nbdir):
    with pytest.raises(SystemExit, match=r"no notebook named 'zz'"):
        runner.main(["zz"])
    with pytest.raises(SystemExit, match=r"no notebook named '01_okay'.*did you mean '01_ok'"):
        runner.main(["01_okay"])
    with pytest.raises(SystemExit, match=r"01_ok has no parameter 'nope'.*parameters are: x, label"):
        runner.main(["01", "-p", "nope", "1"])
    with pytest.raises(SystemExit, match=r"has no parameter 'X'; did you mean 'x'"):
        runner.main(["01", "-p", "X", "1"])


def test_unparseable_parameters_line_is_named(nbdir):
    _nb(nbdir / "03_eq.ipynb", [('model = "toy"   # folder (with init="x")\nn = 1', ["parameters"])])
    with pytest.raises(SystemExit, match=r"03_eq\.ipynb: papermill cannot read parameter 'model' on "
                       r"line 1 .*no other '=' on it"):
        runner.main(["03", "--list"])


# ---- failures -------------------------------------------------------------------------------------
def test_failure_names_cell_and_keeps_committed_notebook(nbdir, tmp_path, capsys):
    committed = (nbdir / "02_fail.ipynb").read_bytes()
    assert runner.main(["02_fail"]) == 1
    err = capsys.readouterr().err
    assert "02_fail FAILED in cell 2" in err and "raise RuntimeError('boom')" in err
    assert "RuntimeError: boom" in err and "runs/failed/02_fail-" in err
    assert (nbdir / "02_fail.ipynb").read_bytes() == committed
    kept = sorted((tmp_path / "runs" / "failed").glob("02_fail-*.ipynb"))
    assert len(kept) == 1 and kept[0].name in err
    # with parameters papermill injects a cell; the message still counts the notebook's own cells
    assert runner.main(["02_fail", "-p", "y", "3"]) == 1
    assert "02_fail FAILED in cell 2" in capsys.readouterr().err
    # the second failure is a new file: the first is kept
    again = sorted((tmp_path / "runs" / "failed").glob("02_fail-*.ipynb"))
    assert len(again) == 2 and kept[0] in again


def test_failed_runs_go_under_the_output_folder_one_per_run(nbdir, tmp_path, capsys):
    out = tmp_path / "mine"
    for k in range(3):
        assert runner.main(["02_fail", "--output-dir", str(out)]) == 1
        err = capsys.readouterr().err
        assert "mine" in err and "failed/02_fail-" in err.replace("\\", "/")
    kept = sorted((out / "failed").glob("02_fail-*.ipynb"))
    assert len(kept) == 3
    assert not (tmp_path / "runs" / "failed").exists()        # nothing in the package's runs/
    assert runner.main(["02_fail", "--name", "exp"]) == 1
    assert len(list((tmp_path / "runs" / "exp" / "failed").glob("02_fail-*.ipynb"))) == 1


def test_failed_path_never_reuses_a_name(tmp_path):
    nb = tmp_path / "05_x.ipynb"
    seen = set()
    for _ in range(4):
        p = runner.failed_path(nb, tmp_path / "failed")
        assert p not in seen and not p.exists()
        p.parent.mkdir(exist_ok=True)
        p.write_text("{}")
        seen.add(p)


@pytest.mark.parametrize("shard", ["-1/2", "-2/3", "-3/4"])
def test_negative_shard_is_named_not_read_as_an_option(nbdir, shard):
    with pytest.raises(SystemExit, match=r"--shard"):
        runner.main(["01", "--shard", shard])


# ---- what the user sees -----------------------------------------------------------------------------
def test_runner_output_holds_only_what_the_user_needs(nbdir, capfd):
    _nb(nbdir / "04_bar.ipynb", [("n = 3", ["parameters"]),
                                 ("from tqdm.auto import tqdm\nfor _ in tqdm(range(n)): pass",
                                  None)])
    assert runner.main(["04"]) == 0
    out, err = capfd.readouterr()
    assert err == ""  # no kernel warning (TCP without encryption, debugger, TqdmWarning)
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[1/1] 04_bar (defaults) -> notebooks/04_bar")
    assert re.fullmatch(r"\[1/1\] 04_bar done in [\d.]+ s; figures in figures/", lines[1])
    nb = nbf.read(nbdir / "04_bar.ipynb", as_version=4)
    outputs = nb.cells[1].outputs
    assert [o.output_type for o in outputs] == ["display_data"]  # a widget bar, no stderr text
    assert "application/vnd.jupyter.widget-view+json" in outputs[0].data
    assert nb.metadata.widgets  # the widget state JupyterLab restores the bars from
    # viewers without widgets show the bar's final state, not its first one
    assert re.match(r"100%\|█{10}\| 3/3 \[", outputs[0].data["text/plain"])


def test_executed_notebook_is_in_jupyterlab_normal_form(nbdir, tmp_path):
    assert runner.main(["01"]) == 0
    path = nbdir / "01_ok.ipynb"
    text = path.read_text()
    nb = nbf.reads(text, as_version=4)
    assert text == nbf.writes(nb) + "\n"  # jupyter_server's save: indent 1, trailing newline
    assert nb.nbformat_minor >= 5 and all(c.get("id") for c in nb.cells)
    assert nb.metadata.kernelspec == runner.kernelspec_metadata("python3")
    assert nb.metadata.papermill["input_path"] == "notebooks/01_ok.ipynb"
    assert str(tmp_path) not in text  # no machine path
    assert runner.normalise_file(path) is False  # already normal


def test_coalesce_streams_like_jupyterlab():
    P = runner._process_stream_text
    assert P("abc\rxy") == ("xyc", 2)  # \r returns to the line start and overwrites
    assert P("0\r1\r2\rdone\n")[0] == "done\n"
    assert P("ab\bc")[0] == "ac"  # \b deletes the character before the cursor
    assert P("line\n")[0] == "line\n" and P("")[0] == ""
    outs = [{"output_type": "stream", "name": "stderr", "text": " 10%|#\r"},
            {"output_type": "stream", "name": "stderr", "text": "100%|##########|\n"},
            {"output_type": "stream", "name": "stdout", "text": "a\n"},
            {"output_type": "stream", "name": "stdout", "text": ["b\n", "c\n"]},
            {"output_type": "display_data", "data": {}, "metadata": {}},
            {"output_type": "stream", "name": "stdout", "text": "d\n"}]
    got = runner.coalesce_streams(outs)
    assert [(o["output_type"], o.get("text")) for o in got] == [
        ("stream", "100%|##########|\n"), ("stream", "a\nb\nc\n"), ("display_data", None),
        ("stream", "d\n")]
    # the merged text is a fixed point: JupyterLab loading it changes nothing
    for o in got:
        if o["output_type"] == "stream":
            assert P(o["text"])[0] == o["text"]


# ---- the committed notebooks ------------------------------------------------------------------------
COMMITTED = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("nb", COMMITTED, ids=lambda p: p.stem)
def test_committed_parameters_cells_parse(nb):
    """Every assignment of the parameters cell is a parameter papermill can set, and the default
    figures folder is figures/<notebook>/."""
    params = runner.notebook_parameters(nb)
    assert params["out_name"][0] == nb.stem


@pytest.mark.parametrize("f", sorted((REPO / "notebooks" / "params").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_paper_parameter_files_fit_their_notebooks(f):
    nb = REPO / "notebooks" / f"{f.stem}.ipynb"
    assert nb.exists(), f"{f} is named after no notebook"
    kind, data = runner.read_params_file(f)
    assert kind == "flat"
    runner.check_parameters(nb, data, f" (from {f.name})")


MACHINE = re.compile(r"(/work/|/tmp/|/home/|/root/|/Users/|site-packages|PosixPath\(|"
                     r"TqdmWarning|Kernel is running over TCP)")


@pytest.mark.parametrize("nb", COMMITTED, ids=lambda p: p.stem)
def test_committed_notebook_opens_unmodified_and_shows_no_machine_path(nb):
    """Written by the runner: JupyterLab's normal form and kernelspec, no path of the machine
    that executed it, no warning.  (Re-run a notebook with the runner to fix a failure here.)"""
    text = nb.read_text()
    parsed = nbf.reads(text, as_version=4)
    assert text == nbf.writes(parsed) + "\n", "not in normal form: run the runner (or --normalise)"
    assert parsed.metadata.kernelspec == runner.kernelspec_metadata(
        parsed.metadata.kernelspec["name"])
    for i, cell in enumerate(parsed.cells):
        for o in cell.get("outputs", []):
            blob = json.dumps(o)
            m = MACHINE.search(blob)
            assert m is None, f"{nb.name} cell {i} output shows {m.group(0)!r}"
    pm = parsed.metadata.get("papermill", {})
    assert not any(str(pm.get(k, "")).startswith("/") for k in ("input_path", "output_path"))


# ---- thread-count stability of the checked lines ------------------------------------------------------
def _sanitizers():
    cp = configparser.ConfigParser(interpolation=None)
    cp.read(REPO / "tests" / "nbval_sanitize.cfg")
    return [(re.compile(cp[s]["regex"]), cp[s]["replace"]) for s in cp.sections()]


def checked_outputs(path) -> list[str]:
    """The text nbval compares: outputs of the `# NBVAL_CHECK_OUTPUT` cells, sanitized."""
    nb = nbf.read(path, as_version=4)
    subs = _sanitizers()
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code" or "# NBVAL_CHECK_OUTPUT" not in cell.source:
            continue
        text = ""
        for o in runner.coalesce_streams(cell.outputs):
            text += o.get("text", "") or o.get("data", {}).get("text/plain", "")
        for rx, rep in subs:
            text = rx.sub(rep, text)
        out.append(text)
    return out


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_checked_cells_print_only_stdout(path):
    """A `# NBVAL_CHECK_OUTPUT` cell of a committed notebook holds printed lines and nothing else:
    a progress widget or a library's stderr message (e.g. transformers' "Loading weights" bar when a
    checked cell loads a model) is compared too, and differs between runs and machines."""
    nb = nbf.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "# NBVAL_CHECK_OUTPUT" not in cell.source:
            continue
        kinds = [(o.output_type, o.get("name")) for o in cell.outputs]
        assert kinds and set(kinds) == {("stream", "stdout")}, (path.name, i, kinds)


def test_threads_option_reaches_the_kernel(nbdir, tmp_path):
    _nb(nbdir / "05_threads.ipynb", [("n = 0", ["parameters"]),
                                     ("import torch\nprint(torch.get_num_threads())", None)])
    for n in (1, 2):
        assert runner.main(["05", "--threads", str(n), "--output-dir", str(tmp_path / f"o{n}")]) == 0
        nb = nbf.read(tmp_path / f"o{n}" / "05_threads.ipynb", as_version=4)
        assert nb.cells[-1].outputs[0]["text"] == f"{n}\n"


def test_checked_lines_identical_with_1_and_2_threads(tmp_path, monkeypatch):
    """00_tour, cold, with 1 and with 2 torch threads: every checked line must be the same."""
    got = {}
    for n in (1, 2):
        monkeypatch.setenv("T2I_CACHE", str(tmp_path / f"cache{n}"))
        assert runner.main(["00_tour", "--threads", str(n), "--output-dir",
                            str(tmp_path / f"t{n}")]) == 0
        got[n] = checked_outputs(tmp_path / f"t{n}" / "00_tour.ipynb")
    assert got[1] and all(got[1])
    assert got[1] == got[2]


# ---- shards -------------------------------------------------------------------------------------
SHARDED = ("from t2i_common import distributed as D\n"
           "from t2i_common.cache import ResultCache\n"
           "calls = []\n"
           "res = D.sharded_map(lambda i: calls.append(i) or 2.0 * i, list(range(6)),\n"
           "                    ResultCache('rt', {'k': 1}, root=cache), progress=False)\n"
           "print(len(calls), sorted(v for v in res.values() if v == v))")


def test_shards_then_plain_run_reduces_from_the_cache(nbdir, tmp_path, capsys):
    _nb(nbdir / "06_sharded.ipynb", [("cache = ''  # cache folder", ["parameters"]),
                                     (SHARDED, None)])
    cache = ["-p", "cache", str(tmp_path / "cache")]
    assert runner.main(["06", "--shard", "0/2", *cache]) == 0
    assert runner.main(["06", "-p", "shard", "[1, 2]", *cache]) == 0
    assert "makes the tables from the cache" in capsys.readouterr().out
    printed = {}
    for i in (0, 1):
        nb = nbf.read(tmp_path / "runs" / f"06_sharded-shard{i}of2" / "06_sharded.ipynb", 4)
        printed[i] = [o for o in nb.cells[-1].outputs if o.get("name") == "stdout"][0]["text"]
    assert printed[0] == "3 [0.0, 4.0, 8.0]\n"          # its 3 examples; the others NaN
    assert printed[1] == "3 [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]\n"   # last shard: cache complete
    assert runner.main(["06", "--output-dir", str(tmp_path / "plain"), *cache]) == 0
    nb = nbf.read(tmp_path / "plain" / "06_sharded.ipynb", 4)
    out = [o for o in nb.cells[-1].outputs if o.get("name") == "stdout"][0]["text"]
    assert out == "0 [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]\n"          # nothing recomputed


@pytest.mark.parametrize("argv", [["--shard", "2/2"], ["--shard", "x"],
                                  ["-p", "shard", "[0, 0]"], ["--shard", "0/2", "-p", "shard", "[1, 2]"]])
def test_bad_shard_is_named(nbdir, argv):
    with pytest.raises(SystemExit, match="shard"):
        runner.main(["01", *argv])


@pytest.mark.skipif(os.name != "posix", reason="IPC kernel sockets are POSIX only")
def test_kernel_talks_over_ipc_and_leaves_no_socket_folder(nbdir, tmp_path, monkeypatch):
    """No TCP port to race for (a CI run once lost the kernel's heartbeat port to another process
    between jupyter_client's port pick and the kernel's bind): the runner's kernels use IPC
    sockets in a private folder, removed after the run."""
    import tempfile
    cfg = runner._kernel_config(tmp_path)
    assert cfg.KernelManager.transport == "ipc" and cfg.KernelManager.ip == str(tmp_path / "kernel")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made = []
    real = tempfile.TemporaryDirectory

    class Spy(real):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(Path(self.name))

    monkeypatch.setattr(tempfile, "TemporaryDirectory", Spy)
    _nb(nbdir / "05_ipc.ipynb", [("n = 1", ["parameters"]), ("print(n + 1)", None)])
    assert runner.main(["05"]) == 0
    kernel_dirs = [d for d in made if d.name.startswith("t2i-kernel-")]
    assert len(kernel_dirs) == 1 and not kernel_dirs[0].exists()
    assert nbf.read(nbdir / "05_ipc.ipynb", as_version=4).cells[1].outputs[0].text == "2\n"
