"""The sugarcrepe benchmark; the same as `focalsearch bench sugarcrepe`, with the same options.

    python benchmarks/sugarcrepe.py --data DIR --model M [--encoder focallens|clip|clip+text] [--json OUT]

On a plain CLIP checkpoint --encoder defaults to plain clip, the official SugarCrepe baseline; scores are
float32 unless --precision says otherwise (the precision is in the JSON).

The protocol and the data layout are described in focalsearch/bench/ and in the README.
"""

import sys

from focalsearch.cli import app

if __name__ == "__main__":
    app(["bench", "sugarcrepe", *sys.argv[1:]], prog_name=f"{sys.argv[0]}")
