"""Speed and memory of one training step (paper sec. 4's training loop, at any size).

    python bench.py                                        # biggan, 32x32, ch 32, batch 32, CPU
    python bench.py --resolution 64 --method s3gan_co --steps 3
    python bench.py --device cuda --amp bf16 --batch-size 256 --ch 96 --resolution 128

One step is exactly what train.py repeats: --d-steps discriminator updates (gan.d_step, each on
a batch of real images and a batch of fakes from fresh z and y_f), one generator update
(gan.g_step), then the EMA update of G (gan.ema_update). The networks, the heads, the
ingredients and Adam (betas (0, 0.999), eps 1e-6, foreach) are built as train.main builds them.
Real images are random tensors in [-1, 1] and labels random class indices (for the
co-training methods about 10% labeled, the rest -1): the benchmark measures compute, not data.

The numbers:
  ms_per_step     mean wall time of --steps steps after --warmup untimed ones
  cpu_ms_per_step the process's CPU time per step, all threads together: on a shared machine
                  a wall time far above cpu_ms_per_step / threads means other processes ran
  img_per_s       real images per second, d_steps * batch / step time (train.py's img_per_s)
  gflop_per_step  FLOPs of one step counted by torch.utils.flop_counter.FlopCounterMode: the
                  matrix products and convolutions of every forward and backward pass (not the
                  elementwise ops, the optimizer, the spectral norm power iterations' vectors)
                  (gan.g_step runs D on the fakes alone; compare_gan's G step runs D on
                  [real, fake] as its D step does, which at 32x32, ch 32, batch 32 adds one D
                  forward and input-backward on 32 images: 408 GFLOP instead of 374)
  gflops          gflop_per_step / step time
  peak_gflops     a large matrix product (fp32; bf16 with --amp bf16) timed in the same process
                  with the same threads: what this machine does on the friendliest kernel
  peak_fraction   gflops / peak_gflops
  peak_mem_mb     CPU: the process's peak resident memory (getrusage) after the timed steps;
                  CUDA: torch.cuda.max_memory_allocated during the timed steps
  load_avg        the 1-minute load average at start and end: above the number of cores,
                  other processes shared them and every time above is pessimistic

By default the step is train.py's: channels_last layout and --amp auto (bf16 autocast where
the CUDA device or the CPU has native bf16 units). Options to measure what each buys:
--no-channels-last, --amp none|bf16, --compile (compile time lands in warmup_s), --fused-adam,
--cache-sn, --threads. On a CUDA
device fp32 convolutions may use TF32 (cudnn's default) while the fp32 peak matmul does not,
so peak_fraction can exceed 1 there.

The last printed line is one JSON object with these numbers and the configuration.
"""
import argparse
import contextlib
import json
import os
import resource
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import biggan
import gan
import train

