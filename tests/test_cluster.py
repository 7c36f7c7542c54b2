"""Mini-batch k-means and the cluster-quality scores (paper sec. 3.1, CLUSTERING)."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cluster


def blobs(n_per=60, k=5, dim=8, seed=0):
    """k tight, far-apart Gaussian blobs; returns (points, true blob index), shuffled."""
    g = torch.Generator().manual_seed(seed)
    means = 10 * torch.randn(k, dim, generator=g)
    truth = torch.arange(k).repeat_interleave(n_per)
    x = means[truth] + 0.1 * torch.randn(k * n_per, dim, generator=g)
    order = torch.randperm(k * n_per, generator=g)
    return x[order], truth[order]


def test_kmeans_recovers_separated_blobs():
    x, truth = blobs()
    centers, assign = cluster.minibatch_kmeans(x, 5, seed=0, batch_size=64, iters=30)
    assert centers.shape == (5, 8) and assign.shape == (300,)
    assert cluster.purity(assign, truth) == 1.0
    assert cluster.nmi(assign, truth) == pytest.approx(1.0)
    # every centre sits on its blob's mean (Sculley's 1/v_c rate makes it a running mean)
    for c in range(5):
        assert torch.allclose(centers[c], x[assign == c].mean(0), atol=0.05)


def test_kmeans_seeded_and_leaves_global_rng_alone():
    x, _ = blobs(k=6, seed=1)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = cluster.minibatch_kmeans(x, 4, seed=7, batch_size=32, iters=10)
    assert torch.rand(1) == before
    b = cluster.minibatch_kmeans(x, 4, seed=7, batch_size=32, iters=10)
    c = cluster.minibatch_kmeans(x, 4, seed=8, batch_size=32, iters=10)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("k", [1, 0, 301])
def test_kmeans_rejects_bad_k(k):
    x, _ = blobs()
    with pytest.raises(ValueError, match="--clusters"):
        cluster.minibatch_kmeans(x, k, seed=0)


def _two_rank_worker(rank, init_file, out_dir, split):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    x, _ = blobs()
    shard = x[:split] if rank == 0 else x[split:]
    centers, assign = cluster.minibatch_kmeans(shard, 5, seed=3, batch_size=48, iters=20)
    torch.save({"centers": centers, "assign": assign}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process(tmp_path):
    split = 113  # uneven shards on purpose
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path), split), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))

    x, _ = blobs()
    centers, assign = cluster.minibatch_kmeans(x, 5, seed=3, batch_size=48, iters=20)
    # bit-identical centres on both ranks and to one process; shards' assignments concatenate
    assert torch.equal(r0["centers"], centers) and torch.equal(r1["centers"], centers)
    assert len(r0["assign"]) == split
    assert torch.equal(torch.cat([r0["assign"], r1["assign"]]), assign)


def test_purity_and_nmi_hand_computed():
    assign = torch.tensor([0, 0, 0, 1, 1, 1])
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    # contingency [[2, 1, 0], [0, 1, 2]]: purity (2 + 2) / 6;
    # I = 2 * (1/3) ln 2, H(A) = ln 2, H(T) = ln 3, NMI = I / ((H(A) + H(T)) / 2)
    assert cluster.purity(assign, truth) == pytest.approx(2 / 3)
    expected = (2 / 3 * math.log(2)) / ((math.log(2) + math.log(3)) / 2)
    assert cluster.nmi(assign, truth) == pytest.approx(expected, abs=1e-12)
    assert cluster.nmi(truth, assign) == pytest.approx(expected, abs=1e-12)


def test_purity_and_nmi_limit_cases():
    truth = torch.tensor([0, 0, 1, 1, 2, 2])
    relabeled = torch.tensor([7, 7, 3, 3, 5, 5])
    assert cluster.purity(relabeled, truth) == 1.0
    assert cluster.nmi(relabeled, truth) == pytest.approx(1.0)
    # independent labelings: no information
    a, t = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    assert cluster.purity(a, t) == 0.5 and cluster.nmi(a, t) == pytest.approx(0.0)
    # one cluster against several classes: 0; one group on both sides: 1 (as scikit-learn)
    assert cluster.nmi(torch.zeros(6, dtype=torch.long), truth) == pytest.approx(0.0)
    assert cluster.nmi(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long)) == 1.0
