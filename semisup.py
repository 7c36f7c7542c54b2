"""Fewer labels: the labeled subset, S2L pre-training (sec. 3.1, eq. 2) and co-training (sec. 3.2).

The labeled subset. For k% labels the paper draws k% of the images of every class at random;
the rest keep label -1 ("unlabeled") everywhere in this project.

S2L (sec. 3.1, eq. 2). A feature extractor F, a linear rotation head c_R and a linear classifier
c_S2L are trained together on

    L_S2L(F, c_R, c_S2L) = L_R(F, c_R) - gamma * E_{(x, y) ~ labeled} log p(c_S2L(F(x)) = y)

with gamma = 0.5: the rotation term (eq. 1) over all images, the cross-entropy over the labeled
ones. As in the paper, each batch mixes labeled and unlabeled images 1:3 (512 + 1536 = 2048 on
ImageNet), drawn by two samplers, and the SGD schedule is the one of rotation pre-training.
S2GAN then labels every real image with argmax c_S2L(F(x)) (`predict_labels`).

Co-training (sec. 3.2, eq. 3). A linear head c_CT on the discriminator's features h = D~(x) is
trained with cross-entropy on the labeled real images (`ClassifierHead`, `class_loss`); the
unlabeled real images are fed to the projection with c_CT's prediction, one-hot of the argmax by
default or the softmax, with the gradient stopped (`fill_labels`).

Run `python semisup.py --data DIR --val DIR --label-fraction 0.1 --resolution 32 --steps N
--out s2l.pt [--baseline]` to pre-train S2L (and a labeled-only baseline with the same budget)
and print top-1/top-5 accuracy on the validation images.
"""
import argparse
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as nnf
from tqdm import tqdm

import rotation
from biggan import sn_linear

# ---------------------------------------------------------------------------------------------
# The labeled subset: k% of every class, -1 elsewhere.


def labeled_subset(targets, fraction, seed):
    """True labels for a seeded per-class fraction of the images, -1 for the others.

    Each class c with n_c images keeps round(fraction * n_c) labels (halves round up), chosen
    with a torch.Generator seeded by `seed` alone, so every process and every machine with the
    same torch draws the same subset.
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    if not 0 < fraction <= 1:
        raise ValueError(f"--label-fraction must be in (0, 1]; got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.full_like(targets, -1)

    classes, sizes = torch.unique(targets[targets >= 0], return_counts=True)
    for c, n_c in zip(classes.tolist(), sizes.tolist()):
        # round half up; the tiny slack keeps 0.5 / n_c * n_c from falling just below a half
        count = math.floor(fraction * n_c + 0.5 + 1e-9)
        if count < 1:
            raise ValueError(
                f"--label-fraction {fraction} leaves class {c} ({n_c} images) with no labeled "
                f"image; use --label-fraction {_round_up(0.5 / sizes.min().item())} or more")
        members = (targets == c).nonzero().squeeze(1)
        chosen = members[torch.randperm(n_c, generator=generator)[:count]]
        labels[chosen] = c
    return labels


def _round_up(x, digits=6):
    """x rounded up to `digits` significant digits, so that a suggested value is enough."""
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale) / scale


# ---------------------------------------------------------------------------------------------
# Co-training (sec. 3.2, eq. 3): classifier head c_CT on D's features h.


class ClassifierHead(nn.Module):
    """c_CT: a linear map from h to class logits, with spectral norm like D's other heads."""

    def __init__(self, feat_dim, num_classes):
        super().__init__()
        self.linear = sn_linear(feat_dim, num_classes)

    def forward(self, h):
        return self.linear(h)


def class_loss(logits, labels):
    """Mean cross-entropy over the labeled rows (label >= 0); rows with -1 are ignored.

    With no labeled row the loss is exactly 0 and still part of the graph (its gradient is
    zero), as TF's SUM_BY_NONZERO_WEIGHTS reduction in the official code gives.
    """
    labeled = labels >= 0
    ce = nnf.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return (ce * labeled).sum() / labeled.sum().clamp(min=1)


