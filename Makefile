# One venv for everything; torch/torchvision pinned through constraints.txt (pip finds them on the package index).
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
OUT    ?= slidestream-demo

.PHONY: setup demo test lint typecheck clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) -e '.[test,openslide]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/slidestream demo --out $(OUT)

lint: setup typecheck
	$(VENV)/bin/ruff check .

# mypy resolves `slidestream.cluster` etc. the way an installed wheel has them: the card's folders inside
# slidestream/. A view of links under build/ gives it that tree without copying the sources.
TYPECHECK := build/typecheck
typecheck: setup
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/slidestream
	ln -s $(CURDIR)/slidestream/* $(CURDIR)/cluster $(CURDIR)/pipelines $(CURDIR)/trainers $(TYPECHECK)/slidestream/
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p slidestream

test: setup typecheck
	$(VENV)/bin/ruff check .
	bash slidestream/testing/rgw.sh install
	bash slidestream/testing/chromium.sh install
	$(PY) -X faulthandler -m pytest -q --timeout=900 --durations=25 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OUT)
