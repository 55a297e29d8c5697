"""Run the notebooks headlessly through papermill: ``python -m t2i_common.runner [names] [options]``.

* no names: every ``notebooks/NN_*.ipynb`` in order (with a per-notebook parameter file: the
  notebooks it names; with a flat file named after a notebook, e.g. ``params/12_implosion.yaml``:
  that notebook); names may be stems (``00_tour``), prefixes (``00``) or paths.
* ``-f params.yaml``: parameters; a mapping of notebook stem -> parameters, or one flat mapping.
  ``-p key value`` overrides (values parsed as YAML).  Every parameter is checked against the
  notebook's parameters cell (name and type of its default) before anything runs.
* Without parameters the executed notebook replaces the committed one and writes
  ``figures/<notebook>/`` (the regression reference nbval compares; the kernel sees
  ``T2I_REFERENCE=1``, without which a notebook writes ``runs/interactive/<notebook>/``).  With parameters (or ``--name``)
  the run gets its own folder: ``runs/<name>/<notebook>.ipynb`` and ``runs/<name>/figures/`` (the
  kernel sees ``T2I_FIGURES``), so a parametrized run never overwrites the committed reference.
  ``--output-dir D`` puts both under ``D``.
* The executed notebook is written in JupyterLab's normal form (see :func:`normalise`), so it opens
  unmodified; a failed run leaves the committed notebook untouched and keeps the partial run, one
  new file per failed run, in ``failed/`` under the output folder (``--output-dir D``: ``D/failed``;
  ``--name N``: ``runs/N/failed``; otherwise ``runs/failed``).
* ``--shard I/N`` (or ``-p shard '[I, N]'``): run shard I of N of the notebook's heavy loops
  (the kernel sees ``T2I_SHARD``, read by :mod:`t2i_common.distributed`): each loop computes
  only its share of the examples into the shared cache (``T2I_CACHE``), the other shards'
  examples are NaN placeholders, and the run goes to ``runs/<name>-shard<I>of<N>/`` (its tables
  are not results).  After all N shards, the plain run finds every example in the cache and only
  makes the tables.  ``scripts/slurm_shards.sbatch`` does this as a Slurm array job.
* Prints, per notebook: what runs, its wall time and where its figures went, or the failing cell.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

from . import paths
from .notebook_index import (listed_parameters, notebook_title, read_run_times,  # noqa: F401
                             readme_table, record_run_time, run_times_file, time_text)

_STEM = re.compile(r"^\d\d_\w+$")


def _did_you_mean(name, options) -> str:
    low = {str(o).lower(): o for o in options}
    close = difflib.get_close_matches(str(name).lower(), list(low), n=1, cutoff=0.6)
    return f"; did you mean {low[close[0]]!r}?" if close else "."


class RunnerError(SystemExit):
    """A user error of the runner (bad name, parameter or file); the message says the fix."""

    def __init__(self, msg: str):
        super().__init__(f"runner: {msg}")


# ------------------------------------------------------------------------------------------------
# notebooks and their parameters
# ------------------------------------------------------------------------------------------------
def all_notebooks() -> list[Path]:
    return sorted(p for p in paths.NOTEBOOKS.glob("*.ipynb") if _STEM.match(p.stem))


def find_notebooks(names=None) -> list[Path]:
    allnb = all_notebooks()
    if not names:
        return allnb
    out = []
    for n in names:
        p = Path(n)
        if p.suffix == ".ipynb":
            if not p.exists():
                raise RunnerError(f"notebook file {p} does not exist")
            out.append(p.resolve())
            continue
        hits = [q for q in allnb if q.stem == n] or [q for q in allnb if q.stem.startswith(n)]
        if not hits:
            raise RunnerError(f"no notebook named {n!r} in {_show(paths.NOTEBOOKS)}"
                              f"{_did_you_mean(n, [q.stem for q in allnb])} "
                              f"Available: {', '.join(q.stem for q in allnb)}")
        out.extend(hits)
    return list(dict.fromkeys(out))


def _parameters_cell(nb_path: Path):
    import nbformat
    nb = nbformat.read(str(nb_path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    return cells[0] if cells else None


def notebook_parameters(nb_path: Path) -> dict:
    """``{name: (default value, help)}`` of the ``parameters`` cell, as papermill reads it.

    Raises a :class:`RunnerError` naming the line when papermill cannot read an assignment of
    the cell (e.g. a second ``=`` inside the comment), because papermill would then silently
    refuse that parameter."""
    from papermill.translators import PythonTranslator

    cell = _parameters_cell(nb_path)
    if cell is None:
        return {}
    log = logging.getLogger("papermill")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: seen.append(rec.getMessage())
    log.addHandler(handler)
    old_propagate, log.propagate = log.propagate, False
    try:
        found = PythonTranslator.inspect(cell)
    finally:
        log.removeHandler(handler)
        log.propagate = old_propagate
    names = {p.name for p in found}
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as err:
        raise RunnerError(f"{nb_path.name}: the parameters cell has a syntax error at line "
                          f"{err.lineno}: {err.msg}; fix the cell") from err
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        for t in targets:
            if isinstance(t, ast.Name) and t.id not in names:
                line = cell.source.splitlines()[node.lineno - 1]
                raise RunnerError(
                    f"{nb_path.name}: papermill cannot read parameter {t.id!r} on line "
                    f"{node.lineno} of the parameters cell ({line.strip()!r}"
                    f"{'; ' + '; '.join(seen) if seen else ''}). Write one `name = value  # help` "
                    f"per line with no other '=' on it (rephrase the comment).")
    out = {}
    for p in found:
        try:
            value = ast.literal_eval(p.default)
        except (ValueError, SyntaxError):
            value = _NOT_LITERAL
        out[p.name] = (value, p.help)
    return out


# ------------------------------------------------------------------------------------------------
# listing (reads the notebooks' JSON; imports neither papermill nor torch, so it takes a moment)
# ------------------------------------------------------------------------------------------------
def list_notebooks(nbs, verbose_one=False) -> str:
    """``--list``: one line per notebook (what it shows, cold-run time, paper settings file);
    with one notebook named, its parameters and their help comments."""
    times = read_run_times()
    lines = []
    for nb in nbs:
        pfile = Path(paths.NOTEBOOKS) / "params" / f"{nb.stem}.yaml"
        has = pfile.exists()
        lines.append(f"{nb.stem:24s} {time_text(times.get(nb.stem)):>14s}  "
                     f"{'paper settings' if has else 'no paper file '}  {notebook_title(nb)}")
        if verbose_one:
            notebook_parameters(nb)   # papermill's reading: a line it would skip is an error
            params = listed_parameters(nb)
            width = min(max((len(n) + len(d) for n, d, _ in params), default=0) + 3, 36)
            lines.append("  parameters (-p NAME VALUE; paper settings: "
                         + (f"-f {_show(pfile)})" if has else "none)"))
            for n, d, h in params:
                lines.append(f"    {(n + ' = ' + d):{width}s}  {h}".rstrip())
    return "\n".join(lines)


class _NotLiteral:
    def __repr__(self):
        return "<expression>"


_NOT_LITERAL = _NotLiteral()


def _type_name(v) -> str:
    return {bool: "a bool (true/false)", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(v), type(v).__name__)


def _check_value(value, default, allow_none) -> str | None:
    """None if ``value`` fits the type of ``default``; else the expected type in words."""
    if value is None:
        return None if allow_none else _type_name(default)
    if default is None or default is _NOT_LITERAL:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else _type_name(default)
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return "a list"
        kinds = {type(d) for d in default}
        if len(kinds) == 1 and default:
            proto = default[0]
            for v in value:
                bad = _check_value(v, proto, allow_none=False)
                if bad:
                    return f"a list of {bad.split(' ', 1)[1]}s" if bad.startswith(("a ", "an ")) else bad
        return None
    if isinstance(default, dict):
        return None if isinstance(value, dict) else "a mapping"
    return None


def check_parameters(nb_path: Path, params: dict, source: str = "") -> None:
    """Reject unknown names and values whose type does not fit the default, before running."""
    known = notebook_parameters(nb_path)
    for k in params:
        if k not in known:
            raise RunnerError(f"{nb_path.stem} has no parameter {k!r}{source}"
                              f"{_did_you_mean(k, known)} Its parameters are: {', '.join(known)}")
    for k, v in params.items():
        default, helptext = known[k]
        # None is accepted where the default is None, the help says so ("None: all"), or the
        # parameter is a limit (max_*: None means no limit)
        allow_none = (default is None or k.startswith("max_")
                      or bool(re.search(r"\b(None|null)\b", helptext)))
        expected = _check_value(v, default, allow_none)
        if expected:
            raise RunnerError(f"parameter {k!r} of {nb_path.stem}{source} must be {expected} "
                              f"(its default is {default!r}"
                              f"{'; ' + helptext if helptext else ''}), got {v!r}. "
                              f"Example: -p {k} {json.dumps(default)}")


# ------------------------------------------------------------------------------------------------
# parameter files
# ------------------------------------------------------------------------------------------------
def read_params_file(file) -> tuple[str, dict]:
    """``("per-notebook", {stem: params})`` or ``("flat", params)`` from a YAML file."""
    f = Path(file)
    if not f.exists():
        raise RunnerError(f"parameter file {f} not found (give a path relative to the current "
                          f"folder, e.g. notebooks/params/00_tour.yaml)")
    try:
        data = yaml.safe_load(f.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RunnerError(f"parameter file {f}{where}: YAML syntax error ({problem}); fix that "
                          f"line (one `name: value` per line, quote strings holding ':' or '#')"
                          ) from None
    if data is None:
        return "flat", {}
    if not isinstance(data, dict):
        raise RunnerError(f"parameter file {f} must hold a mapping (`name: value` lines, or "
                          f"`<notebook>:` sections), got a {type(data).__name__}")
    stems = {p.stem for p in all_notebooks()}
    looks_like = [k for k in data if str(k) in stems or _STEM.match(str(k))]
    if not looks_like:
        return "flat", data
    others = [k for k in data if k not in looks_like]
    if others:
        raise RunnerError(f"parameter file {f} mixes notebook sections ({looks_like}) with flat "
                          f"parameters ({others}); put every parameter under its notebook's section")
    for k in looks_like:
        if str(k) not in stems:
            raise RunnerError(f"parameter file {f}: section {k!r} is not a notebook"
                              f"{_did_you_mean(k, sorted(stems))} Notebooks: {', '.join(sorted(stems))}")
        if data[k] is not None and not isinstance(data[k], dict):
            raise RunnerError(f"parameter file {f}: section {k!r} must be a mapping of "
                              f"parameters, got {data[k]!r}")
    return "per-notebook", {str(k): dict(v or {}) for k, v in data.items()}


def load_params(file, overrides, stem) -> dict:
    """Parameters of notebook ``stem``: its section of ``file`` (or the flat file) + overrides."""
    params = {}
    if file:
        kind, data = read_params_file(file)
        if kind == "per-notebook":
            if stem not in data:
                raise RunnerError(f"parameter file {file} has no section for {stem} (its sections: "
                                  f"{', '.join(data)}); add `{stem}:` or run only those notebooks")
            params.update(data[stem])
        else:
            params.update(data)
    for k, v in overrides or []:
        try:
            params[k] = yaml.safe_load(v)
        except yaml.YAMLError as err:
            raise RunnerError(f"-p {k} {v}: the value is not valid YAML ({err}); quote it") from None
    return params


# ------------------------------------------------------------------------------------------------
# JupyterLab's normal form
# ------------------------------------------------------------------------------------------------
def _process_stream_text(text: str, base: str = "", index: int = 0) -> tuple[str, int]:
    """Apply ``text`` to ``base`` at cursor ``index`` the way JupyterLab's output area does
    (``OutputAreaModel`` ``processText``: ``\\r`` returns to the line start and overwrites, ``\\b``
    deletes, ``\\n`` appends a line), returning the new text and cursor."""
    if not any(c in text for c in "\b\r\n"):
        return base[:index] + text + base[index + len(text):], index + len(text)
    r, o = index, 0
    while True:
        m = re.compile(r"[\n\b\r]").search(text, o)
        s = m.start() if m else -1
        seg = text[o:len(text) if s == -1 else s]
        base = base[:r] + seg + base[r + len(seg):]
        o, r = s + 1, r + len(seg)
        if s == -1:
            return base, r
        ch = text[s]
        if ch == "\b":
            if r > 0 and base[r - 1] != "\n":
                base, r = base[:r - 1] + base[r + 1:], r - 1
        elif ch == "\r":
            while not (r == 0 or base[r - 1] == "\n"):
                r -= 1
        else:
            base += "\n"
            r = len(base)


def coalesce_streams(outputs: list) -> list:
    """Merge consecutive stream outputs of one name, as JupyterLab shows (and saves) them."""
    out, cursor = [], 0
    for o in outputs:
        if o.get("output_type") == "stream":
            text = o["text"] if isinstance(o["text"], str) else "".join(o["text"])
            if out and out[-1].get("output_type") == "stream" and out[-1]["name"] == o["name"]:
                out[-1]["text"], cursor = _process_stream_text(text, out[-1]["text"], cursor)
                continue
            o = dict(o)
            o["text"], cursor = _process_stream_text(text)
        out.append(o)
    return out


def _widget_bar_text(model_id: str, state: dict) -> str | None:
    """The final text of a tqdm widget bar (HBox of description HTML, FloatProgress, counts HTML)
    from the saved widget state, for the ``text/plain`` fallback renderers without widgets show."""
    import html

    box = state.get(model_id, {}).get("state", {})
    kids = [state.get(str(c).removeprefix("IPY_MODEL_"), {}) for c in box.get("children", [])]
    if len(kids) != 3 or kids[1].get("model_name") != "FloatProgressModel":
        return None
    left = html.unescape(kids[0].get("state", {}).get("value", ""))
    right = html.unescape(kids[2].get("state", {}).get("value", ""))
    bar = kids[1].get("state", {})
    frac = float(bar.get("value", 0)) / float(bar.get("max") or 1)
    filled = max(0, min(10, int(frac * 10)))
    return f"{left}|{'█' * filled}{' ' * (10 - filled)}|{right}".replace("\u2007", " ")


def _widget_fallbacks(nb) -> None:
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}) \
        .get("state", {})
    if not state:
        return
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            view = o.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view:
                text = _widget_bar_text(view.get("model_id", ""), state)
                if text is not None:
                    o["data"]["text/plain"] = text


def kernelspec_metadata(name: str) -> dict:
    """``metadata.kernelspec`` as JupyterLab writes it when it starts kernel ``name``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return {"name": name, "display_name": name, "language": "python"}
    return {"name": name, "display_name": spec.display_name, "language": spec.language}


