#!/bin/bash
# Cross-validation folds, then all-patient models, on a lent GPU machine that has no copy of the dataset.
#
#   bash tools/lent_gpu_crossval.sh PACK CV_DIR "FOLDS" ["SEEDS"]
#
# PACK: a tools/data_pack.py pack at the recipe's image size and crop. CV_DIR: holds the recipe's config.json (as
# `python -m flaxtumor.crossval` writes it) and, for SEEDS, every fold not in FOLDS already trained
# (CV_DIR/fold_K/segmenter/metadata.json). FOLDS train in parallel; then, with SEEDS, one all-patient model per seed
# (CV_DIR/fold_all, CV_DIR/fold_all_seed<S>) at the folds' median best epoch (crossval's recommended_epochs).
# The repository root needs .whl/ with the wheels that machine lacks (grain 0.2.18, array_record, portpicker).
# Each finished run is written as $OUT/<run>.tar.gz without its Orbax training state: unpack them where the data is
# and run `python -m flaxtumor.crossval --out CV_DIR --resume --data /data/lgg` for the out-of-fold step.
#
# The shipped segmenter: `bash tools/lent_gpu_crossval.sh .remote/lgg128.pack runs/cv_missing "0 1 2" "0 1"`, with
# folds 3 and 4 trained on the CPU: 516 s on one H100 (jax 0.11.2), three folds then two models in parallel.
set -u
PACK=$1 CV=$2 FOLDS=$3 SEEDS=${4:-}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest TQDM_MININTERVAL=20
START=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain; print('versions', jax.__version__, flax.__version__, optax.__version__, o.__version__, jax.devices())" || exit 1
train() {  # run name, then train.py arguments
  local name=$1; shift
  python3 tools/data_pack.py train --pack "$PACK" -- --config "$CV/config.json" "$@" > "$CV/$name.log" 2>&1
  echo "$name: rc $? at $((SECONDS - START)) s"; grep -E "val volumetric_dice|inference checkpoint|Error" "$CV/$name.log" | tail -3
  tar -czf "$OUT/$name.tar.gz" --exclude=orbax "$CV/$name" "$CV/$name.log"
}
for K in $FOLDS; do train "fold_$K" --fold "$K" --out "$CV/fold_$K" & done
wait
[ -z "$SEEDS" ] && exit 0
E=$(python3 -c "from flaxtumor.crossval import recommended_epochs as r; import json; \
print(r('$CV', json.load(open('$CV/config.json'))['data']['folds'], 'seg')['epochs'])") || exit 1
echo "recommended epochs $E at $((SECONDS - START)) s"
for S in $SEEDS; do
  name=fold_all; [ "$S" != 0 ] && name=fold_all_seed$S
  train "$name" --fold all --epochs "$E" --seed "$S" --out "$CV/$name" &
done
wait
echo "done at $((SECONDS - START)) s"
