"""Cluster labels for unsupervised training: mini-batch k-means on F(x) (paper sec. 3.1).

CLUSTERING learns a feature extractor F with the rotation loss (eq. 1, rotation.py), runs
mini-batch k-means (Sculley 2010) on F(x) over the training set, and trains the GAN with the
cluster index of each real image as its label, y_CL = c_CL(F(x)). The paper reports 50 clusters
on ImageNet; 500 did worse.

Sculley's update keeps a count v_c per centre and moves the centre towards each point assigned
to it with learning rate 1 / v_c, so every centre is the running mean of the points it has
received. Within one mini-batch the assignments are fixed first (as in the paper's Algorithm 1),
which makes the per-point loop equal to one closed-form step per centre:

    v_c' = v_c + m_c,        c' = c + (S_c - m_c c) / v_c'

where m_c is the number of mini-batch points assigned to c and S_c their sum.

Many processes: in an initialized torch.distributed world each rank passes its shard of the
features (shards in rank order make up the whole set). Every rank draws the same global mini-
batch indices from the shared seed; the rank owning a row writes it and the others write zeros,
so one all_reduce(SUM) hands every rank the exact mini-batch (x + 0 is exact in floating point).
Every rank then runs the same update on the same numbers, which keeps the centres identical on all
ranks and equal to the one-process result, whatever the split. Only the final assignment of all
points, the expensive part, is divided among the ranks.

Run `python cluster.py --f-checkpoint F.pt --data DIR --clusters 50 --out labels.pt`.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as nnf

# ---------------------------------------------------------------------------------------------
# Distributed helpers: a world of one when torch.distributed is not initialized.


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _shard_offsets(n_local, device):
    """Global index of this rank's first row, and the total number of rows."""
    rank, world = _world()
    if world == 1:
        return 0, n_local
    sizes = torch.zeros(world, dtype=torch.long, device=device)
    sizes[rank] = n_local
    dist.all_reduce(sizes)
    return int(sizes[:rank].sum()), int(sizes.sum())


