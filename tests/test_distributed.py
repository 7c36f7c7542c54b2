"""Scale (DESIGN.md): one code path from one CPU process to a torchrun world.

Two gloo processes on the CPU check what a many-process run relies on: every rank ends with the
same G, D and EMA weights; the data samplers split each epoch between the ranks; a checkpoint
moves between world sizes; SIGTERM to every process leaves a checkpoint; one D step of a world
of two equals one step of one process on the same global batch; the pre-training stages of
CLUSTERING and S2GAN finish under two processes.

Start-up (importing torch) dominates on a small CPU, so one module-scoped fixture makes two
torchrun launches and every two-process test reads what they left: train.py's CLI itself, then
this module as the worker script of both processes (`python -m test_distributed PLAN.json`, see
`worker`), which runs several jobs in turn, the last of them pre-empted by SIGTERM.
"""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import biggan
import gan
import train
from test_train import make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--resolution", "32", "--ch", "8", "--standing-batches", "1", "--log-every", "1"]
STAGES = ["--pretrain-steps", "2", "--pretrain-batch-size", "8", "--clusters", "3",
          "--f-arch", "resnet18"]
# s3gan_co rotates n = per-process batch / 2 / 4 images: 16 over two processes gives n = 1.
S3GAN_CO = ["--method", "s3gan_co", "--batch-size", "16", *TINY]
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
LAUNCH_TIMEOUT = 300        # a hung collective fails the test instead of blocking CI


# --------------------------------------------------------------------------------------------
# Launching torchrun in its own session, so that a hang or a pre-emption reaches every process.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, log_path, nproc=2):
    """`python -m torch.distributed.run --standalone` in a new session, output to log_path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", *args]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def finish(proc, log_path, deadline):
    """The exit code; on a hang, the whole session is killed and the test fails."""
    try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"torchrun hung for {LAUNCH_TIMEOUT} s:\n{tail(log_path)}")
    return proc.returncode


def tail(path):
    with open(path) as f:
        return f.read()[-6000:]


def logged_steps(out):
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return [0]
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()] or [0]


def step_of(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=False)["step"]


def run_one(folder, out, *extra):
    """One process, in this one (no torchrun environment: a world of one)."""
    return train.main(["--data", folder, "--out", out, *extra])


# --------------------------------------------------------------------------------------------
# The worker: runs a plan of jobs in one process of a world, each job in a fresh process group.

def worker(plan_path):
    with open(plan_path) as f:
        jobs = json.load(f)
    for job in jobs:
        # A later job: a new rendezvous on a store of rank 0's (torchrun's own store still
        # holds the keys of the first process group, and a second one on it would not connect).
        if job.get("port"):
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]))
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        if job["kind"] == "train":
            train_job(job["argv"], job.get("save"))
        else:
            d_step_job(job["save"])


def train_job(argv, save):
    """train.main(argv), keeping this rank's G, D, EMA and real-label table to compare."""
    held = {}
    originals = gan.d_step, gan.ema_update, train.real_label_table

    def d_step(G, D, opt_D, micro_batches, *args, **kwargs):
        held.update(G=G, D=D)
        held.setdefault("batch", micro_batches[0])      # (real, labels, z, fake labels)
        return originals[0](G, D, opt_D, micro_batches, *args, **kwargs)

    def ema_update(G_ema, *args, **kwargs):
        held.update(G_ema=G_ema)
        return originals[1](G_ema, *args, **kwargs)

    def real_label_table(*args, **kwargs):
        table = originals[2](*args, **kwargs)
        held.update(labels=table[0])
        return table

    gan.d_step, gan.ema_update, train.real_label_table = d_step, ema_update, real_label_table
    try:
        train.main(argv)
    finally:
        gan.d_step, gan.ema_update, train.real_label_table = originals
    if save:
        state = {k: train.unwrap(held[k]).state_dict() for k in ("G", "D", "G_ema")}
        state.update(labels=held["labels"], batch=held["batch"])
        torch.save(state, os.path.join(save, f"rank{os.environ['RANK']}.pt"))


