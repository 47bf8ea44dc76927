# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Both do all set-up themselves (scripts/setup.sh) and are safe to run again.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint typecheck unit integration bench-formats bench-lazyfs bench-restart bench-fleet bench proto clean

setup:
	@scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup lint typecheck
	$(VENV)/bin/pytest -q tests

unit: setup
	$(VENV)/bin/pytest -q tests/unit

integration: setup
	$(VENV)/bin/pytest -q tests/integration

lint: setup
	$(VENV)/bin/ruff check snapshotter tests bench scripts
	$(VENV)/bin/ruff format --check snapshotter tests bench scripts

typecheck: setup
	$(VENV)/bin/mypy snapshotter

bench-formats: setup
	$(PY) -m bench.formats

proto: setup
	scripts/gen_proto.sh

bench-lazyfs: setup
	$(PY) -m bench.lazyfs

# Time from a control-plane start to serving with 20 lazy layers mounted (root; a minute).
bench-restart: setup
	$(PY) -m bench.restart

# N node namespaces (1, 3, 5) behind one mirror: origin bytes / image size, time to ready per
# node (root; writes bench/out/fleet.{json,md}).
bench-fleet: setup
	$(PY) -m bench.fleet

# Time to ready: overlayfs, pysoci and the real soci, with and without prefetch, on a shaped
# network (root; about 80 minutes, 50 with `python -m bench.startup --runs 3 --publish`; updates
# bench/results/, which the README shows). Images are cached in /var/cache/pysoci-bench.
bench: setup
	$(PY) -m bench.startup --publish

clean:
	rm -rf $(VENV) demo-out bench/out .pytest_cache .mypy_cache .ruff_cache .hypothesis
