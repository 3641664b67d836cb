#!/usr/bin/env bash
# Trains the quickstart export (himar_jax/assets/quickstart) from scratch on one GPU and scores it.
#
#   launch/train_quickstart.sh OUT_DIR [FASHION_MNIST_DIR] [SECONDS] [--config.<field>=<value> ...]
#
# Runs `quickstart --from_scratch` (KL VAE -> normalised tokenizer -> latent cache -> Hi-MAR -> export -> grid) in
# OUT_DIR/work with bfloat16 matmuls (QUICKSTART_DTYPE) and grain workers (log: OUT_DIR/train.log). SECONDS (0 = no limit) bounds
# that stage: at the limit SIGTERM makes the Hi-MAR trainer save and stop, and the pipeline goes on from there. Then the
# export is scored with the Fashion-MNIST classifier for a few sampler settings (OUT_DIR/scores.json) and packed
# as OUT_DIR/export.tar. Environment: QUICKSTART_VARIANT (configs/quickstart.py variant, default ''),
# QUICKSTART_WORKERS (grain workers, 12), QUICKSTART_EVAL_NUM (samples per setting, 1000), QUICKSTART_DTYPE
# (matmul dtype, bfloat16; float32 on a CPU).
# To ship the result: rm -r himar_jax/assets/quickstart && tar -xf OUT_DIR/export.tar -C himar_jax/assets
set -euo pipefail
out=${1:?usage: launch/train_quickstart.sh OUT_DIR [FASHION_MNIST_DIR] [SECONDS] [--config.x=y ...]}
data=${2:-/usr/share/datasets/fashion-mnist}
seconds=${3:-0}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
work="$out/work"
workers=${QUICKSTART_WORKERS:-12}
variant=${QUICKSTART_VARIANT:-}
dtype=${QUICKSTART_DTYPE:-bfloat16}
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 -m himar_jax quickstart --workdir="$work" --config=configs/quickstart.py:"$variant" \
  --config.quickstart.from_scratch=True \
  --config.vae.data.path="$data" --config.model.dtype="$dtype" --config.vae.model.dtype="$dtype" \
  --config.data.num_workers="$workers" --config.vae.data.num_workers="$workers" "$@" > "$out/train.log" 2>&1 &
pid=$!
if [ "$seconds" -gt 0 ]; then
  # One SIGTERM once SECONDS have passed, and only while the Hi-MAR trainer's loop runs (it has logged a dense-
  # phase loss and the pipeline has not logged its summary): the loop saves and stops, and the export is made
  # from that checkpoint. Elsewhere SIGTERM would end the process.
  until ! kill -0 "$pid" 2>/dev/null || grep -q "from scratch:" "$out/train.log"; do
    if [ $(( $(date +%s) - start )) -ge "$seconds" ] && grep -q "train/loss_dense" "$out/train.log"; then
      echo "time limit: SIGTERM to the Hi-MAR trainer after $(( $(date +%s) - start )) s" >> "$out/train.log"
      kill -TERM "$pid"; break
    fi
    sleep 2
  done
fi
wait "$pid"
echo "quickstart from scratch: $(( $(date +%s) - start )) s" | tee -a "$out/train.log"
cp "$work/samples/grid.png" "$out/grid.png"
tar -cf "$out/export.tar" -C "$work" --transform 's,^export,quickstart,' export
python3 -m himar_jax.quickstart --export="$work/export" --data="$data" --num="${QUICKSTART_EVAL_NUM:-1000}" \
  --config="$variant" --out="$out/scores.json" --setting='{}' --setting='{"cfg": 1.5, "re_cfg": 1.5}' \
  --setting='{"cfg": 5.0, "re_cfg": 5.0}' 2>&1 | tee "$out/eval.log"
echo "total: $(( $(date +%s) - start )) s" | tee -a "$out/eval.log"