def d_step_job(save, batch=8):
    """One gan.d_step with DDP over this world's halves of a batch, and (every rank alike) one
    step of a plain D on the whole batch; also train.average over ranks of unequal counts."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # G in eval mode: its fakes do not depend on which other images share the batch. No
    # rotation: each process rotates the last n images of its own half, by design another set.
    ing = gan.Ingredients(cotrain=True)
    torch.manual_seed(0)
    G, D = biggan.build_models(dict(resolution=32, ch=8, num_classes=3))
    G.eval()
    one = gan.DiscriminatorWithHeads(D, ing)
    two = copy.deepcopy(one)
    before = copy.deepcopy(one.state_dict())
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(batch, 3, 32, 32, generator=gen) * 2 - 1
    labels = torch.randint(3, (batch,), generator=gen)      # all labeled: equal counts
    z = torch.randn(batch, G.z_dim, generator=gen)
    fake_labels = torch.randint(3, (batch,), generator=gen)
    adam = dict(lr=2e-4, betas=(0.0, 0.999), eps=1e-6)

    gan.d_step(G, one, torch.optim.Adam(one.parameters(), **adam),
               [(real, labels, z, fake_labels)], ing)
    ddp = DDP(two)
    part = slice(rank * batch // world, (rank + 1) * batch // world)
    gan.d_step(G, ddp, torch.optim.Adam(ddp.parameters(), **adam),
               [(real[part], labels[part], z[part], fake_labels[part])], ing)

    # Rank r holds r + 1 values summing to 5r + 1: the mean of all values, (1 + 6) / 3, is
    # not the mean of the per-rank means, (1 + 3) / 2.
    sums = {"x": (torch.tensor(float(rank * 5 + 1)), rank + 1)}
    average = train.average(sums, world)
    grads = {name: (p.grad, q.grad) for (name, p), (_, q) in
             zip(one.named_parameters(), two.named_parameters())}
    torch.save(dict(before=before, one=one.state_dict(), two=two.state_dict(), grads=grads,
                    average=average), os.path.join(save, f"rank{rank}.pt"))
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The shared runs: two torchrun launches.

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def world(folder, tmp_path_factory):
    """1. torchrun train.py --method s3gan_co --steps 2 (the CLI itself).
    2. torchrun of this module's worker, whose two processes run in turn:
       s3gan_co resumed to 4 steps (each rank's weights kept); one D step with DDP against
       one without; one step each of CLUSTERING and S2GAN with their pre-training stages;
       last, a biggan run that resumes a one-process checkpoint and is sent SIGTERM once it
       has logged step 3 or later (torchrun passes it on to each worker's process group,
       data loader worker included, as a scheduler signalling every process would)."""
    tmp = tmp_path_factory.mktemp("world")
    deadline = time.time() + LAUNCH_TIMEOUT
    dirs = {name: str(tmp / name) for name in ("s3gan_co", "ranks", "d_step", "clustering",
                                                "clustering-ranks", "s2gan", "s2gan-ranks",
                                                "preempted")}
    for name in ("ranks", "d_step", "clustering-ranks", "s2gan-ranks"):
        os.makedirs(dirs[name])
    s3gan_co = ["--data", folder, "--out", dirs["s3gan_co"], *S3GAN_CO]
    biggan = ["--batch-size", "8", *TINY]
    run_one(folder, dirs["preempted"], *biggan, "--steps", "2")

    first_log = str(tmp / "first.log")
    proc = torchrun(["train.py", *s3gan_co, "--steps", "2"], first_log)
    first_code = finish(proc, first_log, deadline)
    assert first_code == 0, tail(first_log)

    plan = str(tmp / "plan.json")
    with open(plan, "w") as f:
        json.dump([
            dict(kind="train", argv=s3gan_co + ["--steps", "4"], save=dirs["ranks"]),
            dict(kind="d_step", save=dirs["d_step"], port=free_port()),
            *[dict(kind="train", port=free_port(), save=dirs[m + "-ranks"],
                   argv=["--data", folder, "--out", dirs[m], "--method", m, "--batch-size",
                         "8", *TINY, *STAGES, "--steps", "1"]) for m in ("clustering", "s2gan")],
            dict(kind="train", port=free_port(),
                 argv=["--data", folder, "--out", dirs["preempted"], *biggan, "--steps", "400",
                       "--workers", "1"]),
        ], f)
    second_log = str(tmp / "second.log")
    proc = torchrun(["-m", "test_distributed", plan], second_log)
    while max(logged_steps(dirs["preempted"])) < 3 and proc.poll() is None:
        if time.time() > deadline:
            break
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    finish(proc, second_log, deadline)       # torchrun itself exits with SignalException
    assert max(logged_steps(dirs["preempted"])) >= 3, tail(second_log)
    with open(first_log) as f1, open(second_log) as f2:
        return dict(first=f1.read(), second=f2.read(), **dirs)


# --------------------------------------------------------------------------------------------
# Tests

def test_batches_give_each_rank_disjoint_indices_covering_the_epoch(folder):
    data = train.RealImages(folder, 32, show_progress=False)
    used = torch.arange(len(data))[torch.arange(len(data)) % 3 != 0]     # 16 of 24 images
    ranks = [train.Batches(data, used, 4, 2, rank, seed=0, workers=0, pin=False)
             for rank in (0, 1)]
    assert ranks[0].per_epoch == ranks[1].per_epoch == 2
    orders = []
    for epoch in range(2):
        seen = [torch.cat([next(b)[1] for _ in range(b.per_epoch)]).tolist() for b in ranks]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == used.tolist()
        orders.append(seen[0])
    assert orders[0] != orders[1]       # set_epoch: a new permutation every epoch

    # A resumed rank skips the batches already drawn and continues with the same ones.
    resumed = train.Batches(data, used, 4, 2, 1, seed=0, workers=0, pin=False)
    resumed.skip_to(3)
    fresh = train.Batches(data, used, 4, 2, 1, seed=0, workers=0, pin=False)
    for _ in range(3):
        next(fresh)
    assert torch.equal(next(resumed)[1], next(fresh)[1])


def test_torchrun_s3gan_co_runs_and_resumes(world):
    out = world["s3gan_co"]
    assert "s3gan_co: 2 process(es) on cpu" in world["first"]
    assert "no SyncBatchNorm kernel" in world["first"]
    assert f"resumed from {out}/ckpt.pt at step 2" in world["second"]
    assert step_of(out) == 4
    assert logged_steps(out) == [1, 2, 3, 4]        # rank 0 alone writes the log
    with open(os.path.join(out, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert all(torch.isfinite(torch.tensor(x["loss_d"])) for x in lines)
    assert all(0 <= x["acc_rot_real"] <= 1 for x in lines)


def test_every_rank_holds_identical_weights(world):
    """G, D and the EMA agree bit for bit after resumed DDP steps (the G step goes around D's
    DDP wrapper). G's BatchNorm running statistics stay per process on a CPU (no
    SyncBatchNorm kernel) and rank 0's EMA carries standing statistics: those are left out."""
    ranks = [torch.load(os.path.join(world["ranks"], f"rank{r}.pt"), weights_only=False)
             for r in (0, 1)]
    for key in ("G", "D", "G_ema"):
        names = [n for n in ranks[0][key] if not n.endswith(BN_STATS)]
        assert names and set(ranks[0][key]) == set(ranks[1][key])
        for name in names:
            assert torch.equal(ranks[0][key][name], ranks[1][key][name]), (key, name)
    assert torch.equal(ranks[0]["labels"], ranks[1]["labels"])

    # The checkpoint holds these weights, under the plain module names.
    ckpt = torch.load(os.path.join(world["s3gan_co"], "ckpt.pt"), weights_only=False)
    for key in ("G", "D", "G_ema"):
        for name in ranks[0][key]:
            if not name.endswith(BN_STATS):
                assert torch.equal(ckpt[key][name], ranks[0][key][name]), (key, name)


