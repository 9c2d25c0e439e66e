#!/usr/bin/env bash
# The phantom demo, end to end on the CPU: autoencoder -> anatomical LDM -> samples with masks -> report.
# Measured time (bench/RESULTS.md section 8, defaults, 2 cores): 7 min idle, 9 min beside one other CPU-bound
# program, 15 min beside two.
#
#   make demo                      # (creates .venv first)
#   PYTHON=.venv/bin/python bash scripts/demo.sh
#
# Environment:
#   DEMO_STEPS     LDM training steps (default 1500)
#   DEMO_SAMPLES   samples to draw (default 32)
#   DEMO_COMPARE   1: also train the plain LDM baseline the same way, an independent segmenter, and write the
#                  anatomical-vs-baseline report (roughly doubles the time)
#   DEMO_SEG_STEPS training steps of the independent segmenter of DEMO_COMPARE=1 (default 1000)
#   AE_ARGS        extra main.py arguments of the autoencoder run (e.g. lightning.trainer.max_steps=100)
#   LOGDIR         where runs go (default logs/demo)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
LOGDIR="${LOGDIR:-logs/demo}"
STEPS="${DEMO_STEPS:-1500}"
N="${DEMO_SAMPLES:-32}"
SEG_STEPS="${DEMO_SEG_STEPS:-1000}"
CFG=configs/latent-diffusion/demo_phantom_anatomical.yaml
BASE_CFG=configs/latent-diffusion/demo_phantom_ldm.yaml
export PYTHON LOGDIR

latest_run() { ls -1d "$LOGDIR"/*_"$1" 2>/dev/null | sort | tail -n 1; }

echo "== 1/4 autoencoder (if absent) and anatomical LDM, $STEPS steps, on the CPU"
GPUS="" bash train_anatomical_ldm.sh demo "lightning.trainer.max_steps=$STEPS"
RUN="$(latest_run demo_anatomical)"
[[ -f "$RUN/checkpoints/last.ckpt" ]] || { echo "error: no checkpoint in $RUN" >&2; exit 1; }

echo "== 2/4 $N samples with predicted masks (no mask given to the model)"
"$PYTHON" scripts/sample.py -r "$RUN" -n "$N" --batch_size 16 -c 50 -e 0 --seed 0 -l "$RUN/samples" --save_masks

SAMPLE_ARGS=(anatomical="$RUN/samples")
SEG_ARGS=()
if [[ "${DEMO_COMPARE:-0}" == "1" ]]; then
  echo "== 2b plain LDM baseline, same autoencoder, same steps"
  "$PYTHON" main.py --base "$BASE_CFG" -t -n demo_baseline -l "$LOGDIR" --accelerator cpu \
    "model.params.first_stage_config.params.ckpt_path=$LOGDIR/demo_phantom_kl/checkpoints/last.ckpt" \
    "lightning.trainer.max_steps=$STEPS"
  BASE_RUN="$(latest_run demo_baseline)"
  "$PYTHON" scripts/sample.py -r "$BASE_RUN" -n "$N" --batch_size 16 -c 50 -e 0 --seed 0 -l "$BASE_RUN/samples"
  "$PYTHON" scripts/train_segmenter.py --data "$CFG" --split train --num_classes 6 --steps "$SEG_STEPS" \
    --val_split validation -o "$LOGDIR/segmenter_demo.pt"
  SAMPLE_ARGS+=(baseline="$BASE_RUN/samples")
  SEG_ARGS=(--segmenter "$LOGDIR/segmenter_demo.pt")
fi

echo "== 3/4 report: phantom anatomy rules on the predicted masks, image statistics against real slices"
"$PYTHON" scripts/evaluate.py --samples "${SAMPLE_ARGS[@]}" --real "$CFG" --real_split validation \
  --rules phantom "${SEG_ARGS[@]}" -o "$RUN/report"

echo "== 4/4 what the registers learned"
"$PYTHON" scripts/inspect_registers.py -r "$RUN" -l "$RUN/report/registers" -n 4 -c 20 --seed 0

MASKS_NOTE="samples with their predicted masks beside real slices with their true masks"
if [[ "${DEMO_COMPARE:-0}" == "1" ]]; then
  MASKS_NOTE="$MASKS_NOTE, and the baseline's samples with the segmenter's masks"
fi
cat <<DONE

Demo finished in $((SECONDS / 60)) min $((SECONDS % 60)) s.
figure: $RUN/report/comparison.png
        ($MASKS_NOTE; rule pass rates in the title)
Also:
  $RUN/report/report.md             anatomy pass rate and image statistics
  $RUN/report/registers/*.png       register similarity and class-attention maps
  $RUN/samples/                     images/, masks/, masks_colour/, samples.json
  $RUN/images/                      training-time image logs
DONE
