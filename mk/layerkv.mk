# LayerKV benchmarks (bench/). Results land in bench/results/ (git-ignored).
# Default sweep (~7 min on 2 cores): rates 0.5/1/2 rps at mean prompt 1500 and prompt
# means 500/1000/1500 at 1 rps (12 Poisson requests each, 64-512 output tokens), plus
# the issue's point (8 x 1500-token prompts 1 s apart, 256 outputs). The JSON's
# targets_heaviest_point checks the issue's targets where capped stock's mean TTFT is
# >= 5x uncapped's. Override e.g.:
#   make bench LAYERKV_BENCH_ARGS="--requests 16 --layerkv-settings '{\"min_resident_groups\": 1}'"
LAYERKV_BENCH_ARGS ?=
COPY_BENCH_ARGS ?=

.PHONY: bench bench-copy

bench: $(STAMPS)/proto model  ## LayerKV vs stock vLLM (capped, uncapped): bench/results/layerkv.json
	$(PY) bench/layerkv_bench.py --model $(MODEL_DIR) $(LAYERKV_BENCH_ARGS)

bench-copy:  ## host<->device copy path microbenchmark: bench/results/copy_bench.json
	$(PY) bench/copy_bench.py $(COPY_BENCH_ARGS)
