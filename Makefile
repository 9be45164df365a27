# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv and installs what it needs. Override TORCH to choose a torch build,
# e.g. `make test TORCH=torch` (the default is the CPU build on this project's machines).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO := out/demo

.PHONY: install install-torchrec demo sequences test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"

demo: install
	rm -rf $(DEMO)
	$(BIN)/mtrec preprocess sample_data/interactions.parquet --labels click,like,share \
		--user user_id --item item_id --time ts --out $(DEMO)/data
	$(BIN)/mtrec train $(DEMO)/data --model mmoe --target share --balancer metabalance \
		--epochs 4 --batch-size 1024 --out $(DEMO)/run
	$(BIN)/mtrec evaluate $(DEMO)/run --split test

# README "Behaviour sequences, conditional tasks and ESMM": a history log, DIN attention, ESMM, predict.
SEQ := out/seq
sequences: install
	rm -rf $(SEQ)
	$(BIN)/mtrec synth --rows 200000 --history 20 --out $(SEQ)/log.parquet
	$(BIN)/mtrec preprocess $(SEQ)/log.parquet --labels click,like,share --user user_id --item item_id --time ts \
		--spec sample_data/sequence_spec.toml --out $(SEQ)/data
	$(BIN)/mtrec train $(SEQ)/data --model esmm --target share --tasks share,click --condition share:click \
		--epochs 2 --out $(SEQ)/esmm
	$(BIN)/mtrec evaluate $(SEQ)/esmm
	$(BIN)/mtrec predict $(SEQ)/esmm --raw $(SEQ)/log.parquet --out $(SEQ)/preds.parquet

# The habits first (seconds): ruff's rules and the layer contract (pyproject.toml), then the suite.
# --embedding-sharding torchrec's tests: FBGEMM's CPU build pairs with one torch (1.N with 2.(N+5),
# docs/design.md "Sharded tables"), so the extra goes in with the default torch 2.13 only; elsewhere,
# or if the install fails, those tests skip.
install-torchrec: install
	@$(BIN)/python -c "import sys, torch; sys.exit(not torch.__version__.startswith('2.13.'))" \
		&& $(BIN)/pip install -q -e ".[torchrec]" && $(BIN)/pip install -q --no-deps torchrec==1.9.2 \
		|| echo "torchrec not installed (it needs torch 2.13 here): tests/engine/test_torchrec.py skips"

test: install install-torchrec
	$(BIN)/ruff check mtrec tests bench
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/bench_train.py

clean:
	rm -rf out .pytest_cache
