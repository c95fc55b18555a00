#!/usr/bin/env bash
# One device call: the peer and vlmkit's real path, side by side, on one GPU (BENCHMARKS.md's tables).
#   VLMKIT_PEER_BENCH=../shared/bench bash benchmarks/h200_session.sh [OUTDIR] [set]
# Each run's whole output goes to OUTDIR/<name>.log, its JSON line to OUTDIR/results.jsonl.
set -u
out=${1:-bench-out}; set=${2:-main}
mkdir -p "$out"
peer=${VLMKIT_PEER_BENCH:-../shared/bench}/peer_hf_llava.py
export PYTHONUNBUFFERED=1
one() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  local line=$(grep '^{' "$out/$name.log" | tail -1)
  echo "{\"run\": \"$name\", \"rc\": $rc, \"wall_s\": $(( $(date +%s) - t0 )), \"result\": ${line:-null}}" | tee -a "$out/results.jsonl"
}
case $set in
main)
  one peer_1.5b_s2   150 python3 "$peer" --llm 1.5b --stage 2 --batch 16 --gc --steps 10
  one vlmkit_1.5b_s2 200 python3 benchmarks/train_throughput.py --llm 1.5b --stage 2 --batch 16 --gc --steps 10
  one peer_7b_s2     200 python3 "$peer" --llm 7b --stage 2 --batch 16 --gc --steps 10
  one vlmkit_7b_s2   240 python3 benchmarks/train_throughput.py --llm 7b --stage 2 --batch 16 --gc --steps 10
  one peer_7b_s1     150 python3 "$peer" --llm 7b --stage 1 --batch 32 --steps 10
  one vlmkit_7b_s1   200 python3 benchmarks/train_throughput.py --llm 7b --stage 1 --batch 32 --steps 10
  ;;
more)
  one peer_7b_s2     200 python3 "$peer" --llm 7b --stage 2 --batch 16 --gc --steps 10
  one vlmkit_7b_s2_compile 300 python3 benchmarks/train_throughput.py --llm 7b --stage 2 --batch 16 --gc --compile --steps 10
  one vlmkit_7b_s2_compile_skip8 300 python3 benchmarks/train_throughput.py --llm 7b --stage 2 --batch 16 --gc --gc-skip 8 --compile --steps 10
  one peer_7b_s1     150 python3 "$peer" --llm 7b --stage 1 --batch 32 --steps 10
  one vlmkit_7b_s1_compile 300 python3 benchmarks/train_throughput.py --llm 7b --stage 1 --batch 32 --compile --steps 10
  one vlmkit_7b_s2_lora 240 python3 benchmarks/train_throughput.py --llm 7b --stage 2 --batch 16 --gc --lora --steps 10
  ;;
recipe)  # the recipe itself (accelerate launch recipes/llava15.py --config), the shipped configs' speed settings
  one peer_7b_s2     200 python3 "$peer" --llm 7b --stage 2 --batch 16 --gc --steps 10
  one recipe_7b_s2   300 python3 benchmarks/train_throughput.py --via-recipe --llm 7b --stage 2 --batch 16 --gc --gc-skip 8 --compile --steps 10
  one peer_7b_s1     150 python3 "$peer" --llm 7b --stage 1 --batch 32 --steps 10
  one recipe_7b_s1   300 python3 benchmarks/train_throughput.py --via-recipe --llm 7b --stage 1 --batch 32 --compile --steps 10
  one peer_1.5b_s2   150 python3 "$peer" --llm 1.5b --stage 2 --batch 16 --gc --steps 10
  one recipe_1.5b_s2 300 python3 benchmarks/train_throughput.py --via-recipe --llm 1.5b --stage 2 --batch 16 --gc --compile --steps 10
  ;;
video)  # video samples next to image samples, both through the recipe, same shape and text (BENCHMARKS.md, Video)
  one recipe_7b_s2_image  280 python3 benchmarks/train_throughput.py --via-recipe --llm 7b --stage 2 --batch 16 --gc --gc-skip 8 --compile --steps 8
  one recipe_7b_s2_video8 280 python3 benchmarks/train_throughput.py --via-recipe --llm 7b --stage 2 --batch 16 --gc --gc-skip 8 --compile --steps 8 --video 8
  one video_decode         60 python3 benchmarks/video_decode.py
  ;;
engines)  # the recipe under each multi-GPU accelerate config on N GPUs (N=1: the engines' own overhead)
  for e in zero2 zero3 fsdp2; do
    one ${e}_${LLM:-1.5b}_s2_n${N:-1} 240 python3 benchmarks/train_throughput.py --accelerate-config recipes/accelerate/$e.yaml \
      --num-processes ${N:-1} --llm ${LLM:-1.5b} --stage 2 --batch 16 --gc --steps 8
  done
  ;;
esac
