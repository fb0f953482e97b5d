# The two commands of the README:
#   make run    install, train the default model on the bundled Shakespeare, then generate from it
#   make test   install with the test extras, then run the test suite
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/shakespeare

.PHONY: run test install install-test bench bench-llamacpp clean

install:
	VENV=$(VENV) bash scripts/install.sh

install-test:
	VENV=$(VENV) bash scripts/install.sh test

run: install
	$(BIN)/buildllm train --out $(RUN) --resume-if-exists
	$(BIN)/buildllm generate --model $(RUN) --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0

test: install-test
	$(BIN)/python -m pytest -q

bench: install-test
	$(BIN)/python benchmarks/run.py

bench-llamacpp: install-test
	$(BIN)/python benchmarks/llamacpp.py

clean:
	rm -rf $(VENV) runs .pytest_cache
