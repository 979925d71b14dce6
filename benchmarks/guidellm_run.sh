#!/usr/bin/env bash
# GuideLLM (a load generator nobody here wrote) against `flashvl serve` on 127.0.0.1, fixed synthetic workload.
#
#   benchmarks/guidellm_run.sh BUNDLE [OUT_DIR]
#
# Starts `flashvl serve BUNDLE --host 127.0.0.1 --port 0` (or, with PORT=N, uses a server already listening on
# 127.0.0.1:N), runs one GuideLLM benchmark per concurrency level in STREAMS, then stops the server it started.
# Only 127.0.0.1 is ever targeted. Offline: the tokenizer GuideLLM counts and builds prompts with is the bundle's
# own tokenizer.json / tokenizer_config.json (transformers' AutoTokenizer on the bundle directory), and
# HF_HUB_OFFLINE=1 stops any hub lookup; synthetic prompts come from Faker (no dataset download).
#
# Workload (environment variables, defaults in brackets): STREAMS concurrency levels [1,2,4,8]; REQUESTS per level
# [16]; MAX_SECONDS per level [600]; PROMPT_TOKENS [256] and OUTPUT_TOKENS [64] per request (fixed: GuideLLM sends
# max_tokens and ignore_eos, so every answer has OUTPUT_TOKENS tokens); SEED [0]; SERVE_ARGS extra `flashvl serve`
# arguments (e.g. "--image-cache-bytes 0 --kv-cache-bytes 0" for caches off).
#
# GuideLLM lives in its own virtual environment (GUIDELLM, default /work/guidellm-venv/bin/guidellm), made with
#   python3 -m venv /work/guidellm-venv
#   /work/guidellm-venv/bin/pip install torch==2.13.0      # first: the pinned CPU build, no CUDA wheels
#   /work/guidellm-venv/bin/pip install guidellm==0.8.1
# Results: OUT_DIR/benchmarks.json (every request) and OUT_DIR/benchmarks.csv, and the console table.
set -euo pipefail

BUNDLE=${1:?usage: benchmarks/guidellm_run.sh BUNDLE [OUT_DIR]}
OUT=${2:-build/guidellm}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$HERE/.venv/bin/python}
GUIDELLM=${GUIDELLM:-/work/guidellm-venv/bin/guidellm}
STREAMS=${STREAMS:-1,2,4,8}
REQUESTS=${REQUESTS:-16}
MAX_SECONDS=${MAX_SECONDS:-600}
PROMPT_TOKENS=${PROMPT_TOKENS:-256}
OUTPUT_TOKENS=${OUTPUT_TOKENS:-64}
SEED=${SEED:-0}
MODEL=$(basename "$(cd "$BUNDLE" && pwd)")   # flashvl serve's default served model name: the bundle directory's name
mkdir -p "$OUT"

SERVER_PID=""
cleanup() { if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi; }
trap cleanup EXIT

if [ -z "${PORT:-}" ]; then
  LOG="$OUT/serve.log"
  # shellcheck disable=SC2086
  "$PY" -m flashvl_edge.main serve "$BUNDLE" --host 127.0.0.1 --port 0 --max-batch 8 ${SERVE_ARGS:-} >"$LOG" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do  # a full-size bundle takes a while to load
    PORT=$(sed -n 's|.*ready on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$LOG" | head -n1)
    [ -n "$PORT" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$LOG" >&2; echo "flashvl serve exited before it was ready" >&2; exit 1; }
    sleep 1
  done
  [ -n "$PORT" ] || { echo "flashvl serve was not ready within 600 s" >&2; exit 1; }
fi
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) CPUs; server http://127.0.0.1:$PORT model $MODEL" >&2

HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$GUIDELLM" run \
  --backend "kind=openai_http,target=http://127.0.0.1:$PORT,model=$MODEL,request_format=/v1/chat/completions,http2=false" \
  --tokenizer "kind=huggingface_auto,model=$(cd "$BUNDLE" && pwd)" \
  --data "kind=synthetic_text,prompt_tokens=$PROMPT_TOKENS,output_tokens=$OUTPUT_TOKENS" \
  --profile "kind=concurrent,streams=${STREAMS%%,*}" --override profile.streams "$STREAMS" \
  --constraint "kind=max_requests,count=$REQUESTS" \
  --constraint "kind=max_duration,seconds=$MAX_SECONDS" \
  --seed "kind=static,value=$SEED" \
  --output "kind=json,path=$OUT/benchmarks.json" \
  --output "kind=csv,path=$OUT/benchmarks.csv" \
  --output kind=console \
  --disable-console-interactive
