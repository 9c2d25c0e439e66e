#!/usr/bin/env bash
# Train an anatomical latent diffusion model: the KL autoencoder first (when no checkpoint is found),
# then the anatomical LDM on top of it. The *_joint variants (joint image + mask generation) also train the
# mask autoencoder first when its checkpoint is absent.
#
#   ./train_anatomical_ldm.sh ctorgan|breastmri|demo|ctorgan_joint|breastmri_joint|demo_joint [main.py args ...]
#   (and ctorgan_labelmap|breastmri_labelmap|demo_labelmap: the mask-conditioned models, sample.py --masks)
#
# Environment:
#   GPUS        GPUs in CompVis form: "0,1" (two GPUs, DDP), "0," (GPU 0). Default: "0," for ctorgan and
#               breastmri; empty (CPU) for demo. GPUS="" forces the CPU.
#   NUM_NODES   number of nodes (default 1). Start this script once per node, with the same arguments.
#               Under SLURM (srun) Lightning reads the SLURM variables itself; otherwise set on every node
#               MASTER_ADDR, MASTER_PORT and NODE_RANK (0 on the master).
#   AE_CKPT     autoencoder checkpoint (default: LOGDIR/<AE config name>/checkpoints/last.ckpt, the path
#               the configs name, used only when main.py marked that run complete; when it is absent the
#               autoencoder is trained first and its run directory linked there once it finished; an
#               interrupted autoencoder run stops the script).
#   MASK_AE_CKPT  (*_joint) mask autoencoder checkpoint (default: LOGDIR/<mask AE config name>/checkpoints/last.ckpt;
#               trained first and linked there when absent). MASK_AE_ARGS="..." passes arguments to that run.
#   LOGDIR      directory of the runs (default: logs).
#   PYTHON      interpreter (default: .venv/bin/python when it exists, else python).
#   Dataset roots (ctorgan, breastmri) are read by the dataset classes from their config params or their
#   environment variables, see README_anatomical.md.
#
# Extra arguments go to main.py for the LDM run (e.g. lightning.trainer.max_steps=200000
# data.params.batch_size=16 --precision 16-mixed); AE_ARGS="..." passes arguments to the autoencoder run.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[[ $# -ge 1 ]] || usage 2
DATASET="$1"; shift
case "$DATASET" in
  ctorgan)
    AE_CONFIG=configs/autoencoder/autoencoder_kl_64x64x3_ctorgan.yaml
    LDM_CONFIG=configs/latent-diffusion/anatomical_ctorgan_kl.yaml
    GPUS="${GPUS-0,}" ;;
  breastmri)
    AE_CONFIG=configs/autoencoder/autoencoder_kl_64x64x3_breastmri.yaml
    LDM_CONFIG=configs/latent-diffusion/anatomical_breastmri_kl.yaml
    GPUS="${GPUS-0,}" ;;
  demo)
    AE_CONFIG=configs/autoencoder/demo_phantom_kl.yaml
    LDM_CONFIG=configs/latent-diffusion/demo_phantom_anatomical.yaml
    GPUS="${GPUS-}" ;;
  ctorgan_joint)
    AE_CONFIG=configs/autoencoder/autoencoder_kl_64x64x3_ctorgan.yaml
    MASK_AE_CONFIG=configs/autoencoder/mask_ae_ctorgan.yaml
    LDM_CONFIG=configs/latent-diffusion/anatomical_joint_ctorgan_kl.yaml
    GPUS="${GPUS-0,}" ;;
  breastmri_joint)
    AE_CONFIG=configs/autoencoder/autoencoder_kl_64x64x3_breastmri.yaml
    MASK_AE_CONFIG=configs/autoencoder/mask_ae_breastmri.yaml
    LDM_CONFIG=configs/latent-diffusion/anatomical_joint_breastmri_kl.yaml
    GPUS="${GPUS-0,}" ;;
  demo_joint)
    AE_CONFIG=configs/autoencoder/demo_phantom_kl.yaml
    MASK_AE_CONFIG=configs/autoencoder/mask_ae_phantom.yaml
    LDM_CONFIG=configs/latent-diffusion/demo_phantom_joint.yaml
    GPUS="${GPUS-}" ;;
  ctorgan_labelmap|breastmri_labelmap)
    AE_CONFIG=configs/autoencoder/autoencoder_kl_64x64x3_${DATASET%_labelmap}.yaml
    LDM_CONFIG=configs/latent-diffusion/anatomical_labelmap_${DATASET%_labelmap}_kl.yaml
    GPUS="${GPUS-0,}" ;;
  demo_labelmap)
    AE_CONFIG=configs/autoencoder/demo_phantom_kl.yaml
    LDM_CONFIG=configs/latent-diffusion/demo_phantom_labelmap.yaml
    GPUS="${GPUS-}" ;;
  -h|--help) usage 0 ;;
  *) echo "error: unknown dataset '$DATASET'; use ctorgan, breastmri, demo or one of them with _joint or _labelmap" >&2; exit 2 ;;
