"""`torchrun --nproc_per_node=N -m medusa_forge.train <flags>`: the original trainer's command line."""

import sys

from medusa_forge.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
