"""`python -m focalsearch.train ARGS`: the `focalsearch train` command, for torchrun:

    torchrun --nproc-per-node N -m focalsearch.train --base ... --data ... --out ...
"""

from focalsearch.cli import app

if __name__ == "__main__":
    import sys

    app(["train", *sys.argv[1:]], prog_name="focalsearch train")
