# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-gpu clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first (a local file on the CI machine); with it in place, the test
	# extra's torch range installs nothing more, so no CUDA wheels are pulled in.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# notebooks/ (executed by nbmake, outputs discarded) is listed first so that xdist starts the
# notebook (~1 min on 2 cores) at once, beside the tests, rather than last.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 --nbmake notebooks tests

demo: $(STAMP)
	$(VENV)/bin/flaxflux demo

clean:
	rm -rf $(VENV) build *.egg-info
