# Two commands do everything on a fresh clone:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install bench clean

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

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/engine.py
	$(BIN)/python bench/rebuild.py
	$(BIN)/python bench/connections.py
	$(BIN)/python bench/long_conversation.py

clean:
	rm -rf $(VENV) .pytest_cache
