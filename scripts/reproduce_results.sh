#!/usr/bin/env bash
# Every run behind docs/results.md, in order (CPU, default model and the organism). Each command resumes if
# stopped; the numbers in the page come from the summary.md / analysis.json files these commands write.
# About 3 hours on 2 cores, most of it the default model's evaluations and the organism build.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=${STEPSCOPE_DATA_DIR:-../shared/data}
ADD=(--rg min_terms=2 --rg max_terms=2 --rg max_digits=1 --rg allow_parentheses=false --rg allow_negation=false)
RUN=(--max-new-tokens 160 --batch-size 8 --no-progress)
FOUR=baseline,stepflow,oeb-only,smi-only

# default model: two calibrated tasks (four conditions) and GSM8K (baseline vs StepFlow)
stepscope eval --model default --dataset rg:basic_arithmetic "${ADD[@]}" --rg "operators=+,-" --rg-size 300 \
  --data-seed 0 --conditions $FOUR "${RUN[@]}" --out runs/results/addsub
stepscope eval --model default --dataset rg:basic_arithmetic "${ADD[@]}" --rg "operators=*" --rg-size 300 \
  --data-seed 0 --conditions $FOUR "${RUN[@]}" --out runs/results/mul
stepscope eval --model default --dataset gsm8k --data-dir "$DATA" --limit 300 --compare --max-new-tokens 256 \
  --batch-size 8 --no-progress --out runs/results/gsm8k

# default model: correct vs wrong within problems (8 samples per problem at temperature 0.7, one thread), with
# the per-component mechanism check; the greedy runs above are analysed too (no pairing possible there)
N8=(--n 8 --temperature 0.7 --conditions baseline --max-new-tokens 160 --batch-size 8 --workers 1 --no-progress)
stepscope eval --model default --dataset rg:basic_arithmetic "${ADD[@]}" --rg "operators=+,-" --rg-size 40 \
  --data-seed 0 "${N8[@]}" --out runs/results/addsub-n8                          # problems 0-39
stepscope eval --model default --dataset rg:basic_arithmetic "${ADD[@]}" --rg "operators=+,-" --rg-size 80 \
  --indices 40-79 --data-seed 0 "${N8[@]}" --out runs/results/addsub-n8-b        # problems 40-79
stepscope analyze --traces runs/results/addsub-n8,runs/results/addsub-n8-b --condition baseline --mechanism \
  --mechanism-limit 60 --threads 1 --out runs/analysis/addsub-n8
stepscope analyze --traces runs/results/addsub --condition baseline --threads 1 --out runs/analysis/addsub

# the organism: build (cached), evaluate, analyse
stepscope organism build
ORG=(--model organism --dataset organism:medium --rg-size 300 --max-new-tokens 400 --batch-size 32 --no-progress)
stepscope eval "${ORG[@]}" --data-seed 0 --conditions $FOUR --out runs/results/organism-medium
stepscope analyze --model organism --traces runs/results/organism-medium --condition baseline --threads 1 \
  --out runs/analysis/organism-medium
# the organism within problems: 8 samples per problem at temperature 0.7, all components and controls
stepscope eval "${ORG[@]}" --data-seed 0 --n 8 --temperature 0.7 --conditions baseline --rg-size ${ORG_N8:-150} \
  --out runs/results/organism-medium-n8
stepscope analyze --model organism --traces runs/results/organism-medium-n8 --condition baseline --mechanism \
  --mechanism-limit 200 --threads 1 --out runs/analysis/organism-medium-n8

# the organism: StepFlow sweep on a tuning set (data seed 1), the best on fresh problems (data seed 2)
sweep() { local name=$1 seed=$2; shift 2
  stepscope eval "${ORG[@]}" --data-seed "$seed" --conditions baseline,stepflow "$@" --out "runs/sweep/$name"; }
sweep oeb-tau0.30 1 --no-smi --tau-max 0.3
sweep oeb-tau0.50 1 --no-smi --tau-max 0.5
sweep oeb-all-tau0.15 1 --no-smi --oeb-layers 0-5
sweep smi-a0.20 1 --no-oeb --alpha 0.2
sweep smi-a0.50 1 --no-oeb --alpha 0.5
sweep smi-all-a0.20 1 --no-oeb --smi-layers 0-5 --alpha 0.2
sweep fresh-oeb-all-tau0.15 2 --no-smi --oeb-layers 0-5

# calibrated bands vs the paper's default vs random bands, on fresh problems (docs/results.md, calibrated bands)
python scripts/validate_calibration.py --model default --task addsub --n 300 --out docs/data/calibration_addsub.json
python scripts/validate_calibration.py --model organism --task organism:medium --n 300 --max-new-tokens 400 \
  --batch-size 32 --out docs/data/calibration_organism.json
# the live flow monitor vs Step-Saliency's question reach (docs/results.md, the live flow monitor)
python scripts/monitor_correlation.py --model default --task addsub --n 32 --max-new-tokens 200 \
  --out docs/data/monitor_addsub.json
python scripts/monitor_correlation.py --model default --task addsub-long --n 24 --max-new-tokens 240 \
  --out docs/data/monitor_addsub_long.json
python scripts/monitor_correlation.py --model organism --task organism:medium --n 64 --max-new-tokens 400 \
  --batch-size 32 --out docs/data/monitor_organism.json
