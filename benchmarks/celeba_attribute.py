"""The celeba-attribute benchmark; the same as `focalsearch bench celeba-attribute`, with the same options.

    python benchmarks/celeba_attribute.py --data DIR --model M [--encoder focallens|clip|clip+text] [--json OUT]

The protocol and the data layout are described in focalsearch/bench/ and in the README.
"""

import sys

from focalsearch.cli import app

if __name__ == "__main__":
    app(["bench", "celeba-attribute", *sys.argv[1:]], prog_name=f"{sys.argv[0]}")
