"""`torchrun --nproc_per_node=N -m medusa_forge.train <flags>`: the tutorial's training command."""

import sys

from medusa_forge.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