def _show(p) -> str:
    """A path for the terminal: repository-relative when inside the repository."""
    p = Path(p).resolve()
    try:
        return p.relative_to(Path(paths.ROOT).resolve()).as_posix()
    except ValueError:
        return str(p)


def _rel(p) -> str:
    """A path for a committed file: repository-relative, else just the name (no machine path)."""
    if not Path(p).is_absolute():
        return Path(p).as_posix()
    p = Path(p).resolve()
    try:
        return p.relative_to(Path(paths.ROOT).resolve()).as_posix()
    except ValueError:
        return p.name


def normalise(nb, kernel_name: str | None = None):
    """Put an executed notebook in the form JupyterLab keeps on open, so it opens unmodified.

    On opening a notebook JupyterLab (4.x) starts its kernel and sets ``metadata.kernelspec`` to
    ``{name, display_name, language}`` of the installed kernel spec and ``language_info`` to the
    kernel's reply; any difference marks the notebook modified (papermill keeps the committed
    ``"Python 3"`` display name where ipykernel installs ``"Python 3 (ipykernel)"``).  It also
    merges consecutive stream outputs (with ``\\r`` overwriting), gives every cell an id (nbformat
    4.5) and saves with ``nbformat.write`` (indent 1, sorted keys, trailing newline).  Machine
    paths papermill records (``metadata.papermill.input_path``/``output_path``) become
    repository-relative.  The ``text/plain`` fallback of a progress-bar widget (what viewers without
    widgets show) becomes the bar's final state instead of its first one."""
    import nbformat

    nb.nbformat, nb.nbformat_minor = 4, max(5, int(nb.get("nbformat_minor", 5)))
    name = kernel_name or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    nb.metadata["kernelspec"] = kernelspec_metadata(name)
    pm = nb.metadata.get("papermill")
    if pm is not None:
        for k in ("input_path", "output_path"):
            if pm.get(k):
                pm[k] = _rel(pm[k])
    _widget_fallbacks(nb)
    for i, cell in enumerate(nb.cells):
        if not cell.get("id"):
            cell["id"] = hashlib.sha1(f"{i}\n{cell.source}".encode()).hexdigest()[:8]
        if cell.cell_type == "code":
            cell.outputs = [nbformat.from_dict(o) for o in coalesce_streams(cell.outputs)]
    return nb


