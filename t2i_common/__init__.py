"""t2i_common: the thin shared module behind the t2i-repro notebooks.

Layers (imports point up): formats -> models -> engine -> methods (alignment, itm,
infotheory, training) -> report.  Notebooks call methods and report only.
"""
__version__ = "0.1.0"

from .progress import install_in_kernel as _install_progress

_install_progress()  # in a Jupyter kernel: a saved progress bar says where it finished
