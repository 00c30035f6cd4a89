#!/bin/bash
# GPU job: distill the shipped reference model with each configuration of $RUNS (side by side on
# one GPU), then GenEval-mini of every variant. Results in $D/result. Run from the repo root:
#   RUNS="lr1e-4:--lr 1e-4|lr3e-4:--lr 3e-4|lr1e-3:--lr 1e-3" bash benchmarks/distill_refmodel.sh
#   RUNS="velocity:--lr 1e-4|flow:--lr 1e-4 --objective flow" bash benchmarks/distill_refmodel.sh
#   RUNS="onpolicy:--lr 1e-4 --onpolicy 0.5" SEEDS="0 100000 200000" \
#     BASE_VARIANTS="bf16,distilled-6k=flaxflux/refmodel/distilled" bash benchmarks/distill_refmodel.sh
# RUNS: "name:extra flaxflux-distill arguments", separated by "|". SEEDS: GenEval-mini noise seed
# sets (default 0). BASE_VARIANTS: quality.py variants scored beside the new ones.
# (the GPU machine has no pip install of this checkout: flaxflux.convert is linked in place)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FLAXFLUX_ATTENTION=xla XLA_PYTHON_CLIENT_MEM_FRACTION=0.3
python3 -c "import flaxflux.convert" 2>/dev/null || ln -sfn ../convert flaxflux/convert
D=${D:-/root/d}; mkdir -p $D/result
nvidia-smi --query-gpu=name --format=csv,noheader > $D/result/gpu.txt
python3 -c "from flaxflux.refmodel.data import calibration_prompts; open('$D/cal.txt','w').write('\n'.join(calibration_prompts(2048)))"
python3 -m flaxflux.cli convert flaxflux/refmodel/model $D/teacher --no-progress > $D/result/convert.txt 2>&1
STEPS=${STEPS:-6000}
IFS='|' read -ra SPECS <<< "$RUNS"
NAMES=()
for spec in "${SPECS[@]}"; do
  name=${spec%%:*}; extra=${spec#*:}; NAMES+=("$name")
  # shellcheck disable=SC2086  # $extra is a list of arguments
  python3 -m flaxflux.cli distill $D/teacher $D/cal.txt $D/out_$name --steps $STEPS --batch 256 $extra \
    --samples-per-prompt 8 --holdout 64 --eval-every 500 --ckpt-every 2000 --no-progress --work $D/work_$name \
    > $D/result/distill_$name.txt 2>&1 &
done
wait
for name in "${NAMES[@]}"; do cp $D/work_$name/log.jsonl $D/result/log_$name.jsonl; done
V=${BASE_VARIANTS:-bf16,ternary-tensor,ternary-channel}
for name in "${NAMES[@]}"; do [ -d $D/out_$name ] && V="$V,distilled-$name=$D/out_$name"; done
unset XLA_PYTHON_CLIENT_MEM_FRACTION FLAXFLUX_ATTENTION
for seed in ${SEEDS:-0}; do
  python3 benchmarks/quality.py --model flaxflux/refmodel/model --variants "$V" --ternary-backend xla --seed $seed \
    --out $D/result/quality_$seed.json --grids $D/result/grids_$seed > $D/result/quality_$seed.txt 2>&1
done
tar cf $D/result/outs.tar -C $D $(cd $D && ls -d out_* | sed 's|$|/transformer|') $(cd $D && ls -d out_* | sed 's|$|/flaxflux.json|')
touch $D/result/DONE
