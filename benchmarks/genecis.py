"""The genecis benchmark; the same as `focalsearch bench genecis`, with the same options.

    python benchmarks/genecis.py --data DIR --model M [--encoder focallens|clip|clip+text|text-only] [--json OUT]
        [--task focus_attribute|change_attribute|focus_object|change_object ...] [--ties official|pessimistic]

Without --task it runs every task whose annotations and images are under DIR and names the rest.
The official baselines: --encoder clip (image only), text-only, clip+text (image plus text).
Scores are float32 unless --precision says otherwise (the precision is in the JSON).

The protocol and the data layout are described in focalsearch/bench/ and in the README.
"""

import sys

from focalsearch.cli import app

if __name__ == "__main__":
    app(["bench", "genecis", *sys.argv[1:]], prog_name=f"{sys.argv[0]}")
