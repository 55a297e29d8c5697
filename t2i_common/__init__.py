"""t2i_common: the thin shared module behind the t2i-repro notebooks.

Layers (imports point up): the shared layer at the top of the package (paths, imageio, cache,
keys, models, engine, distributed, trainloop, sdformat, report, runner), ``formats/`` (the
published dataset formats), ``toyworld/`` (the toy world, its export in the published formats and
the toy checkpoint's training), and one subpackage per paper: ``implosion``, ``attribution``,
``unclip``, ``diffusion_itm``, ``info_decomp``.  No paper imports another.  Notebooks call a
paper's subpackage and ``report`` only.
"""
__version__ = "0.1.0"

from .progress import install_in_kernel as _install_progress

_install_progress()  # in a Jupyter kernel: a saved progress bar says where it finished
