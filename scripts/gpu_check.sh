#!/usr/bin/env bash
# GPU check (DESIGN.md "Scale"): one process on one CUDA GPU, bf16 autocast, 128x128, ch 96.
#
#   bash scripts/gpu_check.sh          # a few minutes on one H100/H200, most of it start-up
#
# 1. train.setup_world under torchrun (a world of one): the "cpu:gloo,cuda:nccl" process group
#    all-reduces a CPU and a CUDA tensor, gathers an object and passes a barrier.
# 2. bench.py: images/s and peak GPU memory of one training step (biggan, s3gan_co), batch 256.
# 3. train.py: 20 steps of s3gan_co on synthetic class folders (10 x 64 random 128x128 PNGs,
#    2 data loader workers), then a resume to 22 steps; prints its log and peak GPU memory.
# Everything worth keeping is copied to $OUT when it is set (the device machine's output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
out=${OUT:-$tmp/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

echo "== 1. process group of train.py on CUDA (torchrun, one process)"
cat > "$tmp/world.py" <<'EOF'
import torch
import torch.distributed as dist

import train

rank, world, device = train.setup_world("cuda")
cpu, gpu = torch.ones(1), torch.ones(1, device=device)
dist.all_reduce(cpu)
dist.all_reduce(gpu)
gathered = [None] * world
dist.all_gather_object(gathered, {"rank": rank})
dist.barrier()
print(f"world {world} on {device}: CPU sum {cpu.item()}, CUDA sum {gpu.item()}, {gathered}")
dist.destroy_process_group()
EOF
PYTHONPATH="$PWD" timeout 300 \
    python -m torch.distributed.run --standalone --nproc_per_node=1 "$tmp/world.py"

echo "== 2. bench.py, 128x128, ch 96, batch 256, bf16"
for method in biggan s3gan_co; do
    timeout 600 python bench.py --method "$method" --resolution 128 --ch 96 --batch-size 256 \
        --amp bf16 --device cuda --steps 5 --warmup 2 | tee "$out/bench_$method.txt"
done

echo "== 3. train.py, 20 steps of s3gan_co on synthetic data, then a resume"
python - "$tmp/data" <<'EOF'
import os
import sys

import torch
from PIL import Image

gen = torch.Generator().manual_seed(0)
for c in range(10):
    os.makedirs(os.path.join(sys.argv[1], f"class{c}"))
    for i in range(64):
        pixels = torch.randint(0, 256, (128, 128, 3), dtype=torch.uint8, generator=gen)
        Image.fromarray(pixels.numpy()).save(os.path.join(sys.argv[1], f"class{c}", f"{i}.png"))
EOF
cat > "$tmp/train_peak.py" <<'EOF'
import sys

import torch

import train

train.main(sys.argv[1:])
print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB")
EOF
flags=(--data "$tmp/data" --out "$tmp/run" --method s3gan_co --resolution 128 --ch 96
       --batch-size 256 --amp bf16 --device cuda --log-every 5 --sample-every 20
       --ckpt-every 20 --standing-batches 8 --workers 2)
PYTHONPATH="$PWD" timeout 600 python "$tmp/train_peak.py" "${flags[@]}" --steps 20
PYTHONPATH="$PWD" timeout 300 python "$tmp/train_peak.py" "${flags[@]}" --steps 22 \
    | tee "$tmp/resume.txt"
grep -q "resumed from $tmp/run/ckpt.pt at step 20" "$tmp/resume.txt"
cp "$tmp/run/log.jsonl" "$tmp/run/config.json" "$out/"
cp "$tmp/run/samples/step0000020.png" "$out/"
echo "== log.jsonl (img_per_s of the first line includes CUDA warm-up)"
cat "$tmp/run/log.jsonl"
echo "gpu_check: all passed"
