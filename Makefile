# The two commands of the README: `make demo` and `make test`. Both provision first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: bench-vm setup demo test test-stress test-vm test-vm-full test-vm-distro conformance fuzz soak docs lint bench bench-images clean

setup:
	bash scripts/provision.sh

demo: setup
	$(PY) -m pycriu.demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite again and again from a fresh clone: idle, CPUs busy, heavy I/O (scripts/stress.sh).
test-stress: setup
	bash scripts/stress.sh

# The tests that need soft-dirty memory tracking (pre-dump, pre-copy, hybrid), run in a QEMU guest
# on Debian 12's own kernel (scripts/vm/run.sh, scripts/vm/build.sh). VM_TESTS picks others.
VM_TESTS ?= tests/test_pre_dump.py tests/test_migration_precopy.py tests/test_workload.py \
	tests/test_memory_images.py::test_an_incremental_dump_is_read_through_its_parent tests/test_option_effects_predump.py
test-vm: setup
	bash scripts/vm/run.sh $(PY) -m pytest $(VM_TESTS) $(PYTEST_ARGS)

# The whole suite in that guest (slow under emulation: not part of CI).
test-vm-full: setup
	PYCRIU_VM_TIMEOUT=$${PYCRIU_VM_TIMEOUT:-7200} bash scripts/vm/run.sh $(PY) -m pytest $(PYTEST_ARGS)

# The same guest as Debian 12 users have it: Debian's own criu 3.17.1 installed in the guest's
# throw-away root (the provisioned 4.2 hidden there), pycriu rebuilt against its libcriu
# (scripts/vm/distro-criu.sh, scripts/vm/with-distro-criu.sh). VM_DISTRO_TESTS: the whole suite.
VM_DISTRO_TESTS ?=
test-vm-distro: setup
	PYCRIU_VM_TIMEOUT=$${PYCRIU_VM_TIMEOUT:-7200} bash scripts/vm/run.sh bash scripts/vm/with-distro-criu.sh \
		"$$(bash scripts/vm/distro-criu.sh)" $(PY) -m pytest $(VM_DISTRO_TESTS) $(PYTEST_ARGS)

# CRIU's zdtm tests (built from the provisioned source) through the CLI, pycriu's Criu and every
# Migration flow; the table and every test pycriu fails where the CLI passes (docs/conformance.rst).
CONFORMANCE_ARGS ?= --mode all --flavor h,ns --all
conformance: setup
	bash scripts/zdtm.sh
	$(PY) -m pycriu.conformance $(CONFORMANCE_ARGS) --json build/conformance.json

# The agent's fuzzing at a larger budget; the counts per message type go to fuzz-counts.json.
fuzz: setup
	PYCRIU_FUZZ_EXAMPLES=$${PYCRIU_FUZZ_EXAMPLES:-2000} PYCRIU_FUZZ_REPORT=$(CURDIR)/fuzz-counts.json \
		$(PY) -m pytest -q tests/test_agent_fuzz.py

# 200 migrations back and forth between two agents in two network namespaces, classic and lazy.
soak: setup
	PYCRIU_SOAK_ROUNDS=$${PYCRIU_SOAK_ROUNDS:-200} $(PY) -m pytest -q -s tests/test_soak.py

docs: setup
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

lint: setup
	$(VENV)/bin/mypy
	$(VENV)/bin/ruff check pycriu csrc tests

bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# Checkpoint inspection: search, diff and inspect over a 1 GiB checkpoint against grep -c and
# CRIU's crit (bench/images.py; results in bench/results/images.{json,md}).
bench-images: setup
	$(PY) -m bench.images $(BENCH_ARGS)

# The migration benchmark inside the test VM (Debian 12's kernel, soft-dirty: pre-copy and hybrid
# run there), small workloads for emulation; results in build/vm/bench, reference in
# bench/results/vm-6.1.{md,json,png}.
VM_BENCH_ARGS ?= --sizes 32 --rates idle,busy --links lo --modes classic,lazy,pre-copy,hybrid --repeat 3 \
	--ref-mib 32 --settle 1
bench-vm: setup
	PYCRIU_VM_TIMEOUT=$${PYCRIU_VM_TIMEOUT:-2700} bash scripts/vm/run.sh $(PY) -m bench $(VM_BENCH_ARGS) \
		--out /run/pycriu-vm/bench

clean:
	rm -rf build docs/_build .pytest_cache pycriu/_libcriu*.so pycriu/_libcriu.c pycriu/images/_scan.c pycriu/images/_scan*.so
