# LayerKV benchmarks (bench/). Results land in bench/results/ (git-ignored).
# Override e.g.: make bench LAYERKV_BENCH_ARGS="--requests 16 --rates 0.5 1 2 --kv-cap-blocks 70"
LAYERKV_BENCH_ARGS ?=
COPY_BENCH_ARGS ?=

.PHONY: bench bench-copy

bench: $(STAMPS)/proto model  ## LayerKV vs stock vLLM (capped, uncapped): bench/results/layerkv.json
	$(PY) bench/layerkv_bench.py --model $(MODEL_DIR) $(LAYERKV_BENCH_ARGS)

bench-copy:  ## host<->device copy path microbenchmark: bench/results/copy_bench.json
	$(PY) bench/copy_bench.py $(COPY_BENCH_ARGS)
