# The two entry points of the README: `make up` runs the stack, `make test` passes the tests.
# Both install what they need first (scripts/bootstrap.sh): Debian packages, .venv, the package.
.PHONY: up test lint bench

up:
	scripts/bootstrap.sh
	.venv/bin/mpserve up $(ARGS)

test:
	scripts/bootstrap.sh --test
	.venv/bin/ruff check .
	.venv/bin/pytest -q -n 2 --dist loadfile --durations 10

lint:
	.venv/bin/ruff check .

bench:
	.venv/bin/python -m bench.inference --json results/inference.json
	.venv/bin/python -m bench.startup --json results/startup.json
	.venv/bin/python -m bench.reconcile --json results/reconcile.json
	.venv/bin/python -m bench.versions --json results/versions.json
	.venv/bin/python -m bench.materialize --json results/materialize.json
	.venv/bin/python -m bench.fuzz --json results/fuzz.json
	.venv/bin/python -m bench.load --quick --json results/load.json
	.venv/bin/python -m bench.soak --quick --json results/soak.json --plot results/soak.png
	.venv/bin/python -m bench.continual --protocol A --quick --json results/continual_A.json --plot results/continual_A.png
	.venv/bin/python -m bench.continual --protocol B --quick --json results/continual_B.json --plot results/continual_B.png