def test_each_rank_draws_its_own_images_and_noise(world):
    """Disjoint real images and per-rank noise streams (seed * 1000 + rank, restored from the
    checkpoint on resume): the processes do not duplicate each other's half of the batch."""
    ranks = [torch.load(os.path.join(world["ranks"], f"rank{r}.pt"), weights_only=False)
             for r in (0, 1)]
    (real0, _, z0, _), (real1, _, z1, _) = ranks[0]["batch"], ranks[1]["batch"]
    assert real0.shape == real1.shape == (8, 3, 32, 32) and z0.shape == z1.shape
    assert not any(torch.equal(a, b) for a in real0 for b in real1)
    assert not torch.allclose(z0, z1)


def test_one_d_step_of_two_processes_equals_one_process_on_the_global_batch(world):
    ranks = [torch.load(os.path.join(world["d_step"], f"rank{r}.pt"), weights_only=False)
             for r in (0, 1)]
    for result in ranks:
        # DDP's gradient is the mean over both halves: the gradient of the mean loss over the
        # global batch (a sum, or one rank's own half, would be far off).
        for name, (one, two) in result["grads"].items():
            torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-4 * one.abs().max().item(),
                                       msg=name)
        # And Adam's step from it: first steps move each weight by about lr = 2e-4.
        moved = [n for n in result["one"] if not torch.equal(result["one"][n],
                                                            result["before"][n])]
        assert len(moved) > 10
        for name, value in result["one"].items():
            torch.testing.assert_close(result["two"][name], value, rtol=1e-5, atol=1e-5,
                                       msg=name)
    # Log values are averaged over all values of all ranks: (1 + 6) / (1 + 2).
    assert ranks[0]["average"] == ranks[1]["average"] == {"x": round(7 / 3, 4)}