esac
MASK_AE_CONFIG="${MASK_AE_CONFIG:-}"
for cfg in "$AE_CONFIG" "$LDM_CONFIG" $MASK_AE_CONFIG; do
  [[ -f "$cfg" ]] || { echo "error: config $cfg not found (run from the repository root checkout)" >&2; exit 1; }
done

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
LOGDIR="${LOGDIR:-logs}"
NUM_NODES="${NUM_NODES:-1}"
if [[ "$NUM_NODES" -gt 1 && -z "${SLURM_JOB_ID:-}" && -z "${MASTER_ADDR:-}" ]]; then
  echo "error: NUM_NODES=$NUM_NODES without SLURM: set MASTER_ADDR, MASTER_PORT and NODE_RANK on every node" >&2
  exit 1
fi

DEVICE_ARGS=(--num_nodes "$NUM_NODES")
if [[ -n "$GPUS" ]]; then DEVICE_ARGS+=(--gpus "$GPUS"); else DEVICE_ARGS+=(--accelerator cpu); fi

# first_stage_ckpt WHAT CONFIG CKPT_VAR ARGS: prints the checkpoint of a first stage. CKPT_VAR (e.g. AE_CKPT) set in
# the environment wins; else LOGDIR/<config name>/checkpoints/last.ckpt of a run main.py marked complete; else the
# config is trained with main.py and its run, once complete, linked as LOGDIR/<config name>, the path the LDM
# configs name in their ckpt_path. An interrupted run (non-zero exit, no marker) stops the script.
COMPLETE_MARKER=training_complete.json  # main.py writes it into a run directory when training reached its end
first_stage_ckpt() {
  local what="$1" config="$2" var="$3" args="$4"
  local name link ckpt run
  name="$(basename "$config" .yaml)"
  link="$LOGDIR/$name"
  ckpt="${!var:-}"
  if [[ -n "$ckpt" ]]; then
    [[ -f "$ckpt" ]] || { echo "error: $var=$ckpt does not exist" >&2; return 1; }
    echo "$ckpt"; return 0
  fi
  ckpt="$link/checkpoints/last.ckpt"
  if [[ ! -f "$ckpt" ]]; then
    if [[ -e "$link" || -L "$link" ]]; then
      echo "error: $link exists but holds no checkpoints/last.ckpt; remove it or set $var" >&2; return 1
    fi
    echo "== no $what checkpoint at $ckpt: training $config first" >&2
    local status=0
    # shellcheck disable=SC2086
    "$PYTHON" main.py --base "$config" -t -n "$name" -l "$LOGDIR" "${DEVICE_ARGS[@]}" $args >&2 || status=$?
    run="$(ls -1d "$LOGDIR"/*_"$name" 2>/dev/null | sort | tail -n 1)"
    if [[ "$status" -ne 0 ]]; then
      local hint=""
      [[ -z "$run" ]] || hint="; continue it with: $PYTHON main.py -r $run -t, then run this script again"
      echo "error: the $what run stopped (exit status $status)$hint" >&2
      return 1
    fi
    if [[ -z "$run" || ! -f "$run/$COMPLETE_MARKER" ]]; then
      echo "error: the $what run did not reach its end (no $LOGDIR/*_$name/$COMPLETE_MARKER)" >&2; return 1
    fi
    ln -sfn "$(basename "$run")" "$link"
    echo "== linked $link -> $run" >&2
  elif [[ ! -f "$link/$COMPLETE_MARKER" ]]; then
    echo "error: the $what run $link did not reach its end (no $COMPLETE_MARKER): continue it with" \
         "$PYTHON main.py -r $link -t, or set $var=$ckpt to use this checkpoint as it is" >&2
    return 1
  fi
  echo "$ckpt"
}

AE_CKPT="$(first_stage_ckpt autoencoder "$AE_CONFIG" AE_CKPT "${AE_ARGS:-}")" || exit 1
echo "== autoencoder checkpoint: $AE_CKPT"

# Joint mode: the mask autoencoder, found or trained and linked the same way.
JOINT_ARGS=()
if [[ -n "$MASK_AE_CONFIG" ]]; then
  MASK_AE_CKPT="$(first_stage_ckpt "mask autoencoder" "$MASK_AE_CONFIG" MASK_AE_CKPT "${MASK_AE_ARGS:-}")" || exit 1
  echo "== mask autoencoder checkpoint: $MASK_AE_CKPT"
  JOINT_ARGS=("model.params.joint_mask_config.params.ckpt_path=$MASK_AE_CKPT")
fi

echo "== training the anatomical LDM ($LDM_CONFIG)"
exec "$PYTHON" main.py --base "$LDM_CONFIG" -t -n "${DATASET}_anatomical" -l "$LOGDIR" "${DEVICE_ARGS[@]}" \
  "model.params.first_stage_config.params.ckpt_path=$AE_CKPT" ${JOINT_ARGS[@]+"${JOINT_ARGS[@]}"} "$@"
