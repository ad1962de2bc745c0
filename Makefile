# vqgpt: the README's commands. Every target installs what it needs first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
# The CPU wheel of torch that lies on the build machines; users get a normal range from pyproject.toml.
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup data browser test demo bench clean

setup: $(VENV)/.installed data browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

data:
	@if [ ! -f "$(FMNIST_DIR)/train-images-idx3-ubyte.gz" ] && [ -z "$$VQGPT_FASHION_MNIST_DIR" ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@# The RGB set of bench/emoji.py (and its test): a colour font and Unicode's emoji groups.
	@if [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || [ ! -f /usr/share/unicode/emoji/emoji-test.txt ]; then \
		echo "installing Debian packages fonts-noto-color-emoji unicode-data"; \
		apt-get update -qq && apt-get install -y -qq fonts-noto-color-emoji unicode-data; \
	fi

# The page's browser test drives Debian's Chromium through its ChromeDriver (no browser download).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		echo "installing Debian packages chromium chromium-driver"; \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	fi

test: setup
	$(PY) -m pytest -q -n auto --dist loadfile tests

demo: setup
	$(PY) demo.py $(DEMO_ARGS)

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf runs samples
