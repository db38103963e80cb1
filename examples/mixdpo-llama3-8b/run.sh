#!/usr/bin/env bash
# MixDPO with its published settings, full UltraFeedback, Llama-3-8B SFT (and Mistral-7B SFT with MIXDPO_MISTRAL=1):
# the stage commands in order, on one node of 8×H100 (README.md: needs and time, by calculation). Outputs: ./work.
# No teacher: MixDPO's difficulty is the dataset's own rating margin.
# Needs: pip install 'perpair' vllm (no deepspeed: perpair train refuses it for now); OPENAI_API_KEY for the AlpacaEval / Arena-Hard judge.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p work
STUDENT=princeton-nlp/Llama-3-Base-8B-SFT   # must equal train.yaml's model

# 1. prepare: canonical pairs (train_prefs, with score_chosen / score_rejected) and a held-out split
perpair prepare HuggingFaceH4/ultrafeedback_binarized --split train_prefs -o work/pairs.parquet
perpair prepare HuggingFaceH4/ultrafeedback_binarized --split test_prefs -o work/test.parquet

# 2. plan: β = 0.01, ties to SFT, cDPO ε = 0.1, easy-to-hard order (preset mixdpo = plan.yaml); report beside it
perpair plan work/pairs.parquet --preset mixdpo --config plan.yaml -o work/plan.parquet

# 3. train: full fine-tuning on 8 GPUs, exactly one epoch in plan order (steps recomputed from the data).
# ZeRO-3 instead of FSDP: --config_file ../accelerate/zero3.yaml, once the loop supports it (../README.md).
STEPS=$(python ../one_epoch_steps.py train.yaml)
if [ ! -f work/train-llama3-8b/summary.json ]; then  # a re-run resumes a stopped training, or skips a finished one
    accelerate launch --config_file ../accelerate/fsdp-llama.yaml -m perpair train train.yaml --steps "$STEPS" --resume
fi
if [ "${MIXDPO_MISTRAL:-0}" = 1 ]; then
    STEPS=$(python ../one_epoch_steps.py train-mistral.yaml)
    if [ ! -f work/train-mistral-7b/summary.json ]; then  # a re-run resumes a stopped training, or skips a finished one
        accelerate launch --config_file ../accelerate/fsdp-mistral.yaml -m perpair train train-mistral.yaml --steps "$STEPS" --resume
    fi
fi

# 4. evaluate: AlpacaEval 2.0 LC win rate (the paper reports 14.42 for MixDPO vs 9.37 for DPO on Llama-3-8B),
# Arena-Hard v0.1, held-out preference accuracy; one table with the SFT starting point (and the Mistral pair).
MISTRAL=HuggingFaceH4/mistral-7b-sft-beta   # must equal train-mistral.yaml's model
RUNS="sft=$STUDENT mixdpo=work/train-llama3-8b/model"
if [ "${MIXDPO_MISTRAL:-0}" = 1 ]; then
    RUNS="$RUNS mistral-sft=$MISTRAL mixdpo-mistral=work/train-mistral-7b/model"
fi
for run in $RUNS; do
    name=${run%%=*}
    model=${run#*=}
    perpair eval alpaca-eval --model "$model" --name "$name" --backend vllm --judge https://api.openai.com/v1 \
        --judge-name gpt-4-1106-preview --judge-api-key-env OPENAI_API_KEY -o "work/eval/alpaca-eval-$name"
    perpair eval arena-hard run --model "$model" --name "$name" --judge https://api.openai.com/v1 \
        --judge-name gpt-4-1106-preview --judge-api-key-env OPENAI_API_KEY -o "work/eval/arena-hard-$name"
done
perpair eval preference --model work/train-llama3-8b/model --ref "$STUDENT" --data work/test.parquet --beta 0.01 \
    --max-length 1024 --name mixdpo -o work/eval/preference
if [ "${MIXDPO_MISTRAL:-0}" = 1 ]; then
    perpair eval preference --model work/train-mistral-7b/model --ref "$MISTRAL" --data work/test.parquet \
        --beta 0.01 --max-length 1024 --name mixdpo-mistral -o work/eval/preference-mistral
fi
perpair eval report work/eval/alpaca-eval-* work/eval/arena-hard-* work/eval/preference* -o work/eval/report
