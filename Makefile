# fedsqueeze developer commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROTO_DIR := proto
PROTO_SRC := $(PROTO_DIR)/fedsqueeze/v1/fedsqueeze.proto
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo demo-ae test test-fast lint typecheck proto check-proto bench bench-quick bench-fl bench-converged bench-converged-a0.1 bench-seed003 bench-ae-target bench-slowlink-screen bench-slowlink-1m bench-slowlink-heldout bench-checkpoint bench-resfed bench-grpc-check bench-slowlink bench-scale flower-venv flower-test bench-flower-app clean prometheus compose-test

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9._-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: a bare `torch` would pull the multi-GB CUDA build.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv with the CPU build of torch and fedsqueeze (editable, with dev tools)

demo: $(STAMP) ## Run a real local federation: aggregator + 4 collaborator processes, 20 rounds on digits
	$(BIN)/fedsqueeze demo --collaborators 4 --rounds 20

demo-ae: $(STAMP) ## The autoencoder federation: prepass, decoder uploads, 4 collaborator processes, baseline beside it
	$(BIN)/fedsqueeze demo-ae --collaborators 4

test: $(STAMP) ## Run the test suite (what CI runs)
	$(BIN)/python -m pytest -q

prometheus: ## Install Debian's prometheus package (the real server the metrics test scrapes with)
	@if command -v prometheus >/dev/null; then prometheus --version 2>&1 | head -1; else \
	  sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
	  $$sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends prometheus; fi

compose-test: $(STAMP) ## Bring deploy/docker-compose.yml up on a Docker engine it starts (root; installs docker.io, docker-compose, debootstrap)
	$(BIN)/python -m pytest -q -s -m compose tests/test_compose.py

test-fast: $(STAMP) ## Run the tests that start no servers
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP) typecheck ## ruff (lint and format) and the type checks
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) ## mypy on the packages, strict on the codec library
	$(BIN)/mypy fedsqueeze codecs aggregator collaborator simulation
	$(BIN)/mypy --strict codecs

# The generator lives in a venv of its own: grpcio-tools 1.80.1 (protobuf 6 gencode, which protobuf 6
# and 7 both load) cannot share .venv's protobuf 7, see proto/requirements.txt.
PROTO_VENV := .venv-proto
PROTO_STAMP := $(PROTO_VENV)/.installed

$(PROTO_STAMP): proto/requirements.txt
	$(PYTHON) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/pip install --quiet -r proto/requirements.txt
	touch $(PROTO_STAMP)

proto: $(PROTO_STAMP) ## Regenerate the Python code from proto/fedsqueeze/v1/*.proto
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I $(PROTO_DIR) --python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) $(PROTO_SRC)

check-proto: $(PROTO_STAMP) ## Fail if the committed generated code differs from a fresh generation
	@tmp=$$(mktemp -d); \
	$(PROTO_VENV)/bin/python -m grpc_tools.protoc -I $(PROTO_DIR) --python_out=$$tmp --pyi_out=$$tmp --grpc_python_out=$$tmp $(PROTO_SRC) && \
	diff -ru $$tmp/fedsqueeze/v1 $(PROTO_DIR)/fedsqueeze/v1 -x '*.proto' -x '__init__.py' -x '__pycache__' && echo "generated code is up to date"; \
	rc=$$?; rm -rf $$tmp; exit $$rc

FLOWER_VENV := bench/flower/.venv
FLOWER_STAMP := $(FLOWER_VENV)/.installed

$(FLOWER_STAMP): bench/flower/requirements.txt
	# The benchmark peer's own plain venv (flwr 1.41, no fedsqueeze: it loads fedsqueeze/training.py by path).
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/pip install --quiet -r bench/flower/requirements.txt
	touch $(FLOWER_STAMP)

flower-venv: $(FLOWER_STAMP) ## Build bench/flower/.venv (flwr 1.41, torch 2.13 CPU) for the Flower peer

