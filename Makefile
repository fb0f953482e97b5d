# The commands of the README:
#   make run    install, train the default model on the bundled Shakespeare, then generate from it
#   make test   install with the test extras, then run the test suite
#   make notebooks  install with Jupyter (the notebooks extra), then open the walkthrough notebooks
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/shakespeare

.PHONY: run test install install-test notebooks bench bench-llamacpp clean

install:
	VENV=$(VENV) bash scripts/install.sh

install-test:
	VENV=$(VENV) bash scripts/install.sh test

run: install
	$(BIN)/buildllm train --out $(RUN) --resume-if-exists
	$(BIN)/buildllm generate --model $(RUN) --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --top-k 50 --seed 0

test: install-test
	$(BIN)/python -m pytest -q -n auto --dist loadfile

notebooks:
	VENV=$(VENV) bash scripts/install.sh notebooks
	$(BIN)/jupyter lab notebooks/

bench: install-test
	$(BIN)/python benchmarks/run.py

bench-llamacpp: install-test
	$(BIN)/python benchmarks/llamacpp.py

clean:
	rm -rf $(VENV) runs .pytest_cache
