"""Progress bars whose saved plain text says where they finished.

In a Jupyter kernel ``tqdm.auto`` draws a widget and displays it once, at the start; the display's
``text/plain`` fallback (what a viewer without widgets, and the saved notebook, shows) is the bar's
repr at that moment: ``0%``.  :func:`install` makes every ``tqdm.notebook`` bar (ours, and those of
transformers and diffusers) display with a display id and re-send its display when it closes, so
JupyterLab and nbclient replace the saved fallback with the final state (``100%|...| 36/36``).
It is called on importing :mod:`t2i_common` inside a Jupyter kernel; elsewhere it does nothing.
"""
from __future__ import annotations

import sys


def install() -> bool:
    """Patch ``tqdm.notebook`` once (idempotent); False where there is no IPython/ipywidgets."""
    try:
        import tqdm.notebook as tn
    except ImportError:
        return False
    if getattr(tn.tqdm_notebook, "_t2i_final_text", False):
        return True
    if getattr(tn, "IProgress", None) is None:          # no ipywidgets: tqdm prints text bars
        return False
    show = tn.display                                   # IPython.display.display

    def display(obj, *args, **kwargs):
        if isinstance(obj, tn.TqdmHBox) and "display_id" not in kwargs:
            obj._t2i_handle = show(obj, *args, display_id=True, **kwargs)
            return obj._t2i_handle
        return show(obj, *args, **kwargs)

    close = tn.tqdm_notebook.close

    def close_and_update(self):
        was_open = not self.disable                     # tqdm closes a bar once; later calls
        close(self)                                     # (e.g. from __del__) do nothing
        handle = getattr(getattr(self, "container", None), "_t2i_handle", None)
        if was_open and handle is not None:
            # the bundle is built here, not by repr(container): a bar closed by its __del__ has
            # lost the container's weak proxy to it, and a failing repr would print a traceback
            text = self.format_meter(**self.format_dict)
            view = {"version_major": 2, "version_minor": 0, "model_id": self.container.model_id}
            handle.update({"text/plain": text[:110] + ("…" if len(text) > 110 else ""),
                           "application/vnd.jupyter.widget-view+json": view}, raw=True)

    tn.display = display
    tn.tqdm_notebook.close = close_and_update
    tn.tqdm_notebook._t2i_final_text = True
    return True


def install_in_kernel() -> bool:
    """:func:`install` when running inside a Jupyter kernel (ipykernel imported)."""
    return install() if "ipykernel" in sys.modules else False
