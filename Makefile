# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing or older
# than pyproject.toml / constraints.txt, then install the pinned versions.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: test demo install browser constraints clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	@touch $(STAMP)

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Headless Chromium for the tests that play overlay videos in a real browser: Debian's package, installed when
# it is missing and apt-get can run as root (CI); anywhere else those tests skip, saying why.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ] && command -v apt-get >/dev/null 2>&1; then \
	   if [ "$$(id -u)" = 0 ]; then \
	     echo "installing chromium (apt-get) for the browser playback tests"; \
	     DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	   else \
	     echo "no $(CHROMIUM) and not root: the browser playback tests will skip (apt-get install chromium)"; \
	   fi; \
	 fi

demo: $(STAMP)
	$(BIN)/rolo-batch demo $(DEMO_OUT)

# Re-pin every dependency from the current environment (after changing pyproject.toml on purpose).
constraints: $(STAMP)
	@{ echo "# Exact versions for every install (make, CI, cluster images). Regenerate with: make constraints"; \
	   echo "# torch resolves to the CPU wheel where one is on disk (2.13.0+cpu here) and to PyPI's build elsewhere."; \
	   $(BIN)/pip freeze --all --exclude-editable | grep -v -e '^rolo-batch' -e '^pip==' | sed -E 's/^(torch==[0-9.]+)\+cpu$$/\1/'; \
	 } > constraints.txt

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