NUM_CLASSES = 10        # the bundled data's classes (a constant-label method has one)
LABELED_FRACTION = 0.1  # labeled share of real images for the co-training methods


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time one training step of train.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("--method", default="biggan", choices=list(train.METHODS), help="train.py's --method")
    add("--resolution", type=int, default=32, help="image side: 32, 64, 128 or 256")
    add("--ch", type=int, default=32, help="channel multiplier of G and D")
    add("--batch-size", type=int, default=32, help="real images per D step (one process)")
    add("--d-steps", type=int, default=2, help="D steps per G step")
    add("--steps", type=int, default=5, help="timed steps")
    add("--warmup", type=int, default=2, help="untimed steps before timing")
    add("--rotated-fraction", type=int, default=2, help="rotation methods: n = batch / this / 4")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add("--amp", choices=["auto", "none", "bf16"], default="auto",
        help="bf16 autocast as train.py --amp (auto: where the hardware has native bf16)")
    add("--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="G, D and real images in NHWC layout, as train.py")
    add("--compile", action="store_true", help="torch.compile G and D (compile time reported)")
    add("--fused-adam", action="store_true", help="Adam(fused=True) instead of foreach")
    add("--cache-sn", action="store_true",
        help="compute each spectral-normalised weight once per forward/backward "
             "(torch.nn.utils.parametrize.cached)")
    add("--peak-size", type=int, default=4096, help="side of the square matmul for the peak")
    add("--peak-reps", type=int, default=3, help="timed repetitions of the peak matmul")
    args = p.parse_args(argv)
    for key in ("resolution", "ch", "batch_size", "d_steps", "steps", "peak_size", "peak_reps"):
        if getattr(args, key) < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        raise SystemExit("error: --warmup must be 0 or more")
    if args.resolution not in biggan.ARCH:
        raise SystemExit(f"error: --resolution {args.resolution} is not supported: use one of "
                         f"{sorted(biggan.ARCH)}")
    return args


def pick_device(flag):
    if flag == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    cuda = torch.cuda.is_available() if flag == "auto" else flag == "cuda"
    return torch.device("cuda" if cuda else "cpu")


# --------------------------------------------------------------------------------------------
# The models, optimizers and synthetic batches, as train.main sets them up

def build(args, device):
    """G, D (with heads), G_ema, Adam for both, the ingredients and the number of classes."""
    row = train.METHODS[args.method]
    K = 1 if row["labels"] == "constant" else NUM_CLASSES
    ing = gan.Ingredients(**{k: v for k, v in row.items() if k != "labels"})
    if ing.rotation:
        import rotation
        try:
            ing.rotated_n = rotation.rotated_count(args.batch_size, args.rotated_fraction)
        except ValueError as err:
            raise SystemExit(f"error: {err}")

    torch.manual_seed(0)
    G, D = biggan.build_models(dict(resolution=args.resolution, ch=args.ch, num_classes=K))
    D = gan.DiscriminatorWithHeads(D, ing)
    G_ema = gan.make_ema(G)
    G, D, G_ema = G.to(device), D.to(device), G_ema.to(device)
    if args.channels_last:
        G, D = G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    adam = dict(betas=(0.0, 0.999), eps=1e-6,
                **(dict(fused=True) if args.fused_adam else dict(foreach=True)))
    opt_G = torch.optim.Adam(G.parameters(), lr=2e-4, **adam)
    opt_D = torch.optim.Adam(D.parameters(), lr=2e-4, **adam)
    return G, D, G_ema, opt_G, opt_D, ing, K


def real_batch(args, K, device, gen):
    """Random images in [-1, 1] and labels in the form train.py gives D for this method."""
    B = args.batch_size
    real = torch.rand(B, 3, args.resolution, args.resolution, generator=gen) * 2 - 1
    labels = torch.randint(K, (B,), generator=gen)
    if train.METHODS[args.method]["labels"] == "partial":
        labels[torch.rand(B, generator=gen) >= LABELED_FRACTION] = -1
    if args.channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    return real.to(device), labels.to(device)


# --------------------------------------------------------------------------------------------
# One step, its FLOPs, and the machine's peak

def make_step(args, device):
    """Build everything and return step(): one G step of train.py's loop, and the models."""
    G, D, G_ema, opt_G, opt_D, ing, K = build(args, device)
    if args.compile:
        G, D = torch.compile(G), torch.compile(D)
    gen = torch.Generator().manual_seed(0)
    batches = [real_batch(args, K, device, gen) for _ in range(args.d_steps)]
    B, z_dim, count = args.batch_size, G.z_dim, [0]
    amp = args.amp == "bf16"      # resolved from auto in main(), as train.py does
    cache = torch.nn.utils.parametrize.cached if args.cache_sn else contextlib.nullcontext

    def noise():
        z = torch.randn(B, z_dim, generator=gen).to(device)
        return z, torch.randint(K, (B,), generator=gen).to(device)

    def step():
        for real, real_labels in batches:
            with cache():
                gan.d_step(G, D, opt_D, [(real, real_labels, *noise())], ing, amp=amp)
        with cache():     # as train.py: the G step calls the plain D, never compiled
            gan.g_step(G, train.unwrap(D), opt_G, [noise()], ing, amp=amp)
        count[0] += 1
        gan.ema_update(G_ema, train.unwrap(G), count[0], 0.99, 100)

    return step, (G, D)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(step):
    """FLOPs of one call of step(), forward and backward, as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def peak_gflops(device, size, reps, dtype):
    """GFLOP/s of a size x size matrix product: the best of `reps` timed runs after one."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, dtype)
    b = torch.randn(size, size, generator=gen).to(device, dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    scale = 1 if sys.platform == "darwin" else 1024     # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2 ** 20


# --------------------------------------------------------------------------------------------

def time_steps(step, args, device):
    """(seconds of warm-up, wall seconds per step, CPU seconds per step, peak memory MiB)."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    cpu_s = (time.process_time() - cpu0) / args.steps
    return warmup_s, step_s, cpu_s, peak_memory_mb(device)


def print_table(r):
    peak_name = f"peak GFLOP/s ({r['peak_size']}^2 {r['peak_dtype']} matmul)"
    rows = [("method", r["method"]), ("resolution", f"{r['resolution']}x{r['resolution']}"),
            ("ch / batch / d_steps", f"{r['ch']} / {r['batch_size']} / {r['d_steps']}"),
            ("device / threads", f"{r['device']} / {r['threads']}"),
            ("load average (start, end)", ", ".join(map(str, r["load_avg"]))),
            ("G / D parameters", f"{r['params_G']:,} / {r['params_D']:,}"),
            ("warm-up", f"{r['warmup']} steps in {r['warmup_s']:.2f} s"),
            ("step time", f"{r['ms_per_step']:.1f} ms (mean of {r['steps']})"),
            ("CPU time / step", f"{r['cpu_ms_per_step']:.1f} ms (all threads together)"),
            ("real images / s", f"{r['img_per_s']:.2f}"),
            ("GFLOP / step", f"{r['gflop_per_step']:.2f}"),
            ("achieved GFLOP/s", f"{r['gflops']:.1f}"),
            (peak_name, f"{r['peak_gflops']:.1f}"),
            ("fraction of peak", f"{r['peak_fraction']:.3f}"),
            ("peak memory", f"{r['peak_mem_mb']:.0f} MiB")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    args.amp = train.resolve_amp(args.amp, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]      # other processes on a shared machine skew the times
    step, (G, D) = make_step(args, device)

    # Warm-up (and compilation), the timed steps, the FLOPs of one more step, and the
    # machine's peak on a large matrix product.
    warmup_s, step_s, cpu_s, mem_mb = time_steps(step, args, device)
    flop = count_flops(step)
    peak_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float32
    peak = peak_gflops(device, args.peak_size, args.peak_reps, peak_dtype)

    gflops = flop / step_s / 1e9
    result = dict(
        img_per_s=round(args.d_steps * args.batch_size / step_s, 3),
        ms_per_step=round(step_s * 1e3, 2), cpu_ms_per_step=round(cpu_s * 1e3, 2),
        gflop_per_step=round(flop / 1e9, 3), gflops=round(gflops, 2),
        peak_gflops=round(peak, 2), peak_fraction=round(gflops / peak, 4),
        peak_mem_mb=round(mem_mb, 1), device=str(device), threads=torch.get_num_threads(),
        method=args.method, resolution=args.resolution, ch=args.ch,
        batch_size=args.batch_size, d_steps=args.d_steps, steps=args.steps,
        warmup=args.warmup, amp=args.amp, channels_last=args.channels_last,
        compile=args.compile, fused_adam=args.fused_adam, cache_sn=args.cache_sn,
        warmup_s=round(warmup_s, 2), peak_size=args.peak_size,
        peak_dtype=str(peak_dtype).removeprefix("torch."),
        load_avg=[round(load_before, 2), round(os.getloadavg()[0], 2)],
        params_G=biggan.count_parameters(G), params_D=biggan.count_parameters(D))
    print_table(result)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
