"""pytest configuration of the notebook regression tests (``make nbval``).

The notebooks of one paper share artefacts: the toy exports of 40_gdbench (read by 41 and 42),
the models, Fisher and losses of the attribution world (20-22), cached generations and scores.
Under pytest-xdist (``--dist loadgroup``) the notebooks of one paper therefore form one group,
run by one worker in their order, so that no two processes build the same artefact at once and
the later notebooks reuse what the earlier ones cached, as in a serial run.  The first digit of a
notebook's name is its paper (0: the tour and the toy world).
"""
from pathlib import Path

import pytest

PAPER_GROUPS = {"0": "toy-world", "1": "implosion", "2": "attribution", "3": "unclip",
                "4": "diffusion-itm", "5": "info-decomp"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        nb = Path(str(item.path))
        if nb.suffix == ".ipynb":
            item.add_marker(pytest.mark.xdist_group(PAPER_GROUPS.get(nb.name[:1], nb.stem)))
