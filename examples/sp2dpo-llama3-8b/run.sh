#!/usr/bin/env bash
# SP²DPO, full UltraFeedback, Llama-3-8B SFT student: the stage commands in order, on one node of 8×H100
# (see README.md for what it needs and how long it takes, by calculation). Outputs go to ./work.
# Needs: pip install 'perpair' vllm (no deepspeed: perpair train refuses it for now); OPENAI_API_KEY for the AlpacaEval / Arena-Hard judge.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p work
STUDENT=princeton-nlp/Llama-3-Base-8B-SFT   # must equal train.yaml's model
TEACHER=meta-llama/Llama-3.3-70B-Instruct

# 1. prepare: canonical pairs (train_prefs) and a held-out split (test_prefs)
perpair prepare HuggingFaceH4/ultrafeedback_binarized --split train_prefs -o work/pairs.parquet
perpair prepare HuggingFaceH4/ultrafeedback_binarized --split test_prefs -o work/test.parquet

# 2. annotate: the teacher served by vLLM, two tensor-parallel replicas of 4 GPUs sharing the load
CUDA_VISIBLE_DEVICES=0,1,2,3 vllm serve "$TEACHER" --served-model-name llama-3.3-70b --tensor-parallel-size 4 \
    --port 8000 --max-model-len 8192 --gpu-memory-utilization 0.90 > work/vllm-8000.log 2>&1 &
VLLM_A=$!
CUDA_VISIBLE_DEVICES=4,5,6,7 vllm serve "$TEACHER" --served-model-name llama-3.3-70b --tensor-parallel-size 4 \
    --port 8001 --max-model-len 8192 --gpu-memory-utilization 0.90 > work/vllm-8001.log 2>&1 &
VLLM_B=$!
trap 'kill $VLLM_A $VLLM_B 2>/dev/null || true' EXIT
for port in 8000 8001; do
    until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do sleep 10; done
done
# Resumable: a killed run re-run with the same command repeats no request (SQLite cache beside the output).
# One replica without a YAML: --teacher api:http://127.0.0.1:8000/v1/llama-3.3-70b
perpair annotate work/pairs.parquet --config annotate.yaml -o work/annotations.parquet
kill $VLLM_A $VLLM_B
wait $VLLM_A $VLLM_B || true   # the GPUs must be free before training
trap - EXIT

# 3. plan: per-pair β (preset sp2dpo, geometric mean 0.01: plan.yaml); report in work/plan_report/
perpair plan work/pairs.parquet --preset sp2dpo --annotations work/annotations.parquet --config plan.yaml \
    -o work/plan.parquet

# 4. train: full fine-tuning on 8 GPUs, exactly one epoch (train.yaml's steps recomputed from the data).
# ZeRO-3 instead of FSDP: --config_file ../accelerate/zero3.yaml, once the loop supports it (../README.md).
STEPS=$(python ../one_epoch_steps.py train.yaml)
if [ ! -f work/train/summary.json ]; then  # a re-run resumes a stopped training, or skips a finished one
    accelerate launch --config_file ../accelerate/fsdp-llama.yaml -m perpair train train.yaml --steps "$STEPS" --resume
fi

# 5. evaluate: AlpacaEval 2.0 (LC win rate, the papers' metric) and Arena-Hard v0.1 with the official GPT-4 Turbo
# judge, and held-out preference accuracy; then one table for the SFT student and the trained model.
for name in sft sp2dpo; do
    model=$([ "$name" = sft ] && echo "$STUDENT" || echo work/train/model)
    perpair eval alpaca-eval --model "$model" --name "$name" --backend vllm --judge https://api.openai.com/v1 \
        --judge-name gpt-4-1106-preview --judge-api-key-env OPENAI_API_KEY -o "work/eval/alpaca-eval-$name"
    perpair eval arena-hard run --model "$model" --name "$name" --judge https://api.openai.com/v1 \
        --judge-name gpt-4-1106-preview --judge-api-key-env OPENAI_API_KEY -o "work/eval/arena-hard-$name"
done
perpair eval preference --model work/train/model --ref "$STUDENT" --data work/test.parquet --beta 0.01 \
    --max-length 1024 --name sp2dpo -o work/eval/preference
perpair eval report work/eval/alpaca-eval-* work/eval/arena-hard-* work/eval/preference -o work/eval/report
