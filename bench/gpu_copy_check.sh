#!/usr/bin/env bash
# The GPU half of the copy path, for a machine with CUDA and PyTorch but no vLLM (the
# device machine this project is sometimes lent): the kv_copy tests on CUDA (pinned
# memory, side stream, events) and the copy microbenchmark at the tiny model's shape
# and at two real models' shapes. Results as JSON under ${OUT:-bench/results}.
set -euo pipefail
out=${OUT:-bench/results}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=services PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv || true
"$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")'
"$py" -m pytest -q -c /dev/null --noconftest -p no:cacheprovider tests/unit/test_kv_copy.py 2>&1 | tee "$out/kv_copy_tests.txt" || echo "kv_copy tests FAILED"
# The CPU test model's shape (8 layers, 4 KV heads x 32, fp32).
"$py" bench/copy_bench.py --out "$out/copy_tiny.json"
# Llama-3-8B (32 layers, GQA 8 KV heads x 128, fp16), a 8k-token request, decode batch 64.
"$py" bench/copy_bench.py --tokens 8192 --layers 32 --kv-heads 8 --head-dim 128 \
  --block-size 16 --hidden 4096 --batch 64 --matmuls-per-layer 3 --dtype float16 \
  --out "$out/copy_llama3_8b.json"
# Llama-2-7B (32 layers, MHA 32 KV heads x 128, fp16), a 4k-token request.
"$py" bench/copy_bench.py --tokens 4096 --layers 32 --kv-heads 32 --head-dim 128 \
  --block-size 16 --hidden 4096 --batch 64 --matmuls-per-layer 3 --dtype float16 \
  --out "$out/copy_llama2_7b.json"
