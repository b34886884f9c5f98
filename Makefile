# One venv for everything; torch/torchvision pinned through constraints.txt (local wheels, see FACTS.md).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
OUT    ?= slidestream-demo

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/slidestream demo --out $(OUT)

lint: setup
	$(VENV)/bin/ruff check .

test: setup
	$(VENV)/bin/ruff check .
	bash slidestream/testing/rgw.sh install
	$(PY) -X faulthandler -m pytest -q --timeout=900 --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OUT)