@torch.no_grad()
def fill_labels(logits, labels, num_classes, soft=False):
    """The (B, K) label matrix for the projection: one-hot for labeled rows, and for rows with
    -1 the classifier's prediction, one-hot of the argmax (hard, the default) or the softmax
    (soft). No gradient flows back into the classifier (the official code's stop_gradient)."""
    if soft:
        predicted = logits.float().softmax(1)
    else:
        predicted = nnf.one_hot(logits.argmax(1), num_classes).float()
    known = nnf.one_hot(labels.clamp(min=0), num_classes).float()
    return torch.where((labels >= 0)[:, None], known, predicted)


def label_accuracy(predicted, truth):
    """Share of rows whose predicted class (indices, or logits to argmax) equals the true one;
    rows whose truth is -1 do not count. NaN when none is left."""
    if predicted.dim() == 2:
        predicted = predicted.argmax(1)
    known = truth >= 0
    return (predicted[known] == truth[known]).double().mean().item()


# ---------------------------------------------------------------------------------------------
# S2L pre-training (sec. 3.1, eq. 2).


class MixedBatches(torch.utils.data.Sampler):
    """Endless batches of indices: n_labeled from the labeled pool, then the rest from the
    unlabeled pool, each pool reshuffled (seeded) every time it runs out."""

    def __init__(self, labeled_idx, unlabeled_idx, n_labeled, n_unlabeled, seed):
        self.pools = [(labeled_idx, n_labeled), (unlabeled_idx, n_unlabeled)]
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        streams = [_shuffled_stream(pool, generator) for pool, _ in self.pools]
        while True:
            yield [next(stream) for stream, (_, n) in zip(streams, self.pools) for _ in range(n)]


def _shuffled_stream(pool, generator):
    while True:
        yield from pool[torch.randperm(len(pool), generator=generator)].tolist()


