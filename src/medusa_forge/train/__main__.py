"""`torchrun --nproc_per_node=N -m medusa_forge.train <flags>`: the tutorial's training command."""

import sys

from medusa_forge.train.run import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
