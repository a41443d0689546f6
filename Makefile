# Two commands do everything on a fresh clone:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install bench chaos clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: it takes the CPU wheel instead of pulling CUDA packages
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/chatbot up

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# faults injected under load (workers, a NATS node, PostgreSQL, the projector, the relay, an API
# process), then the invariants checked: exits 1 on a broken one (tests/chaos/run.py, ~3 minutes)
chaos: $(STAMP)
	$(BIN)/python -m tests.chaos.run

# every bench/*.py in turn; the figures of each that succeeds go to docs/benchmarks.md
# (bench/report.py); `make bench BENCH=ingest,websocket_fanout` runs only those
bench: $(STAMP)
	$(BIN)/python bench/report.py $(if $(BENCH),--only $(BENCH))

clean:
	rm -rf $(VENV) .pytest_cache
