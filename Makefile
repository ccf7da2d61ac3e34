# The two commands of the README. Both set up the environment first (cached).
SHELL := /bin/bash


.PHONY: serve test test-fast lint fmt bench-kernels
serve:
	@scripts/bootstrap.sh >/dev/null
	.venv/bin/python -m esp_serve.app.config serve_config.yaml
	RAY_AUTH_MODE=$${RAY_AUTH_MODE:-disabled} .venv/bin/serve run serve_config.yaml

test: lint
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

# ruff (settings in pyproject.toml): lint, and the formatter's check; `make fmt` applies both
lint:
	@EXTRAS=test scripts/bootstrap.sh >/dev/null
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

fmt:
	@EXTRAS=test scripts/bootstrap.sh >/dev/null
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

test-fast:
	@EXTRAS=test scripts/bootstrap.sh >/dev/null
	.venv/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Attention kernels: GPU benchmark (prefill TFLOP/s, decode bandwidth); CPU numbers
# with BENCH_ARGS=--cpu. See docs/bench-kernels.md.
bench-kernels:
	@scripts/bootstrap.sh >/dev/null
	.venv/bin/python -m esp_serve.kernels.bench $(BENCH_ARGS)
