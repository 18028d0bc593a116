# The two entry points of the README: `make up` runs the stack, `make test` passes the tests.
# Both install what they need first (scripts/bootstrap.sh): Debian packages, .venv, the package.
.PHONY: up test lint bench

up:
	scripts/bootstrap.sh
	.venv/bin/mpserve up $(ARGS)

test:
	scripts/bootstrap.sh --test
	.venv/bin/ruff check .
	.venv/bin/pytest -q

lint:
	.venv/bin/ruff check .

bench:
	.venv/bin/python -m bench.inference --json results/inference.json
	.venv/bin/python -m bench.reconcile --json results/reconcile.json
	.venv/bin/python -m bench.versions --json results/versions.json
	.venv/bin/python -m bench.fuzz --json results/fuzz.json
