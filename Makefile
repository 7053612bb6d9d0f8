# The developer loop; .ci/run calls the same targets. Run inside the venv of the README.
PYTEST = TRITON_INTERPRET=1 python -m pytest -q

.PHONY: lint test-fast test test-threads test-gpu aot bench

lint:
	ruff check .
	ruff format --check .
	python tools/check_imports.py

test-fast:
	$(PYTEST) -m "not slow"

test:
	$(PYTEST)

# other summation orders, as on another CPU: one thread, the pure-PyTorch reference backend
test-threads:
	CAUSALSCAN_TEST_THREADS=1 CAUSALSCAN_BACKEND=torch $(PYTEST) -m "not slow and not real"

# compiled kernels, never the interpreter (the GPU tests refuse TRITON_INTERPRET=1)
test-gpu:
	TRITON_INTERPRET=0 python -m pytest -q -m gpu

aot:
	python tests/aot_compile.py --arch 90

bench:
	python bench/bench_patching.py
	python bench/bench_scan.py
	python bench/bench_elicit.py
	python bench/bench_smollm2.py
