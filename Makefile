# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
# Set-up reruns when any of these is newer than the last successful set-up.
SETUP_INPUTS := pyproject.toml requirements/constraints.txt scripts/setup.sh scripts/check_env.py
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	bash scripts/setup.sh
	touch $@

# make demo DATA=dir: your own images (+ NAME.txt captions) instead of the packaged photos
demo: setup
	$(VENV)/bin/hyperhuman demo --output demo_output $(if $(DATA),--data $(DATA))

test: setup
	$(PYTHON) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PYTHON) bench/shards_io.py
	$(PYTHON) bench/pose_accuracy.py
	$(PYTHON) bench/annotator_latency.py
	$(PYTHON) bench/lsdm_step.py
	$(PYTHON) bench/sgr_step.py

clean:
	rm -rf demo_output bench/results .pytest_cache
