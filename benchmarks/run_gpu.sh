#!/usr/bin/env bash
# The GPU runs behind benchmarks/results, as groups of under 10 minutes each on an H200:
#
#   benchmarks/run_gpu.sh latency      # GPU smoke test, GPT-2 part, round-trip / wire / control / checkpoint profiles
#   benchmarks/run_gpu.sh throughput   # Mistral part, throughput part, the 64-session step profile
#   benchmarks/run_gpu.sh kernels      # attention: prompts' tiles and programs, decode programs and chunks in
#                                      # flight; host time per step; one-token steps' kernels (GPT-2, Mistral)
#   benchmarks/run_gpu.sh sessions     # GPU smoke test; the throughput part's 64-session row (Mistral shape)
#   benchmarks/run_gpu.sh launches     # batch 1 with plain and dependent kernel launches (A/B and bits); the
#                                      # GPU smoke test and GPT-2's one-token step profile (the default: dependent)
#   BASELINE=<tree> benchmarks/run_gpu.sh builds
#                                      # this build against the baseline build's source tree, side by side,
#                                      # 5 rounds (benchmarks/experiment_builds.py)
#   benchmarks/run_gpu.sh experiments  # GPU smoke test; the experiments part on the GPT-2 shape, then the 8B shape
#                                      # (TransformerLens among the peers: carry .wheels)
#   benchmarks/run_gpu.sh gpt2         # GPT-2 part; GPT-2's and the Mistral shape's one-token step profiles
#   benchmarks/run_gpu.sh families     # every family's shape against transformers, pauses, batch 1 (with its
#                                      # kernels) and 64 sessions
#   benchmarks/run_gpu.sh parallel     # a 1-rank NCCL all-reduce inside a CUDA graph; the engine over a 1-rank
#                                      # NCCL group, graphs on, against the plain engine; the GPU smoke test
#
# Results and one log per run go into $OUT (default: the current folder); each run has a time limit, so one
# that hangs cannot take the group's others with it. The WebSocket halves need the server's packages.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.}
export OUT PYTHONUNBUFFERED=1

run() {  # run <limit in s> <log name> <command...>: the command's output goes to $OUT/<log name>
    local limit=$1 log=$2
    shift 2
    echo "== $* (limit ${limit} s)"
    timeout "$limit" "$@" >"$OUT/$log" 2>&1
    echo "   exit $? after ${SECONDS} s in all"
}

case "${1:-}" in
families)
    run 480 bench_families.log python3 benchmarks/bench_families.py \
        --families gemma2-9b,qwen3-8b,pythia-6.9b,mixtral-8x7b-4l,gemma3-4b,phi3-mini,olmo2-7b
    ;;
parallel)
    run 100 nccl_graph_smoke.log python3 benchmarks/nccl_graph_smoke.py
    run 240 tp_graphs_smoke.log python3 benchmarks/tp_graphs_smoke.py
    run 150 gpu_smoke.log python3 benchmarks/gpu_smoke.py
    ;;
experiments)
    # TransformerLens from the carried wheels (.wheels/tl/README.txt), beside the image's packages
    python3 -m pip install -q --no-deps --no-index --target /tmp/tl .wheels/tl/*.whl && export PYTHONPATH=/tmp/tl
    run 150 gpu_smoke.log python3 benchmarks/gpu_smoke.py
    run 200 bench_experiments_gpt2.log python3 benchmarks/bench.py --part experiments --shapes gpt2
    run 420 bench_experiments_8b.log python3 benchmarks/bench.py --part experiments --shapes llama3-8b
    ;;
latency)
    run 130 gpu_smoke.log python3 benchmarks/gpu_smoke.py
    run 50 profile_round_trip.txt python3 benchmarks/profile_round_trip.py
    run 180 bench_gpt2.log python3 benchmarks/bench.py --part gpt2
    run 80 profile_wire.txt python3 benchmarks/profile_wire.py
    run 80 profile_control.txt python3 benchmarks/profile_control.py
    run 50 profile_checkpoint.txt python3 benchmarks/profile_checkpoint.py
    ;;
throughput)
    run 150 bench_mistral.log python3 benchmarks/bench.py --part mistral
    run 360 bench_throughput.log python3 benchmarks/bench.py --part throughput
    run 80 profile_mistral_64.txt python3 benchmarks/profile_step.py --sessions 64
    ;;
kernels)
    run 150 tune_attention_prompts.txt python3 benchmarks/tune_attention.py --prompts
    run 150 tune_attention_programs.txt python3 benchmarks/tune_attention.py --programs
    run 50 profile_host.txt python3 benchmarks/profile_host.py
    run 100 profile_gpt2_1.txt python3 benchmarks/profile_step.py --shape gpt2 --sessions 1
    run 150 profile_mistral_1.txt python3 benchmarks/profile_step.py --shape mistral --sessions 1
    ;;
sessions)
    run 130 gpu_smoke.log python3 benchmarks/gpu_smoke.py
    run 150 bench_throughput_64.log python3 benchmarks/bench.py --part throughput --sessions 64 --trials 3
    ;;
launches)
    run 300 experiment_dependent_launch.txt python3 benchmarks/experiment_dependent_launch.py
    run 130 gpu_smoke.log python3 benchmarks/gpu_smoke.py
    run 100 profile_gpt2_1.txt python3 benchmarks/profile_step.py --shape gpt2 --sessions 1
    ;;
builds)
    run 570 experiment_builds.txt python3 benchmarks/experiment_builds.py --rounds 5 \
        --baseline "${BASELINE:?set BASELINE to the baseline build tree}"
    ;;
gpt2)
    run 180 bench_gpt2.log python3 benchmarks/bench.py --part gpt2
    run 100 profile_gpt2_1.txt python3 benchmarks/profile_step.py --shape gpt2 --sessions 1
    run 150 profile_mistral_1.txt python3 benchmarks/profile_step.py --shape mistral --sessions 1
    ;;
*)
    echo "usage: $0 latency|throughput|kernels|sessions|launches|builds|gpt2" >&2
    exit 2
    ;;
esac
