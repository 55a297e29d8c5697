"""Progress bars in a Jupyter kernel: the saved plain-text fallback shows the final state."""
import os

import nbformat as nbf
from nbclient import NotebookClient

from t2i_common import paths

LOOP = ("from tqdm.auto import tqdm\n"
        "for i in tqdm(range(7), desc='loop'):\n"
        "    pass")
# bars closed twice, or only when collected, must not fail
LATER = ("import gc\n"
         "t = tqdm(total=2, desc='manual'); t.update(2); t.close(); t.close()\n"
         "u = tqdm(total=3, desc='unclosed'); u.update(1); del u; gc.collect()\n"
         "print('fine')")


def _run(first_cell, monkeypatch):
    # the kernel imports this checkout's t2i_common
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(paths.ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    nb = nbf.v4.new_notebook()
    nb.cells = [nbf.v4.new_code_cell(first_cell), nbf.v4.new_code_cell(LOOP),
                nbf.v4.new_code_cell(LATER)]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    assert [o.text for o in nb.cells[2].outputs if o.output_type == "stream"] == ["fine\n"]
    assert not [o for c in nb.cells for o in c.outputs if o.output_type == "error"
                or o.get("name") == "stderr"]
    outs = [o for o in nb.cells[1].outputs if o.output_type == "display_data"]
    assert len(outs) == 1 and "application/vnd.jupyter.widget-view+json" in outs[0].data
    return outs[0].data["text/plain"]


def test_saved_bar_text_is_the_final_state(monkeypatch):
    assert _run("import sys", monkeypatch).startswith("loop:   0%")  # tqdm alone: the first state
    text = _run("import t2i_common", monkeypatch)                             # the package installs the fix
    assert text.startswith("loop: 100%") and "7/7" in text
