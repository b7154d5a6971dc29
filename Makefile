# pulumi-nixos: `make test` and `make demo` do the whole setup on a fresh machine.
SHELL := /bin/bash
HOSTS ?= 2
ENV := source scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: setup test test-fresh faults demo lab-up lab-status lab-down lint sdk dist bench clean

setup:
	bash scripts/setup.sh

# The suite on Nix 2.8, 2.26 and 2.34, each leg in a fresh-machine namespace.
test: setup
	$(ENV) pulumi version && bash scripts/test-matrix.sh $(PYTEST_ARGS)

# `make test` from a fresh clone where nothing of this machine's Nix setup is visible.
test-fresh:
	bash scripts/test-fresh.sh

# The fault suite at the counts docs/reliability.md promises; rewrites its table. About 40 minutes.
faults: setup
	$(ENV) bash scripts/in-release.sh bookworm env PULUMI_NIXOS_FAULTS=full PULUMI_NIXOS_LEG=faults LAB_TEST_NET=75 \
	  python -m pytest -p no:cacheprovider --basetemp=/tmp/pytest-faults -s tests/test_faults.py $(PYTEST_ARGS)

lint: setup
	$(ENV) ruff check provider tests bench tests/lab/nixos-anywhere && mypy

demo: setup
	$(ENV) bash scripts/demo.sh

lab-up: setup
	$(ENV) python tests/lab/labctl.py up --hosts $(HOSTS)

lab-status:
	@python3 tests/lab/labctl.py status

lab-down:
	python3 tests/lab/labctl.py down

sdk: setup
	$(ENV) bash scripts/gen-sdk.sh

# The plugin archive and the SDK packages at the provider's version, into dist/ (scripts/dist.sh).
dist: setup
	$(ENV) bash scripts/dist.sh

bench: setup
	$(ENV) python bench/run.py && python bench/real_fleet.py && python bench/fleet.py && python bench/push_compare.py && python bench/fleet_up.py && python bench/cold_start.py && python bench/cache.py && python bench/substitute.py

clean: lab-down
	rm -rf .venv .tools