# fedsqueeze[flower] and Flower 1.42 in one environment (Flower needs protobuf<7, so pip picks protobuf 6
# here, 7 in .venv): the co-installation users get. The Flower tests and the Flower app benchmark run in it,
# and so do the gRPC server tests, for fedsqueeze's generated code under protobuf 6.
FLOWER_TEST_VENV := .venv-flower
FLOWER_TEST_STAMP := $(FLOWER_TEST_VENV)/.installed

$(FLOWER_TEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(FLOWER_TEST_VENV)
	$(FLOWER_TEST_VENV)/bin/pip install --quiet --upgrade pip
	$(FLOWER_TEST_VENV)/bin/pip install --quiet "torch==2.13.0"
	$(FLOWER_TEST_VENV)/bin/pip install --quiet -e ".[flower]" "flwr==1.42.*" "pytest>=8" "pytest-timeout>=2.3"
	$(FLOWER_TEST_VENV)/bin/pip check
	touch $(FLOWER_TEST_STAMP)

flower-test: $(FLOWER_TEST_STAMP) ## Install fedsqueeze[flower] beside flwr 1.42 in .venv-flower; run the Flower tests and the gRPC server tests there
	$(FLOWER_TEST_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_flower.py tests/test_flower_deployment.py tests/test_server.py

bench-flower-app: $(FLOWER_TEST_STAMP) ## Flower's FedAvg with and without fedsqueeze's chains, on Flower's deployment runtime
	$(FLOWER_TEST_VENV)/bin/python -m bench.flower_app --out docs/benchmarks.md

bench: $(STAMP) $(FLOWER_STAMP) ## Run all benchmarks (~2.5 h on 2 cores, most of it fl_bench's 225 federations; slowlink needs root) and write docs/benchmarks.md + PNGs
	$(BIN)/python -m bench.codecs_bench --out docs/benchmarks.md
	$(BIN)/python -m bench.grpc_check --out docs/benchmarks.md
	$(BIN)/python -m bench.fl_bench --jobs 2 --out docs/benchmarks.md
	$(BIN)/python -m bench.slowlink --out docs/benchmarks.md
	$(BIN)/python -m bench.scale --out docs/benchmarks.md
	$(BIN)/python -m bench.checkpoint --out docs/benchmarks.md

bench-quick: $(STAMP) ## Minutes-long smoke run of every benchmark, written to runs/bench-quick.md (docs/ untouched)
	$(BIN)/python -m bench.codecs_bench --quick --out runs/bench-quick.md
	$(BIN)/python -m bench.grpc_check --rounds 2 --cases 1 --out runs/bench-quick.md
	$(BIN)/python -m bench.fl_bench --quick --chains "fp16,ResFed,C2,H3" --out runs/bench-quick.md --plots runs
	$(BIN)/python -m bench.slowlink --collaborators 2 --rounds 3 --chains 2 --out runs/bench-quick.md
	$(BIN)/python -m bench.scale --sizes 10,100 --models 66k --uplinks identity --rounds 2 --out runs/bench-quick.md
	$(BIN)/python -m bench.checkpoint --members 10 --rounds 2 --out runs/bench-quick.md

bench-fl: $(STAMP) $(FLOWER_STAMP) ## Communication to target accuracy (perplexity for the LM) vs FedAvg and Flower, every setting (plots in docs/)
	$(BIN)/python -m bench.fl_bench --jobs 2 --out docs/benchmarks.md

bench-lm: $(STAMP) $(FLOWER_STAMP) ## The transformer language model (1.2M parameters, stdlib text): bytes to FedAvg's perplexity (~1 h)
	$(BIN)/python -m bench.fl_bench --settings stdlib-lm --jobs 2 --reuse --out docs/benchmarks.md

bench-converged: $(STAMP) $(FLOWER_STAMP) ## Bytes to a converged target (300 rounds) vs Flower's best strategy
	$(BIN)/python -m bench.converged --settings mnist1d-a0.5,digits-a0.5,mnist1d-cnn-a0.5 --seeds 0,1,2 --setting-seeds mnist1d-cnn-a0.5=0 --jobs 2 --reuse --out docs/benchmarks.md

bench-converged-a0.1: $(STAMP) $(FLOWER_STAMP) ## The converged target on MNIST-1D alpha 0.1, MLP and CNN (seed 0; ~1 h)
	$(BIN)/python -m bench.converged --settings mnist1d-a0.1 --seeds 0 --jobs 2 --reuse --out docs/benchmarks.md
	$(BIN)/python -m bench.converged --settings mnist1d-cnn-a0.1 --seeds 0 --jobs 2 --reuse --out docs/benchmarks.md

bench-seed003: $(STAMP) ## Seed 003 on a stand-in: pruning 10-99 %, post-hoc quantization and QAT at 1/4/8 bits, float downlink too
	$(BIN)/python -m bench.seed003 --rounds 60 --seeds 0 --jobs 2 --reuse --out docs/benchmarks.md

bench-ae-target: $(STAMP) ## The shared-decoder AE (1 % correction) to fl_bench's target in each MNIST-1D setting, beside its ablation
	$(BIN)/python -m bench.ae_target --jobs 2 --reuse --out docs/benchmarks.md

bench-slowlink-screen: $(STAMP) ## Slow-link chains screened in-process on the 1.1M-parameter MLP, seeds 0-2: rounds to target, a time bound
	$(BIN)/python -m bench.slowlink_screen --hidden 1024,1024 --seeds 0,1,2 --out docs/benchmarks.md

bench-resfed: $(STAMP) ## Seed 004 (ResFed) on a stand-in: traffic per client to 70 %
	$(BIN)/python -m bench.resfed --jobs 2 --out docs/benchmarks.md

bench-grpc-check: $(STAMP) ## In-process byte counts == real gRPC byte counts
	$(BIN)/python -m bench.grpc_check --out docs/benchmarks.md

bench-slowlink: $(STAMP) ## Time to accuracy over 1 Mbit/s links (root: ip netns + tc tbf)
	$(BIN)/python -m bench.slowlink --out docs/benchmarks.md

bench-slowlink-1m: $(STAMP) ## The same on the 1.1M-parameter MLP with the slow-link recipe, seeds 0-2 (root; ~50 min, FedAvg's runs most of it)
	$(BIN)/python -m bench.slowlink --hidden 1024,1024 --only 3,5,9,10,11 --horizon 40 --reuse --out docs/benchmarks.md
	$(BIN)/python -m bench.slowlink --hidden 1024,1024 --only 10 --horizon 30 --seed 1 --reuse --out docs/benchmarks.md
	$(BIN)/python -m bench.slowlink --hidden 1024,1024 --only 10 --horizon 30 --seed 2 --reuse --out docs/benchmarks.md

bench-slowlink-heldout: $(STAMP) ## The slow-link recipe on seeds 3-5, held out from choosing it: the screen of its single changes, then real processes (root; ~50 min)
	$(BIN)/python -m bench.slowlink_screen --seeds 3,4,5 --match "slow-link recipe" --out docs/benchmarks.md
	for seed in 3 4 5; do $(BIN)/python -m bench.slowlink --hidden 1024,1024 --only 10 --horizon 30 --seed $$seed --reuse --out docs/benchmarks.md || exit 1; done

bench-scale: $(STAMP) ## 10 / 100 / 1,000 collaborators per round over gRPC: ingest, memory, round time
	$(BIN)/python -m bench.scale --out docs/benchmarks.md

bench-checkpoint: $(STAMP) ## Checkpoint size and time with 10 / 100 members on the slow-link plan's stateful downlink (seconds)
	$(BIN)/python -m bench.checkpoint --out docs/benchmarks.md

clean: ## Remove build outputs and run artefacts (keeps .venv)
	rm -rf build *.egg-info .pytest_cache .mypy_cache .ruff_cache runs