class _WithIndex(torch.utils.data.Dataset):
    """(image, index) pairs, so that a batch can look its labels up in the subset."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], i


def _loader(dataset, batch_sampler, num_workers):
    return torch.utils.data.DataLoader(_WithIndex(dataset), batch_sampler=batch_sampler,
                                       num_workers=num_workers,
                                       persistent_workers=num_workers > 0)


def _pools(labels, labeled_only):
    labeled_idx = (labels >= 0).nonzero().squeeze(1)
    unlabeled_idx = (labels < 0).nonzero().squeeze(1)
    if len(labeled_idx) == 0:
        raise ValueError("the labeled subset is empty; raise --label-fraction")
    if labeled_only:
        return labeled_idx, unlabeled_idx[:0]
    if len(unlabeled_idx) == 0:
        # --label-fraction 1: the rotation term still averages over all images (eq. 2)
        unlabeled_idx = torch.arange(len(labels))
    return labeled_idx, unlabeled_idx


def _world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class S2LNet(nn.Module):
    """F with its two linear heads: c_R (4 rotations) and c_S2L (classes)."""

    def __init__(self, arch, resolution, num_classes):
        super().__init__()
        self.F = rotation.build_feature_extractor(arch, resolution)
        self.c_R = nn.Linear(self.F.feat_dim, rotation.NUM_ROTATIONS)
        self.c_S2L = nn.Linear(self.F.feat_dim, num_classes)

    def forward(self, x, rotate=True):
        """(rotation logits of x in all 4 rotations, class logits of x), or class logits only
        when rotate=False."""
        if not rotate:
            return self.c_S2L(self.F(x))
        h = self.F(rotation.rotate_all(x))
        # rotate_all puts the unrotated copies first
        return self.c_R(h), self.c_S2L(h[:len(x)])


def pretrain_s2l(dataset, labels, steps, batch_size=64, gamma=0.5, arch="resnet18",
                 resolution=32, lr=rotation.LR_PER_256, momentum=0.9, weight_decay=1e-4,
                 seed=0, log=print, log_every=50, workers=0, device=None, labeled_only=False):
    """Train F, c_R and c_S2L on L_R + gamma * CE (eq. 2); returns (F, c_S2L) in eval mode.

    dataset: ImageFolder-like (with .classes), images in [-1, 1] at `resolution`; labels: the
    subset, one per image (-1 = unlabeled). batch_size counts source images (all ranks
    together), 1/4 of them labeled; each is seen in all 4 rotations, and lr is per 256 source
    images with the schedule of rotation pre-training. labeled_only=True trains the baseline
    instead: the same F and schedule, every image of the batch labeled, the cross-entropy alone.
    Under torchrun every rank must call this; DDP averages the gradients.
    """
    rank, world = _world()
    if batch_size % world or batch_size // world < 4:
        raise ValueError(f"--batch-size {batch_size} must divide by the {world} processes "
                         f"into at least 4 images each (1 labeled : 3 unlabeled)")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(dataset):
        raise ValueError(f"{len(labels)} labels for {len(dataset)} images; pass one label "
                         f"(or -1) per image, in the dataset's order")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)  # the initial weights, the same on every rank

    # F with c_R and c_S2L, SGD as for rotation pre-training
    net = S2LNet(arch, resolution, len(dataset.classes)).to(device)
    model = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=labeled_only)
    peak_lr = lr * batch_size / 256
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=momentum,
                          weight_decay=weight_decay)

    # Batches of 1 labeled : 3 unlabeled (the paper's 512 : 1536), a different stream per rank
    per_rank = batch_size // world
    n_labeled = per_rank if labeled_only else per_rank // 4
    labeled_idx, unlabeled_idx = _pools(labels, labeled_only)
    sampler = MixedBatches(labeled_idx, unlabeled_idx, n_labeled, per_rank - n_labeled,
                           seed=seed * 1000 + rank)
    batches = iter(_loader(dataset, sampler, workers))

    net.train()
    window = []
    for step in tqdm(range(steps), desc="S2L pre-training", disable=rank != 0):
        for group in opt.param_groups:
            group["lr"] = peak_lr * rotation.lr_multiplier(step, steps)
        x, idx = next(batches)
        x, y = x.to(device, non_blocking=True), labels[idx].to(device)

        # Eq. 2: L_R over all images in all 4 rotations + gamma * CE over the labeled ones
        if labeled_only:
            loss_R = torch.zeros((), device=device)
            loss_CE = class_loss(model(x, rotate=False), y)
            loss = loss_CE
        else:
            rot_logits, class_logits = model(x)
            loss_R = rotation.rotation_loss(rot_logits, rotation.rotation_labels(len(x), device))
            loss_CE = class_loss(class_logits, y)
            loss = loss_R + gamma * loss_CE

        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        # One line every log_every steps (rank 0), losses averaged over the window
        window.append((loss_R.item(), loss_CE.item()))
        if log and rank == 0 and ((step + 1) % log_every == 0 or step == steps - 1):
            l_r, l_ce = (sum(v) / len(window) for v in zip(*window))
            log(f"step {step + 1:6d}/{steps} | L_R {l_r:.4f} | CE {l_ce:.4f} | "
                f"lr {opt.param_groups[0]['lr']:.4f}")
            window = []

    net.eval()
    return net.F, net.c_S2L


@torch.no_grad()
def _logits(F, clf, dataset, batch_size):
    features = rotation.extract_features(F, dataset, batch_size)
    device = next(clf.parameters()).device
    return clf.eval()(features.to(device)).cpu()


def predict_labels(F, clf, dataset, batch_size=256):
    """y_S2L = argmax c_S2L(F(x)) for every image of `dataset`, in its order (LongTensor)."""
    return _logits(F, clf, dataset, batch_size).argmax(1)


def evaluate(F, clf, dataset, batch_size=256):
    """(top-1, top-5) accuracy of c_S2L(F(x)) against the dataset's own labels."""
    logits = _logits(F, clf, dataset, batch_size)
    truth = torch.as_tensor(dataset.targets)
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = top == truth[:, None]
    return hits[:, 0].double().mean().item(), hits.any(1).double().mean().item()


