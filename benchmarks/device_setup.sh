#!/usr/bin/env bash
# Prepare the GPU machine (no network) for sea_jax runs. Source it at the start of a `run` command:
#   source benchmarks/device_setup.sh            # with carry [".whl"]
# It installs the carried wheels (.whl/: draccus, grain, gguf, the wiki corpus, ... for Python 3.12;
# fill it with benchmarks/device_wheels.sh) and sea_jax itself (editable, no dependencies: jax,
# flax, optax, orbax are already on the machine).
#
# The teacher GGUF (94 MiB) is larger than what one call may carry (64 MiB), so it travels in two
# calls made back to back while the machine stays warm (30 s):
#   call 1: carry [".gguf_parts/part00"]                    command: source benchmarks/device_setup.sh stage
#   call 2: carry [".whl", ".gguf_parts/part01", ".gguf_parts/part02", ".gguf_parts/SHA256"]
#           command: source benchmarks/device_setup.sh && ...   (assembles $SEA_TEACHER_GGUF)
# (.gguf_parts/ is made by: split -b 48000000 -d <gguf> .gguf_parts/part; sha256sum > SHA256.)
export PYTHONUNBUFFERED=1
ASSETS=/root/sea_assets
mkdir -p "$ASSETS"
if [ "${1:-}" = "stage" ]; then
  cp .gguf_parts/part00 "$ASSETS/part00" && echo "device_setup: staged part00 in $ASSETS"
  return 0 2>/dev/null || exit 0
fi
if [ -d .whl ] && ! python3 -c "import draccus, grain, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v "^WARNING" || true
fi
if ! python3 -c "import sea_jax.train.config" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING" || true
fi
if [ -f .gguf_parts/part01 ] && [ -f "$ASSETS/part00" ]; then
  cat "$ASSETS/part00" .gguf_parts/part0[1-9] > "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"
  got=$(sha256sum "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -c1-64)
  if [ "$got" = "$(cat .gguf_parts/SHA256)" ]; then echo "device_setup: teacher GGUF assembled"; else
    echo "device_setup: teacher GGUF checksum mismatch" >&2; rm -f "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"; fi
fi
if [ -f "$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  export SEA_TEACHER_GGUF="$ASSETS/SmolLM2-135M-Instruct.Q4_1.gguf"
  export SEA_SMOLLM2_GGUF="$SEA_TEACHER_GGUF"   # so "smollm2" (init_from, tokenizer) resolves here
fi
python3 -c "import jax, sea_jax; print('device_setup: jax', jax.__version__, jax.devices())"
