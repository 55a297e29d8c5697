"""The notebooks at a glance, read from their JSON (no papermill, no torch): titles, the
parameters cell with its help comments, and the wall times of reference runs
(``figures/run_times.json``) for ``python -m t2i_common.runner --list`` and the README's table."""
from __future__ import annotations

import ast
import datetime
import io
import json
import os
import platform
import tokenize
from pathlib import Path

from . import paths


def _show(p) -> str:
    p = Path(p).resolve()
    try:
        return p.relative_to(Path(paths.ROOT).resolve()).as_posix()
    except ValueError:
        return str(p)


def _read_json(nb_path: Path) -> dict:
    return json.loads(Path(nb_path).read_text(encoding="utf-8"))


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def notebook_title(nb_path: Path) -> str:
    """The first markdown heading of the notebook (what it shows), without the ``#``."""
    for cell in _read_json(nb_path).get("cells", []):
        if cell.get("cell_type") == "markdown":
            for line in _source(cell).splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return ""


def listed_parameters(nb_path: Path) -> list[tuple[str, str, str]]:
    """``[(name, default as written, help comment)]`` of the ``parameters`` cell, read from the
    notebook's JSON with :mod:`ast` and :mod:`tokenize` (papermill reads the same lines; this is
    the fast path of ``--list``)."""
    cells = [c for c in _read_json(nb_path).get("cells", [])
             if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        return []
    src = _source(cells[0])
    comments = {}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
        tree = ast.parse(src)
    except (SyntaxError, tokenize.TokenError) as err:
        raise SystemExit(f"runner: {Path(nb_path).name}: the parameters cell does not parse ({err}); "
                         f"fix the cell") from None
    out = []
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else (
            node.target if isinstance(node, ast.AnnAssign) else None)
        if isinstance(target, ast.Name) and node.value is not None:
            out.append((target.id, ast.get_source_segment(src, node.value) or "",
                        comments.get(node.end_lineno, "")))
    return out


def run_times_file() -> Path:
    """``figures/run_times.json``: each notebook's wall time of its last reference regeneration."""
    return Path(paths.ROOT) / "figures" / "run_times.json"


def read_run_times() -> dict:
    f = run_times_file()
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text()).get("notebooks", {})
    except (json.JSONDecodeError, AttributeError) as err:
        raise SystemExit(f"runner: {_show(f)} is not valid JSON ({err}); delete it, the next "
                         f"`python -m t2i_common.runner` rewrites it") from None


def record_run_time(stem: str, seconds: float, threads, cache_was_empty: bool) -> None:
    """Add/replace ``stem``'s entry of :func:`run_times_file` (written atomically)."""
    f = run_times_file()
    data = {"how": "wall time of `python -m t2i_common.runner NN` regenerating the reference "
                   "(kernel start to last cell); a cold run starts with an empty cache: "
                   "T2I_CACHE=$(mktemp -d) python -m t2i_common.runner NN, one notebook at a time "
                   "on an otherwise idle machine",
            "notebooks": read_run_times()}
    data["notebooks"][stem] = {
        "seconds": round(float(seconds), 1),
        "cold": bool(cache_was_empty),
        "threads": threads or os.environ.get("OMP_NUM_THREADS") or "torch default",
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m t2i_common.runner " + " ".join(
            ([f"--threads {threads}"] if threads else []) + [stem])}
    data["notebooks"] = dict(sorted(data["notebooks"].items()))
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, f)


def time_text(entry) -> str:
    if not entry:
        return "not measured"
    sec = entry["seconds"]
    t = f"{sec:.0f} s" if sec < 120 else f"{sec / 60:.1f} min"
    return t + ("" if entry.get("cold") else " (warm cache)")


def readme_table(nbs) -> str:
    """The README's notebook table (what each shows, its cold-run time) from the notebooks'
    titles and :func:`run_times_file`; ``python -m t2i_common.runner --readme-table`` prints it."""
    times = read_run_times()
    rows = ["| notebook | what it shows | cold run |", "|---|---|---|"]
    for nb in nbs:
        rows.append(f"| `{nb.stem}` | {notebook_title(nb)} | {time_text(times.get(nb.stem))} |")
    return "\n".join(rows)