def save_s2l(path, F, clf, meta):
    """F and c_S2L with what is needed to rebuild them (meta: arch, resolution, ...)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {**meta, "feat_dim": F.feat_dim, "num_classes": clf.out_features}
    state = {name: {k: v.cpu() for k, v in module.state_dict().items()}
             for name, module in (("F", F), ("clf", clf))}
    torch.save({**state, "meta": meta}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_s2l(path, resolution=None):
    """(F, c_S2L, meta) from `save_s2l`; a different `resolution` from the saved one is an
    error, since F's features and the classifier were learned at that size."""
    if not os.path.isfile(path):
        raise ValueError(f"no S2L model at {path!r}; pre-train one with "
                         f"`python semisup.py --data DIR --val DIR --out {path}`")
    state = torch.load(path, map_location="cpu", weights_only=True)
    meta = state["meta"]
    if resolution is not None and resolution != meta["resolution"]:
        raise ValueError(f"{path} was trained at resolution {meta['resolution']}, not "
                         f"{resolution}; pre-train S2L again with --resolution {resolution}")
    F = rotation.build_feature_extractor(meta["arch"], meta["resolution"])
    F.load_state_dict(state["F"])
    clf = nn.Linear(meta["feat_dim"], meta["num_classes"])
    clf.load_state_dict(state["clf"])
    return F.eval(), clf.eval(), meta


# ---------------------------------------------------------------------------------------------
# Command line: S2L (and the labeled-only baseline) on an ImageFolder, scored on validation.


def main(argv=None):
    parser = argparse.ArgumentParser(description="S2L pre-training of F and c_S2L (eq. 2)")
    parser.add_argument("--data", required=True, help="training ImageFolder directory")
    parser.add_argument("--val", required=True,
                        help="validation ImageFolder directory, for top-1/top-5 accuracy")
    parser.add_argument("--label-fraction", type=float, default=0.1,
                        help="share of each class's images that keep their label, in (0, 1] "
                             "(default 0.1)")
    parser.add_argument("--resolution", type=int, default=32,
                        help="image side in pixels (default 32)")
    parser.add_argument("--arch", default="resnet18", choices=sorted(rotation.ARCHS),
                        help="torchvision ResNet for F (default resnet18)")
    parser.add_argument("--steps", type=int, default=1000, help="SGD steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="source images per step, 1/4 labeled, each in 4 rotations "
                             "(default 64)")
    parser.add_argument("--lr", type=float, default=rotation.LR_PER_256,
                        help="peak learning rate per 256 source images (default 0.1)")
    parser.add_argument("--gamma", type=float, default=0.5,
                        help="weight of the cross-entropy in eq. 2 (paper: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset and training")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    parser.add_argument("--out", required=True, help="where to write F and c_S2L (.pt)")
    parser.add_argument("--baseline", action="store_true",
                        help="also train a labeled-only baseline with the same steps and batch")
    args = parser.parse_args(argv)
    for flag in ("resolution", "steps", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)

    # Data and the labeled subset
    try:
        train_set = rotation.image_folder(args.data, args.resolution, train=True)
        val_set = rotation.image_folder(args.val, args.resolution)
        labels = labeled_subset(train_set.targets, args.label_fraction, args.seed)
    except ValueError as err:
        raise SystemExit(str(err))
    print(f"{int((labels >= 0).sum())} of {len(labels)} training images labeled "
          f"({args.label_fraction:.1%} of each of {len(train_set.classes)} classes)")

    # S2L, then (optionally) the labeled-only baseline with the same steps and batch size
    runs = [("S2L", False)] + [("labeled-only", True)] * args.baseline
    for name, labeled_only in runs:
        try:
            F, clf = pretrain_s2l(train_set, labels, args.steps, args.batch_size, args.gamma,
                                  args.arch, args.resolution, args.lr, seed=args.seed,
                                  log=tqdm.write, log_every=args.log_every,
                                  workers=args.workers, labeled_only=labeled_only)
        except ValueError as err:
            raise SystemExit(str(err))
        top1, top5 = evaluate(F, clf, val_set)
        print(f"{name}: val top-1 {top1:.4f}, top-5 {top5:.4f} ({len(val_set)} images)")
        if not labeled_only:
            meta = {"arch": args.arch, "resolution": args.resolution, "steps": args.steps,
                    "batch_size": args.batch_size, "label_fraction": args.label_fraction,
                    "seed": args.seed, "gamma": args.gamma, "classes": train_set.classes,
                    "val_top1": top1, "val_top5": top5}
            save_s2l(args.out, F, clf, meta)
            print(f"wrote F and c_S2L to {args.out}")


if __name__ == "__main__":
    main()
