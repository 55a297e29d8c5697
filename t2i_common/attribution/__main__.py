"""``python -m t2i_common.attribution``: attribution by unlearning from the original's files
(:mod:`~t2i_common.attribution.files`)."""
import sys

from .files import main

if __name__ == "__main__":
    sys.exit(main())
