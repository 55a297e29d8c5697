"""t2i_common: the thin shared module behind the t2i-repro notebooks.

Layers (imports point up): formats -> models -> engine -> methods (alignment, itm,
infotheory, training) -> report.  Notebooks call methods and report only.
"""
__version__ = "0.1.0"
