#!/bin/bash
# Cross-validation folds, then all-patient models, on a lent GPU machine that has no copy of the dataset.
#
#   bash tools/lent_gpu_crossval.sh PACK CV_DIR "FOLDS" ["SEEDS"]
#
# PACK: a tools/data_pack.py pack at the recipe's image size and crop. CV_DIR: holds the recipe's config.json (as
# `python -m flaxtumor.crossval` writes it) and, for SEEDS, every fold not in FOLDS already trained
# (CV_DIR/fold_K/segmenter/metadata.json). FOLDS train in parallel; then, with SEEDS, one all-patient model per seed
# (CV_DIR/fold_all, CV_DIR/fold_all_seed<S>) at the folds' median best epoch (crossval's recommended_epochs). With
# a fixed schedule (train.export_epoch "last" in the config) the all-patient models need no fold and train beside
# them, for the config's epochs.
# The repository root needs .whl/ with the wheels that machine lacks (grain 0.2.18, array_record, portpicker), for
# its Python 3.12; from here (PyPI):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_31_x86_64 -d .whl \
#     grain==0.2.18 portpicker
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#     array_record==0.8.6
# Each finished run is written as $OUT/<run>.tar.gz without its Orbax training state: unpack them where the data is
# and run `python -m flaxtumor.crossval --out CV_DIR --resume --data /data/lgg` for the out-of-fold step.
#
# The shipped segmenter: `bash tools/lent_gpu_crossval.sh .remote/lgg128.pack runs/cv_fixed "0 1 2 3 4" "0 1"` with
# configs/segmenter_crossval.json (with root, out, save_every_steps 0, plot off) as runs/cv_fixed/config.json:
# 484 s on one H100 (jax 0.11.2), the five folds and the two all-patient models all in parallel.
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
all_patients() {  # the all-patient models at $1 epochs
  for S in $SEEDS; do
    name=fold_all; [ "$S" != 0 ] && name=fold_all_seed$S
    train "$name" --fold all --epochs "$1" --seed "$S" --out "$CV/$name" &
  done
}
# A fixed schedule (--export-epoch last) needs nothing from the folds: the all-patient models run beside them.
FIXED=$(python3 -c "import json; t = json.load(open('$CV/config.json'))['train']; \
print(t['epochs'] if t.get('export_epoch') == 'last' else '')") || exit 1
for K in $FOLDS; do train "fold_$K" --fold "$K" --out "$CV/fold_$K" & done
[ -n "$SEEDS" ] && [ -n "$FIXED" ] && all_patients "$FIXED"
wait
if [ -n "$SEEDS" ] && [ -z "$FIXED" ]; then
  E=$(python3 -c "from flaxtumor.crossval import recommended_epochs as r; import json; \
print(r('$CV', json.load(open('$CV/config.json'))['data']['folds'], 'seg')['epochs'])") || exit 1
  echo "recommended epochs $E at $((SECONDS - START)) s"
  all_patients "$E"
  wait
fi
echo "done at $((SECONDS - START)) s"
