"""``python -m t2i_common.attribution``: attribution by unlearning from the original's files."""
from .unlearning import main

if __name__ == "__main__":
    main()
