"""bench.py: the JSON line of a tiny run, its FLOP count against an independent one, bad input."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import biggan
import gan

TINY = ["--resolution", "32", "--ch", "8", "--batch-size", "4", "--steps", "1", "--warmup", "1",
        "--peak-size", "256", "--peak-reps", "1", "--device", "cpu"]
KEYS = ["img_per_s", "ms_per_step", "gflop_per_step", "gflops", "peak_gflops", "peak_fraction",
        "peak_mem_mb"]


def step_flops(batch, d_steps=2, ch=8):
    """One training step of biggan at 32x32 counted here, with gan.py's steps called directly."""
    torch.manual_seed(0)
    G, D = biggan.build_models(dict(resolution=32, ch=ch, num_classes=10))
    ing = gan.Ingredients()
    D = gan.DiscriminatorWithHeads(D, ing)
    opt_G = torch.optim.Adam(G.parameters(), betas=(0.0, 0.999), eps=1e-6)
    opt_D = torch.optim.Adam(D.parameters(), betas=(0.0, 0.999), eps=1e-6)
    real = torch.rand(batch, 3, 32, 32) * 2 - 1
    y = torch.randint(10, (batch,))
    z = torch.randn(batch, G.z_dim)
    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(d_steps):
            gan.d_step(G, D, opt_D, [(real, y, z, y)], ing)
        gan.g_step(G, D, opt_G, [(z, y)], ing)
    return counter.get_total_flops()


def test_tiny_run_prints_a_consistent_json_line(capsys):
    result = bench.main(TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    parsed = json.loads(lines[-1])
    assert parsed == result
    for key in KEYS:
        assert parsed[key] > 0, key
    assert parsed["device"] == "cpu" and parsed["method"] == "biggan"
    assert (parsed["resolution"], parsed["ch"], parsed["batch_size"]) == (32, 8, 4)

    # img_per_s counts the real images of d_steps D steps; FLOP/s and the fraction follow.
    step_s = parsed["ms_per_step"] / 1e3
    assert parsed["img_per_s"] == pytest.approx(2 * 4 / step_s, rel=1e-3)
    # (abs: the JSON rounds to 0.01 GFLOP/s, coarse for a tiny model on a busy machine)
    assert parsed["gflops"] == pytest.approx(parsed["gflop_per_step"] / step_s, rel=1e-2,
                                             abs=0.01)
    assert parsed["peak_fraction"] == pytest.approx(parsed["gflops"] / parsed["peak_gflops"],
                                                    rel=1e-2, abs=1e-3)

    # The same step counted here, with gan.d_step / gan.g_step called directly.
    assert parsed["gflop_per_step"] == pytest.approx(step_flops(4) / 1e9, rel=1e-3)


def test_flops_double_with_the_batch_for_a_rotation_and_cotraining_method():
    def flops(batch):
        args = bench.parse_args(["--method", "s3gan_co", "--ch", "4", "--batch-size", str(batch),
                                 "--d-steps", "1", "--device", "cpu"])
        step, _ = bench.make_step(args, torch.device("cpu"))
        return bench.count_flops(step)

    assert flops(16) / flops(8) == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps"),
    (["--resolution", "48"], "--resolution"),
    (["--method", "s3gan", "--batch-size", "6"], "rotated-fraction"),
])
def test_bad_input_names_the_flag(argv, words):
    with pytest.raises(SystemExit, match=words):
        args = bench.parse_args(argv + ["--device", "cpu"])
        bench.make_step(args, torch.device("cpu"))