def _gather_rows(features, global_idx, offset):
    """Rows `global_idx` of the whole feature matrix, identical on every rank.

    The owner of each row writes it, the others write zeros, and a SUM all_reduce adds exactly
    one non-zero term per entry, so the result is bit-identical to indexing the full matrix.
    """
    _, world = _world()
    if world == 1:
        return features[global_idx]
    local = global_idx - offset
    owned = (local >= 0) & (local < features.shape[0])
    rows = torch.zeros(len(global_idx), features.shape[1], dtype=features.dtype,
                       device=features.device)
    rows[owned] = features[local[owned]]
    dist.all_reduce(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Mini-batch k-means (Sculley 2010).


def nearest_center(x, centers):
    """Index of the nearest centre (squared Euclidean distance) for every row of x."""
    # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so drop it
    scores = (centers * centers).sum(1) - 2 * x @ centers.T
    return scores.argmin(1)


def kmeans_plus_plus(x, k, generator):
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each new centre is drawn with
    probability proportional to its squared distance from the nearest centre chosen so far."""
    first = torch.randint(len(x), (1,), generator=generator).item()
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        # all points coincide with a centre: any choice is as good, take uniform
        weights = d2 if d2.sum() > 0 else torch.ones_like(d2)
        pick = torch.multinomial(weights.double().cpu(), 1, generator=generator).item()
        centers.append(x[pick])
        d2 = torch.minimum(d2, ((x - x[pick]) ** 2).sum(1))
    return torch.stack(centers)


def minibatch_kmeans(features, k, seed, batch_size=1024, iters=200, init_sample=None):
    """Cluster `features` (N, d) into k groups; returns (centers (k, d), assignments (N,)).

    In a torch.distributed world pass this rank's shard; the assignments returned are for that
    shard, the centres are the same on every rank and equal to a one-process run on the whole
    set with the same seed. The seed alone fixes the result (a private torch.Generator; the
    global RNG is not touched).
    """
    features = features.float()
    offset, n = _shard_offsets(features.shape[0], features.device)
    if k < 2 or k > n:
        raise ValueError(f"--clusters must be between 2 and the number of points ({n}); "
                         f"got {k}")
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, n)

    # Seeding: k-means++ on a seeded sample of the whole set, the same sample on every rank
    sample_size = min(n, init_sample or max(batch_size, 20 * k))
    sample_idx = torch.randperm(n, generator=generator)[:sample_size]
    sample = _gather_rows(features, sample_idx.to(features.device), offset)
    centers = kmeans_plus_plus(sample, k, generator)
    counts = torch.zeros(k, dtype=features.dtype, device=features.device)

    for _ in range(iters):
        # Draw the mini-batch M (same indices on every rank) and cache its nearest centres
        idx = torch.randint(n, (batch_size,), generator=generator).to(features.device)
        x = _gather_rows(features, idx, offset)
        assign = nearest_center(x, centers)

        # Per-centre gradient step with learning rate 1 / v_c, all points of M at once
        one_hot = nnf.one_hot(assign, k).to(x.dtype)
        m = one_hot.sum(0)
        counts += m
        sums = one_hot.T @ x
        moved = m > 0
        centers[moved] += (sums[moved] - m[moved, None] * centers[moved]) / counts[moved, None]

    return centers, assign_all(features, centers)


def assign_all(features, centers, chunk=65536):
    """Nearest centre for every row, in chunks so that N x k distances never sit in memory."""
    return torch.cat([nearest_center(features[i:i + chunk].float(), centers)
                      for i in range(0, len(features), chunk)])


# ---------------------------------------------------------------------------------------------
# Agreement of cluster labels with the true classes.


def _contingency(assign, truth):
    """Table n_ij = number of points in cluster i with true class j."""
    _, a = torch.unique(assign, return_inverse=True)
    _, t = torch.unique(truth, return_inverse=True)
    table = torch.zeros(int(a.max()) + 1, int(t.max()) + 1, dtype=torch.float64)
    table.index_put_((a, t), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    return table


def purity(assign, truth):
    """Share of points whose cluster's most common true class is their own class."""
    table = _contingency(assign, truth)
    return (table.max(1).values.sum() / table.sum()).item()


def _entropy(counts):
    p = counts[counts > 0] / counts.sum()
    return -(p * p.log()).sum()


def nmi(assign, truth):
    """Normalized mutual information I(A; T) / ((H(A) + H(T)) / 2), the arithmetic
    normalization (scikit-learn's default); 1 when both labelings have one group each."""
    table = _contingency(assign, truth)
    n = table.sum()
    h_a, h_t = _entropy(table.sum(1)), _entropy(table.sum(0))
    if h_a == 0 and h_t == 0:
        return 1.0
    joint = table[table > 0] / n
    outer = (table.sum(1, keepdim=True) @ table.sum(0, keepdim=True) / n ** 2)[table > 0]
    mutual = (joint * (joint / outer).log()).sum()
    return (mutual / ((h_a + h_t) / 2)).clamp(0, 1).item()


# ---------------------------------------------------------------------------------------------
# Command line: features of F on an ImageFolder -> cluster labels file.


def main(argv=None):
    parser = argparse.ArgumentParser(description="Mini-batch k-means labels from F (sec. 3.1)")
    parser.add_argument("--f-checkpoint", required=True, help="F.pt written by rotation.py")
    parser.add_argument("--data", required=True, help="ImageFolder directory (training set)")
    parser.add_argument("--clusters", type=int, default=50, help="k (paper: 50)")
    parser.add_argument("--out", required=True, help="where to write the labels (.pt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1024, help="k-means mini-batch")
    parser.add_argument("--iters", type=int, default=200, help="k-means mini-batch steps")
    parser.add_argument("--feature-batch", type=int, default=256, help="batch for F(x)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    args = parser.parse_args(argv)

    import rotation  # only the command line needs F (and torchvision); k-means takes any features
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # Features of F on the training images, in ImageFolder order, at F's own resolution
    try:
        F = rotation.load_feature_extractor(args.f_checkpoint, device=device)
        dataset = rotation.image_folder(args.data, F.resolution)
    except ValueError as err:
        raise SystemExit(f"bad --f-checkpoint/--data: {err}")
    if not 2 <= args.clusters <= len(dataset):
        raise SystemExit(f"--clusters must be between 2 and the number of images "
                         f"({len(dataset)}); got {args.clusters}")
    features = rotation.extract_features(F, dataset, args.feature_batch).to(device)

    # Cluster, then compare with the true classes (never used for training)
    try:
        _, labels = minibatch_kmeans(features, args.clusters, args.seed, args.batch_size,
                                     args.iters)
    except ValueError as err:
        raise SystemExit(str(err))
    labels = labels.cpu()
    truth = torch.as_tensor(dataset.targets)
    scores = {"purity": purity(labels, truth), "nmi": nmi(labels, truth)}
    print(f"k={args.clusters}: purity {scores['purity']:.4f}, NMI {scores['nmi']:.4f} "
          f"against the {len(dataset.classes)} ImageFolder classes")

    meta = {"clusters": args.clusters, "seed": args.seed, "data": args.data,
            "f_checkpoint": args.f_checkpoint, "iters": args.iters,
            "batch_size": args.batch_size, **scores}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # written whole or not at all: a crash never leaves half a labels file behind
    torch.save({"labels": labels.long().cpu(), "meta": meta}, args.out + ".tmp")
    os.replace(args.out + ".tmp", args.out)
    print(f"wrote {len(labels)} cluster labels to {args.out}")


if __name__ == "__main__":
    main()
