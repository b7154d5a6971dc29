# pulumi-nixos: `make test` and `make demo` do the whole setup on a fresh machine.
SHELL := /bin/bash
HOSTS ?= 2
ENV := source scripts/env.sh &&
PYTEST_ARGS ?=

.PHONY: setup test demo lab-up lab-status lab-down lint sdk bench clean

setup:
	bash scripts/setup.sh

test: setup
	$(ENV) pulumi version && python -m pytest tests $(PYTEST_ARGS)

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

bench: setup
	$(ENV) python bench/run.py

clean: lab-down
	rm -rf .venv .tools
