#!/usr/bin/env bash
# SP²DPO + MixDPO (per-pair β, ties to SFT, easy-to-hard) on Qwen3-4B, full UltraFeedback, one node of 8×H100.
# Reuses the pairs and teacher annotations of ../sp2dpo-llama3-8b: run its steps 1 and 2 first (annotations do not
# depend on the student). README.md: needs and time, by calculation. Outputs: ./work.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p work
STUDENT=Qwen/Qwen3-4B-Instruct-2507   # must equal train.yaml's model
SHARED=../sp2dpo-llama3-8b/work
test -f "$SHARED/annotations.parquet" || { echo "run ../sp2dpo-llama3-8b/run.sh steps 1-2 first" >&2; exit 1; }

# 1. plan: preset sp2dpo+mixdpo (plan.yaml writes its values out)
perpair plan "$SHARED/pairs.parquet" --preset sp2dpo+mixdpo --annotations "$SHARED/annotations.parquet" \
    --config plan.yaml -o work/plan.parquet

# 2. train: full fine-tuning on 8 GPUs, one epoch in plan order
STEPS=$(python ../one_epoch_steps.py train.yaml)
if [ ! -f work/train/summary.json ]; then  # a re-run resumes a stopped training, or skips a finished one
    accelerate launch --config_file ../accelerate/fsdp-qwen3.yaml -m perpair train train.yaml --steps "$STEPS" --resume
fi

# 3. evaluate
for name in base sp2dpo-mixdpo; do
    model=$([ "$name" = base ] && echo "$STUDENT" || echo work/train/model)
    perpair eval alpaca-eval --model "$model" --name "$name" --backend vllm --judge https://api.openai.com/v1 \
        --judge-name gpt-4-1106-preview --judge-api-key-env OPENAI_API_KEY -o "work/eval/alpaca-eval-$name"
done
perpair eval preference --model work/train/model --ref "$STUDENT" --data "$SHARED/test.parquet" --beta 0.01 \
    --max-length 1024 --name sp2dpo-mixdpo -o work/eval/preference
perpair eval report work/eval/alpaca-eval-* work/eval/preference -o work/eval/report
