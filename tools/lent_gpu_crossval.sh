#!/bin/bash
# The lent-GPU run that trained folds 0-2 of the shipped cross-validation (in parallel), then the shipped segmenter's
# two all-patient models (seeds 0 and 1, the folds' median best epoch), all from the pack (tools/data_pack.py).
# It needs, in the repository root of that machine: .remote/lgg128.pack, .whl/ (grain 0.2.18, array_record and
# portpicker wheels for its Python), runs/cv_missing/config.json and folds 3 and 4's segmenter/metadata.json (trained
# on the CPU). Each finished run comes back as $OUT/<run>.tar.gz (no Orbax training state); unpack them here and run
#   python -m flaxtumor.crossval --out runs/cv_missing --resume --data /data/lgg
# for the out-of-fold step. Measured: 516 s on one H100 (jax 0.11.2).
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest TQDM_MININTERVAL=20
START=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('versions', jax.__version__, flax.__version__, optax.__version__, o.__version__, jax.devices())" || exit 1
CV=runs/cv_missing
train() {  # name, then train.py arguments
  local name=$1; shift
  python3 tools/data_pack.py train --pack .remote/lgg128.pack -- --config $CV/config.json "$@" > $CV/$name.log 2>&1
  echo "$name: rc $? at $((SECONDS - START)) s"; grep -E "val volumetric_dice|inference checkpoint|Error" $CV/$name.log | tail -3
  tar -czf $OUT/$name.tar.gz --exclude=orbax $CV/$name $CV/$name.log
}
for K in 0 1 2; do train fold_$K --fold $K --out $CV/fold_$K & done
wait
E=$(python3 -c "from flaxtumor.crossval import recommended_epochs as r; print(r('$CV', 5, 'seg')['epochs'])") || exit 1
echo "recommended epochs $E at $((SECONDS - START)) s"
train fold_all --fold all --epochs $E --out $CV/fold_all &
train fold_all_seed1 --fold all --epochs $E --seed 1 --out $CV/fold_all_seed1 &
wait
echo "done at $((SECONDS - START)) s"