def write_notebook(nb, path: Path) -> None:
    """Write in the byte form jupyter_server saves (``nbformat.write``: trailing newline)."""
    import nbformat
    tmp = Path(path).with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp), version=nbformat.NO_CONVERT)
    os.replace(tmp, path)


def normalise_file(path: Path, kernel_name: str | None = None) -> bool:
    """Rewrite ``path`` in normal form; True if it changed."""
    import nbformat
    path = Path(path)
    before = path.read_bytes()
    write_notebook(normalise(nbformat.read(str(path), as_version=4), kernel_name), path)
    return path.read_bytes() != before


# ------------------------------------------------------------------------------------------------
# execution
# ------------------------------------------------------------------------------------------------
def _kernel_config(ipc_dir):
    """Kernel manager settings.  On POSIX: IPC sockets in ``ipc_dir`` (a fresh private folder the
    caller removes afterwards), so there is no
    TCP port to race for (jupyter_client picks free ports by binding and releasing them before
    the kernel binds them; in one CI run another process took the heartbeat port in between, and
    the kernel printed a traceback) and nothing travels over TCP.  Elsewhere: TCP with CurveZMQ
    encryption where pyzmq supports it (ipykernel >= 7 warns "Kernel is running over TCP without
    encryption" otherwise)."""
    import zmq
    from traitlets.config import Config

    cfg = Config()
    if os.name == "posix":
        cfg.KernelManager.transport = "ipc"
        cfg.KernelManager.ip = str(Path(ipc_dir) / "kernel")
    elif zmq.has("curve"):
        cfg.KernelManager.transport_encryption = "auto"
    return cfg


