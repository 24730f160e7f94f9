#!/bin/sh
# Train a NoProp model and export it to /models/$NOPROP_RUN_NAME/model.onnx,
# where the service container finds it through NOPROP_MODEL_PATH.
#
# NOPROP_RUN_NAME    folder name of the run and of the exported model
#                    (default: mnist-dt)
# NOPROP_TRAIN_ARGS  options for `python -m training`, split on spaces
#                    (default: --dataset mnist --epochs 3 --lr-schedule cosine)
# NOPROP_EXPORT_ARGS options for `python -m export`, split on spaces
#                    (default: none, which verifies on the whole test split)
set -eu

run_name="${NOPROP_RUN_NAME:-mnist-dt}"
train_args="${NOPROP_TRAIN_ARGS:---dataset mnist --epochs 3 --lr-schedule cosine}"
export_args="${NOPROP_EXPORT_ARGS:-}"

case "$run_name" in
    "" | *[!A-Za-z0-9._-]* | .*)
        echo "error: NOPROP_RUN_NAME='$run_name' is not a valid folder name;" \
            "use letters, digits, '.', '_' and '-', not starting with '.'" >&2
        exit 2
        ;;
esac

run_dir="/runs/$run_name"
model_dir="/models/$run_name"
# The arguments are split on spaces on purpose: they are command line options.
# shellcheck disable=SC2086
python -m training --output-dir "$run_dir" $train_args
# shellcheck disable=SC2086
python -m export "$run_dir/checkpoint.pt" --output "$model_dir/model.onnx" $export_args
cp "$run_dir/log.csv" "$run_dir/curves.png" "$model_dir/"
echo "exported $model_dir/model.onnx; serve it with" \
    "NOPROP_MODEL_PATH=$model_dir/model.onnx"