def test_two_process_checkpoint_resumes_in_one_process(world, folder, tmp_path, capsys):
    out = str(tmp_path / "moved")
    shutil.copytree(world["s3gan_co"], out)
    run_one(folder, out, *S3GAN_CO, "--steps", "5")
    assert f"resumed from {out}/ckpt.pt at step 4" in capsys.readouterr().out
    assert step_of(out) == 5 and logged_steps(out) == [1, 2, 3, 4, 5]


def test_one_process_checkpoint_resumes_in_two(world):
    out = world["preempted"]
    assert f"resumed from {out}/ckpt.pt at step 2" in world["second"]
    assert "biggan: 2 process(es) on cpu" in world["second"]
    steps = logged_steps(out)
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == step_of(out) >= 3


def test_sigterm_to_every_process_leaves_a_checkpoint_that_resumes(world, folder, capsys):
    out = world["preempted"]
    stopped = step_of(out)
    assert 3 <= stopped < 400, world["second"][-6000:]
    assert f"stopped by a signal at step {stopped}" in world["second"]
    assert "exited unexpectedly" not in world["second"]      # the data loader worker lived
    assert not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
    run_one(folder, out, "--batch-size", "8", *TINY, "--steps", str(stopped + 1))
    assert f"resumed from {out}/ckpt.pt at step {stopped}" in capsys.readouterr().out
    assert step_of(out) == stopped + 1 and logged_steps(out)[-1] == stopped + 1


@pytest.mark.parametrize("method, stage, message", [
    ("clustering", "clusters", "stage: 3 clusters, purity"),
    ("s2gan", "s2l", "stage: S2L labels agree with the true class"),
])
def test_pre_training_stages_finish_in_two_processes(world, method, stage, message):
    """Rotation pre-training and k-means, or S2L pre-training, run with DDP and all-reduces in
    both processes; rank 0 caches the result and both ranks give D the same labels."""
    out = world[method]
    assert step_of(out) == 1 and message in world["second"]
    assert any(name.startswith(stage + "-") for name in os.listdir(out))
    ranks = [torch.load(os.path.join(out + "-ranks", f"rank{r}.pt"), weights_only=False)
             for r in (0, 1)]
    labels = ranks[0]["labels"]
    assert torch.equal(labels, ranks[1]["labels"]) and len(labels) == 24
    assert 0 <= labels.min() and labels.max() < 3


def test_unwrap_sees_through_compile():
    module = torch.nn.Linear(2, 2)
    assert train.unwrap(torch.compile(module)) is module
    assert list(train.unwrap(torch.compile(module)).state_dict()) == ["weight", "bias"]


if __name__ == "__main__":
    worker(sys.argv[1])