def _kernel_manager_class():
    """nbclient's kernel manager, without the SIGINT that jupyter_client sends before every
    shutdown.  The runner shuts a kernel down only after its notebook has finished or failed, so
    there is nothing to interrupt; when the signal landed while the idle kernel was handling a
    message, ipykernel logged "KeyboardInterrupt caught in kernel." on the user's terminal (seen in
    about 1 of 10 runs).  Built on first use: ``--list`` and ``--help`` stay without jupyter_client."""
    from jupyter_client.manager import AsyncKernelManager

    class QuietShutdownKernelManager(AsyncKernelManager):
        async def _async_interrupt_kernel(self):
            if getattr(self, "shutting_down", False):
                return
            await super()._async_interrupt_kernel()

    return QuietShutdownKernelManager


@contextlib.contextmanager
def _environ(**env):
    old = {k: os.environ.get(k) for k in env}
    try:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def failed_path(nb: Path, failed_dir: Path) -> Path:
    """A new file ``failed_dir/<notebook stem>-<UTC time>[-k].ipynb``: every failed run is kept."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    p = Path(failed_dir) / f"{nb.stem}-{stamp}.ipynb"
    k = 1
    while p.exists():
        k += 1
        p = Path(failed_dir) / f"{nb.stem}-{stamp}-{k}.ipynb"
    return p


def run_one(nb: Path, params: dict, out: Path, kernel: str | None = None, progress=False,
            figures: Path | None = None, threads: int | None = None, shard=None,
            failed_dir: Path | None = None) -> float:
    """Execute ``nb`` with ``params`` into ``out`` (normal form); figures under ``figures``;
    ``shard`` = (i, n) runs shard i of n of its heavy loops (``T2I_SHARD`` in the kernel).

    The committed notebook is replaced only by a successful run: execution writes a temporary
    file, and a failure moves it to a new file in ``failed_dir`` (default ``runs/failed/``;
    :func:`failed_path`, one per failed run), named by the exception's ``failed_notebook``
    attribute, and re-raises."""
    import nbformat
    import papermill as pm

    check_parameters(nb, params)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.stem}.running.ipynb"
    env = {"T2I_FIGURES": str(figures) if figures else os.environ.get("T2I_FIGURES"),
           # no folder of its own: this run regenerates the committed reference figures/<nb>/
           # (without the flag a notebook writes runs/interactive/<nb>/, see paths.figures_root)
           paths.REFERENCE_FLAG: None if figures else "1",
           # the debugger's "frozen modules" notice on every kernel start (Python 3.11+)
           "PYDEVD_DISABLE_FILE_VALIDATION": "1",
           # a shard only where asked for: a plain run is the reduce, whatever the shell holds
           "T2I_SHARD": f"{shard[0]}/{shard[1]}" if shard else None}
    if threads:
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    t0 = time.time()
    try:
        with _environ(**env), tempfile.TemporaryDirectory(prefix="t2i-kernel-") as ipc_dir:
            pm.execute_notebook(str(nb), str(tmp), parameters=params, cwd=str(paths.NOTEBOOKS),
                                kernel_name=kernel, progress_bar=progress, log_output=False,
                                request_save_on_cell_execute=False, config=_kernel_config(ipc_dir),
                                kernel_manager_class=_kernel_manager_class())
    except BaseException as err:
        if tmp.exists():
            failed = failed_path(nb, failed_dir or paths.RUNS / "failed")
            failed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, failed)
            try:
                err.failed_notebook = failed
            except AttributeError:   # pragma: no cover - exceptions without a __dict__
                pass
        raise
    dt = time.time() - t0
    done = normalise(nbformat.read(str(tmp), as_version=4), kernel)
    done.metadata["papermill"]["input_path"] = _rel(nb)
    done.metadata["papermill"]["output_path"] = _rel(out)
    write_notebook(done, tmp)
    os.replace(tmp, out)
    return dt


def _failure_message(nb: Path, err, injected: bool = False) -> str:
    """Name the failing cell by its index in the source notebook (papermill counts the cell it
    injects after the parameters cell when parameters are given)."""
    cell = getattr(err, "cell_index", None)
    if injected and cell is not None:
        import nbformat
        cells = nbformat.read(str(nb), as_version=4).cells
        tagged = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
        if tagged and cell > tagged[0]:
            cell -= 1
    count = getattr(err, "exec_count", None)
    ename, evalue = getattr(err, "ename", type(err).__name__), getattr(err, "evalue", str(err))
    where = f"cell {cell}" if cell is not None else "a cell"
    if count is not None:
        where += f" (execution count {count})"
    src = (getattr(err, "source", "") or "").strip().splitlines()
    first = [s for s in src if not s.startswith("#")][:1]
    if first:
        where += f", starting `{first[0][:80]}`"
    return f"runner: notebook {nb.stem} FAILED in {where}: {ename}: {evalue}"


def _plan(args, nbs):
    """[(notebook, params, executed-notebook path, figures root or None)], all validated."""
    kind, data = read_params_file(args.params_file) if args.params_file else (None, None)
    given = bool(args.params_file or args.param or args.name or args.shard)
    suffix = f"-shard{args.shard[0]}of{args.shard[1]}" if args.shard else ""
    if not args.names and kind == "per-notebook":
        nbs = find_notebooks(list(data))
    elif not args.names and kind == "flat" and Path(args.params_file).stem in {
            p.stem for p in nbs}:
        nbs = find_notebooks([Path(args.params_file).stem])
    plan = []
    src = f" (from {args.params_file})" if args.params_file else ""
    for nb in nbs:
        params = load_params(args.params_file, args.param, nb.stem)
        check_parameters(nb, params, src)
        if args.output_dir:
            root = Path(args.output_dir) / (suffix[1:] if suffix else "")
            out, figures = root / nb.name, root / "figures"
        elif given:
            root = paths.RUNS / ((args.name or nb.stem) + suffix)
            out, figures = root / nb.name, root / "figures"
        else:
            out, figures = nb, None
        plan.append((nb, params, out, figures))
    return plan


def failed_dir_of(args) -> Path:
    """Failed runs go under the chosen output folder (``--output-dir`` or ``runs/<name>``), else
    ``runs/failed``."""
    if args.output_dir:
        return Path(args.output_dir) / "failed"
    return paths.RUNS / "failed"


def _shard_argv(argv):
    """``--shard -1/2`` as ``--shard=-1/2``, so that argparse does not read the value as an option
    and the shard check reports it."""
    argv = list(argv)
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--shard" and i + 1 < len(argv) and argv[i + 1].startswith("-") and \
                argv[i + 1][1:2].isdigit():
            out.append(f"--shard={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _take_shard(args) -> None:
    """``--shard I/N`` or ``-p shard '[I, N]'`` -> ``args.shard = (I, N)`` (the ``-p`` form is
    removed from the notebook parameters); a bad value is a RunnerError naming the option."""
    given = [v for k, v in args.param or [] if k == "shard"]
    args.param = [kv for kv in args.param or [] if kv[0] != "shard"] or None
    if given and args.shard:
        raise RunnerError("give the shard once: --shard I/N or -p shard '[I, N]'")
    if not given and not args.shard:
        return
    # local: distributed imports torch (seconds); the runner's import, --help and --list stay without it
    from .distributed import ShardError, parse_shard
    try:
        args.shard = parse_shard(yaml.safe_load(given[-1]) if given else args.shard,
                                 name="--shard" if args.shard else "-p shard")
    except ShardError as err:
        raise RunnerError(str(err)) from None
    if args.shard and args.shard[1] == 1:
        args.shard = None                      # shard 0 of 1 is the plain run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t2i_common.runner", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="notebook stems/prefixes (default: all)")
    ap.add_argument("-f", "--params-file", help="YAML parameters (flat, or per notebook stem)")
    ap.add_argument("-p", "--param", nargs=2, action="append", metavar=("KEY", "VALUE"),
                    help="parameter override (VALUE parsed as YAML)")
    ap.add_argument("--name", help="run name: outputs go to runs/<name>/ (default with "
                                   "parameters: the notebook's stem)")
    ap.add_argument("--output-dir", help="folder for the executed notebooks and figures/")
    ap.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads of the kernel (OMP_NUM_THREADS)")
    ap.add_argument("--progress", action="store_true", help="show papermill's per-cell bar")
    ap.add_argument("--list", action="store_true",
                    help="one line per notebook: cold-run time (figures/run_times.json), whether "
                         "notebooks/params/ has its paper settings, what it shows; with one "
                         "notebook named, its parameters and their help")
    ap.add_argument("--readme-table", action="store_true",
                    help="print the README's notebook table from the titles and "
                         "figures/run_times.json")
    ap.add_argument("--shard", metavar="I/N",
                    help="run shard I of N (0 <= I < N) of the heavy loops into the shared cache; "
                         "afterwards the plain run reduces (also: -p shard '[I, N]')")
    ap.add_argument("--normalise", action="store_true",
                    help="rewrite the notebooks in JupyterLab's normal form without running them")
    args = ap.parse_args(_shard_argv(sys.argv[1:] if argv is None else argv))
    _take_shard(args)

    nbs = find_notebooks(args.names)
    if args.list:
        print(list_notebooks(nbs, verbose_one=len(nbs) == 1 and bool(args.names)))
        return 0
    if args.readme_table:
        print(readme_table(nbs))
        return 0
    if args.normalise:
        for nb in nbs:
            print(f"{nb.stem}: {'normalised' if normalise_file(nb, args.kernel) else 'unchanged'}")
        return 0
    plan = _plan(args, nbs)
    times = {}
    for i, (nb, params, out, figures) in enumerate(plan, 1):
        tag = f"[{i}/{len(plan)}] {nb.stem}"
        what = json.dumps(params) if params else "(defaults)"
        if args.shard:
            what += f", shard {args.shard[0]}/{args.shard[1]}"
        print(f"{tag} {what} -> {_show(out)}", flush=True)
        reference = figures is None and not os.environ.get("T2I_FIGURES") and out == nb
        cache_was_empty = not any(Path(paths.CACHE).glob("*")) if reference else False
        try:
            times[nb.stem] = run_one(nb, params, out, args.kernel, args.progress, figures,
                                     args.threads, args.shard,
                                     failed_dir=failed_dir_of(args) if not args.name else
                                     out.parent / "failed")
        except SystemExit:
            raise
        except Exception as err:
            print(_failure_message(nb, err, injected=bool(params)), file=sys.stderr, flush=True)
            kept = getattr(err, "failed_notebook", None)
            if kept is not None:
                print(f"runner: the partially executed notebook is at {_show(kept)}",
                      file=sys.stderr)
            return 1
        fig_root = figures or os.environ.get("T2I_FIGURES") or Path(paths.ROOT) / "figures"
        out_name = params.get("out_name", notebook_parameters(nb).get("out_name", (None,))[0])
        where = Path(fig_root) / out_name if isinstance(out_name, str) else Path(fig_root)
        print(f"{tag} done in {times[nb.stem]:.1f} s; figures in {_show(where)}/", flush=True)
        if reference:   # the reference regeneration: its wall time goes to figures/run_times.json
            record_run_time(nb.stem, times[nb.stem], args.threads, cache_was_empty)
        if args.shard:
            print(f"{tag} shard {args.shard[0]}/{args.shard[1]} is in the cache; its tables hold "
                  f"placeholders. After all {args.shard[1]} shards, `python -m t2i_common.runner "
                  f"{nb.stem}` (same options, no shard) makes the tables from the cache.",
                  flush=True)
    if len(times) > 1:
        print("\nnotebook times:")
        for k, v in times.items():
            print(f"  {k:32s} {v:8.1f} s")
        print(f"  {'total':32s} {sum(times.values()):8.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
