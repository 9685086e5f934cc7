#!/usr/bin/env bash
# The standing GPU checks in one run, from the repository root of a CUDA machine:
#   the CUDA tests, indexing throughput with a ViT-L/14-336-shaped model, exact search at 1M vectors
#   (faiss-gpu where installed, beside the torch bound and faiss-cpu), serve latency with the model on the GPU,
#   and the MLLM family's encode rate in bf16 at a ViT-L/14-336 + Llama-2-7B LLaVA's shape (4 vs 1 instruction, prefix reuse).
# Each step's log and JSON land in $OUT (default: a new temporary folder); a failed or timed-out step
# does not stop the next. Python packages the machine lacks may come as a prepared site folder:
# .dev/site.tar.xz (unpacked to /tmp/site) and .dev/lancedb.so.xz (LanceDB's native module, packed apart).
set -u
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -f .dev/site.tar.xz ]; then
    mkdir -p /tmp/site
    tar -xJf .dev/site.tar.xz -C /tmp/site
    [ -f .dev/lancedb.so.xz ] && xz -dc .dev/lancedb.so.xz > /tmp/site/lancedb/_lancedb.abi3.so
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
PYTHON=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output to the terminal and $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T))"
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    echo "=== $name exit $?"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
$PYTHON -c "import torch, faiss, lancedb, transformers; print('torch', torch.__version__, 'faiss', faiss.__version__, 'lancedb', lancedb.__version__, 'transformers', transformers.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/card.txt"
step cuda_tests "${CUDA_TESTS_S:-150}" $PYTHON -m pytest -q -p no:cacheprovider -rs tests/test_search.py -k cuda
step throughput "${THROUGHPUT_S:-300}" $PYTHON benchmarks/throughput.py --device cuda --models vit-l14-336 \
    --images 480 --vit-images 480 --json "$OUT/throughput.json"
step gpu_search "${SEARCH_S:-150}" $PYTHON benchmarks/gpu_search.py --repeats 10 --json "$OUT/gpu_search.json"
step serve_latency "${SERVE_S:-240}" $PYTHON benchmarks/serve_latency.py --json "$OUT/serve_latency.json"
step mllm_gpu "${MLLM_S:-300}" $PYTHON benchmarks/mllm_gpu.py --json "$OUT/mllm_gpu.json"
