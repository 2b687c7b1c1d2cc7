# Admission benchmark (issue #4): TTFT prediction accuracy, SLO goodput, overhead.
# Writes bench/results/admission.json (+ admission_ttft.svg). BENCH_ADMISSION_ARGS
# passes options, e.g. BENCH_ADMISSION_ARGS="--scale 0.5" for a shorter run.
.PHONY: bench-admission
BENCH_ADMISSION_ARGS ?=

bench-admission: $(STAMPS)/proto model
	$(PY) bench/admission_bench.py --model $(MODEL_DIR) $(BENCH_ADMISSION_ARGS)
