"""The command line: trains every method of the paper's Table 1 from one loop.

    python train.py --method s3gan_co                 # tiny preset: bundled photos, 32x32, CPU
    torchrun --nproc_per_node=8 train.py --method s3gan_co --preset imagenet128 \
        --data /path/to/imagenet/train               # the paper's configuration (sec. 4)

Each --method is one row of METHODS: which labels the real images carry, whether D has the
rotation loss (sec. 3.3) and the co-training head (sec. 3.2). The training step reads only
these ingredients, never the method name. Methods with pre-trained pieces (sec. 3.1) run their
stages first (rotation.py, cluster.py, semisup.py) and cache them in --out.

One code path from one CPU process to many nodes: without torchrun's environment the run is a
world of one. A run leaves config.json, log.jsonl, samples/ and ckpt.pt in --out, and running the
same command again resumes from ckpt.pt exactly.
"""
import argparse
import datetime
import hashlib
import json
import os
import signal
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import datasets, transforms
from torchvision.utils import save_image
from tqdm import tqdm

import biggan
import gan
import metrics

# --------------------------------------------------------------------------------------------
# The methods (DESIGN.md): real-image labels, rotation loss, co-training head.
#   labels: true      ground truth for every image
#           labeled   ground truth, and only the labeled fraction of images is used (BIGGAN-k%)
#           constant  one label for every image, projection removed
#           random    a fresh uniform label for every read
#           cluster   k-means cluster of F(x), F rotation pre-trained
#           s2l       argmax of the S2L classifier on F(x)
#           partial   ground truth for the labeled fraction, -1 (to be predicted) elsewhere

METHODS = {
    "biggan":          dict(labels="true"),
    "biggan_k":        dict(labels="labeled"),
    "single_label":    dict(labels="constant", project=False),
    "random_label":    dict(labels="random"),
    "clustering":      dict(labels="cluster"),
    "clustering_ss":   dict(labels="cluster", rotation=True, beta=1.0),
    "single_label_ss": dict(labels="constant", project=False, rotation=True, beta=1.0),
    "s2gan":           dict(labels="s2l"),
    "s3gan":           dict(labels="s2l", rotation=True, beta=0.5),
    "s2gan_co":        dict(labels="partial", cotrain=True),
    "s3gan_co":        dict(labels="partial", cotrain=True, rotation=True, beta=1.0),
}

# --------------------------------------------------------------------------------------------
# Presets: any flag overrides a preset value.

PRESETS = {
    # The bundled 10-class photos at 32x32 on a 2-core CPU in at most 15 minutes (about 9 for
    # biggan with bf16 units, 0.4 s per step; the pre-training stages add about 3 each).
    # ch 16 for 1200 steps gave clearly class-dependent rows where ch 32 for 400 steps, the
    # same time, did not.
    "tiny": dict(
        data="data/tiny-imagenet-10/train", resolution=32, ch=16, batch_size=32, steps=1200,
        lr_g=2e-4, lr_d=2e-4, d_steps=2, ema_decay=0.99, ema_start=600,
        standing_batches=16, sample_every=300, ckpt_every=300, log_every=20,
        rotated_fraction=2, pretrain_steps=500, pretrain_batch_size=32, clusters=50,
        f_arch="resnet18", workers=0),
    # The paper's configuration (sec. 4, PAPER.md sec. 3): batch 2048, 250k G steps, 2 D steps,
    # Adam(0, 0.999), EMA 0.9999 from step 40k, standing statistics over 204,800 samples.
    # Learning rates from compare_gan's biggan_imagenet128.gin; the BigGAN paper itself used
    # G 5e-5 and D 2e-4, and the S3GAN paper says "as Brock et al.".
    "imagenet128": dict(
        data=None, resolution=128, ch=96, batch_size=2048, steps=250_000,
        lr_g=1e-4, lr_d=5e-4, d_steps=2, ema_decay=0.9999, ema_start=40_000,
        standing_batches=3200, sample_every=5000, ckpt_every=2500, log_every=100,
        rotated_fraction=2, pretrain_steps=40_625, pretrain_batch_size=2048, clusters=50,
        f_arch="resnet50", workers=8),
}

# The paper's 256x256 run: the same settings at the larger resolution (z 140 comes with it).
PRESETS["imagenet256"] = dict(PRESETS["imagenet128"], resolution=256)

# A checkpoint resumes only under the same values of these; the others may change.
RUN_IDENTITY = ["method", "data", "resolution", "ch", "num_classes", "batch_size", "lr_g",
                "lr_d", "d_steps", "seed", "label_fraction", "alpha", "beta", "lam",
                "soft_labels", "rotated_fraction", "ema_decay", "ema_start", "clusters",
                "f_checkpoint", "f_arch", "pretrain_steps", "pretrain_batch_size"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults; a flag whose default comes from the preset shows the presets'."""

    def _get_help_string(self, action):
        key = action.dest
        if key in PRESETS["tiny"] and action.default is None:
            values = ", ".join(f"{name} {preset[key]}" for name, preset in PRESETS.items())
            return f"{action.help} (preset default: {values})"
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Train a GAN of the paper 'High-Fidelity Image Generation With Fewer Labels'.",
        formatter_class=HelpFormatter)
    add = p.add_argument
    add("--method", default="biggan", choices=list(METHODS), help="the paper's method (Table 1)")
    add("--preset", default="tiny", choices=list(PRESETS),
        help="base configuration: tiny (bundled data, CPU) or the paper's ImageNet runs")
    add("--data", help="folder of class folders (ImageFolder / ImageNet train/ layout); "
                       "preset default")
    add("--out", help="run folder for config, log, samples, checkpoint (default out/<method>)")
    add("--steps", type=int, help="generator steps (each after --d-steps D steps)")
    add("--batch-size", type=int, help="global batch of real images per D step")
    add("--resolution", type=int, help="image side in pixels: 32, 64, 128 or 256")
    add("--ch", type=int, help="channel multiplier of G and D (paper: 96)")
    add("--lr-g", type=float, help="Adam learning rate of G")
    add("--lr-d", type=float, help="Adam learning rate of D")
    add("--d-steps", type=int, help="D steps per G step (paper: 2)")
    add("--seed", type=int, default=0, help="seed of weights, noise, data order, label subset")
    add("--label-fraction", type=float, default=0.1,
        help="fraction k of labeled images per class, in (0, 1] (methods with partial labels)")
    add("--alpha", type=float, default=0.2, help="G's rotation loss weight (eq. 5)")
    add("--beta", type=float, help="D's rotation loss weight (eq. 4); default per method: "
                                   "0.5 for s3gan, 1.0 otherwise")
    add("--lam", type=float, default=1.0, help="co-training classification loss weight (eq. 3)")
    add("--soft-labels", action="store_true",
        help="co-training: softmax of the head instead of one-hot argmax for unlabeled reals")
    add("--rotated-fraction", type=int,
        help="n = per-process batch / this / 4 real and fake images are rotated")
    add("--ema-decay", type=float, help="decay of the EMA of G's weights")
    add("--ema-start", type=int, help="G step from which the EMA averages (before: copies G)")
    add("--standing-batches", type=int,
        help="batches of 64 used for the standing BatchNorm statistics before sampling")
    add("--sample-every", type=int, help="G steps between sample grids")
    add("--ckpt-every", type=int, help="G steps between checkpoints")
    add("--log-every", type=int, help="G steps between log lines")
    add("--pretrain-steps", type=int, help="SGD steps of each pre-training stage (F, S2L)")
    add("--pretrain-batch-size", type=int, help="batch of the pre-training stages")
    add("--clusters", type=int, help="k of k-means for the clustering methods (paper: 50)")
    add("--f-arch", help="torchvision ResNet used as feature extractor F")
    add("--f-checkpoint", help="a rotation pre-trained F (rotation.py) instead of training one")
    add("--workers", type=int, help="data loader worker processes")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"],
        help="where to train; auto: CUDA when there is a GPU")
    add("--accum", type=int, default=1,
        help="gradient accumulation: each process runs its batch as this many micro-batches")
    add("--amp", default="auto", choices=["auto", "none", "bf16"],
        help="bf16 autocast of the convolutions (spectral norm and losses stay float32); "
             "auto: bf16 on CUDA and on CPUs with native bf16 units, else none")
    add("--threads", type=int, help="CPU threads of torch (default: torch's choice)")
    add("--compile", action="store_true", help="torch.compile G and D")
    add("--eval-every", type=int, default=0,
        help="G steps between FID/IS (or FD_rot) evaluations of the EMA generator; 0: never")
    add("--eval-samples", type=int, default=10_000, help="generated images per evaluation")
    add("--eval-real", help="real images for the evaluation statistics (default: the 'val' "
                            "folder beside --data if there is one, else --data)")
    add("--eval-features", default="inception",
        help="inception (FID, IS), rotation (FD_rot in this run's rotation pre-trained F) or "
             "rotation:PATH (FD_rot in the F saved at PATH)")
    add("--inception-weights", help="local file of the TF-Inception weights for FID/IS "
                                    "(metrics.py says where it is downloaded from)")
    add("--dry-run", action="store_true",
        help="print the resolved configuration, parameter counts and pre-training stages, "
             "then exit without training")
    args = p.parse_args(argv)

    cfg = dict(PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None or key not in cfg:
            cfg[key] = value
    if cfg["beta"] is None:
        cfg["beta"] = METHODS[cfg["method"]].get("beta", 1.0)
    if cfg["out"] is None:
        cfg["out"] = os.path.join("out", cfg["method"])
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Clear messages for bad values, before anything is built."""
    if cfg["data"] is None:
        raise SystemExit(f"error: --preset {cfg['preset']} needs --data, the ImageNet train/ "
                         "folder (one sub-folder of images per class)")
    if cfg["resolution"] not in biggan.ARCH:
        raise SystemExit(f"error: --resolution {cfg['resolution']} is not supported: "
                         f"use one of {sorted(biggan.ARCH)}")
    for key in ("batch_size", "steps", "d_steps", "ch", "sample_every", "ckpt_every",
                "log_every", "pretrain_steps", "standing_batches"):
        if cfg[key] < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be at least 1, "
                             f"got {cfg[key]}")
    if not 0 < cfg["label_fraction"] <= 1:
        raise SystemExit(f"error: --label-fraction must be in (0, 1], got {cfg['label_fraction']}")
    if cfg["workers"] < 0:
        raise SystemExit("error: --workers must be 0 or more")
    if cfg["threads"] is not None and cfg["threads"] < 1:
        raise SystemExit(f"error: --threads must be at least 1, got {cfg['threads']}")
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA GPU here; use "
                         "--device cpu (or auto)")
    if cfg["accum"] < 1 or cfg["eval_every"] < 0 or cfg["eval_samples"] < 2:
        raise SystemExit("error: --accum must be at least 1, --eval-every at least 0 and "
                         "--eval-samples at least 2")
    if cfg["eval_real"] is None:
        val = os.path.join(os.path.dirname(os.path.abspath(cfg["data"])), "val")
        cfg["eval_real"] = val if os.path.isdir(val) else cfg["data"]
    if cfg["eval_every"] and not os.path.isdir(cfg["eval_real"]):
        raise SystemExit(f"error: --eval-real {cfg['eval_real']} is not a folder; the "
                         "evaluation needs real images (one sub-folder per class)")


# --------------------------------------------------------------------------------------------
# Processes: one code path for a world of one and for torchrun.

def setup_world(device_flag):
    """(rank, world_size, device) from torchrun's environment, or a world of one."""
    cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag == "cuda"
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    # NCCL carries only CUDA tensors; gloo takes the CPU ones (the stop flag, the log sums,
    # k-means on CPU features, object gathers). Rank 0 alone samples, evaluates and saves
    # while the others wait at a barrier: allow that an hour rather than NCCL's 10 minutes.
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(hours=1))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def resolve_amp(amp, device):
    """bf16 where the hardware computes it natively (about 2x faster on such a CPU)."""
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if amp == "bf16" and not native:
        raise SystemExit(f"error: --amp bf16: this {device.type} has no native bf16 "
                         "arithmetic; use --amp none")
    return "bf16" if amp == "bf16" or (amp == "auto" and native) else "none"


def barrier(world):
    if world > 1:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Data: any folder of class folders, centre-cropped and resized; small sets are decoded once.

class RealImages(Dataset):
    """Images of an ImageFolder as float tensors in [-1, 1], returned with their index.

    A set whose decoded pixels fit in PRELOAD_BYTES is decoded once into memory (the tiny preset
    would otherwise spend most of a CPU step decoding PNGs). Unreadable or truncated files are
    skipped with a warning that names them.
    """
    PRELOAD_BYTES = 2 << 30

    def __init__(self, root, resolution, show_progress=True):
        folder = image_folder(root)
        self.root, self.classes = root, folder.classes
        self.transform = transforms.Compose([
            transforms.Resize(resolution, antialias=True), transforms.CenterCrop(resolution),
            transforms.PILToTensor()])
        self.samples = folder.samples
        self.pixels = None
        if len(self.samples) * 3 * resolution ** 2 <= self.PRELOAD_BYTES:
            self._preload(show_progress)
        self.targets = torch.tensor([t for _, t in self.samples])

    def _read(self, path):
        try:
            return self.transform(datasets.folder.default_loader(path))
        except (OSError, ValueError, SyntaxError) as err:
            warnings.warn(f"skipping unreadable image {path}: {err}")
            return None

    def _preload(self, show_progress):
        kept, pixels = [], []
        for path, target in tqdm(self.samples, desc="decoding images", leave=False,
                                 disable=not show_progress):
            img = self._read(path)
            if img is not None:
                kept.append((path, target))
                pixels.append(img)
        if not kept:
            raise SystemExit(f"error: no readable images in {self.root}")
        self.samples, self.pixels = kept, torch.stack(pixels)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if self.pixels is not None:
            img = self.pixels[i]
        else:
            img, tries = self._read(self.samples[i][0]), 1
            while img is None:      # an unreadable file: take the next one instead
                if tries == len(self.samples):
                    raise SystemExit(f"error: no readable images in {self.root}")
                i, tries = (i + 1) % len(self.samples), tries + 1
                img = self._read(self.samples[i][0])
        return img.float() / 127.5 - 1, i


def image_folder(root):
    """torchvision's ImageFolder, with its errors turned into messages that say what to fix."""
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {root} does not exist or is not a folder; point it to "
                         "a folder with one sub-folder of images per class")
    try:
        folder = datasets.ImageFolder(root)
    except FileNotFoundError as err:
        raise SystemExit(f"error: --data {root} holds no usable class folders ({err}); it needs "
                         "one sub-folder per class with .png/.jpg images inside")
    return folder


def ignore_stop_signals(worker_id=None):
    """Data loader workers leave SIGTERM and SIGUSR1 to the training process: a scheduler
    signals every process of the job, and a worker killed by it would crash the run before it
    saves. The training process shuts its workers down when it exits."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class Batches:
    """An endless, resumable stream of (images, indices) batches in a fixed order.

    Epoch e is DistributedSampler's permutation for (seed, e), so the order depends only on the
    number of batches already drawn: a resumed run skips exactly those and continues. One
    DataLoader serves the whole run, so its worker processes start once.
    """

    def __init__(self, dataset, indices, local_batch, world, rank, seed, workers, pin):
        self.subset = torch.utils.data.Subset(dataset, indices)
        self.sampler = DistributedSampler(self.subset, num_replicas=world, rank=rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // local_batch
        if self.per_epoch < 1:
            raise SystemExit(f"error: the data has {len(indices)} images, fewer than one batch "
                             f"of {local_batch * world}; lower --batch-size")
        self.local_batch, self.workers, self.pin = local_batch, workers, pin
        self.drawn, self.iterator = 0, None

    def skip_to(self, drawn):
        self.drawn, self.iterator = drawn, None

    def _order(self, drawn):
        """Subset positions from batch `drawn` on, epoch after epoch."""
        epoch, offset = divmod(drawn, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            yield from list(self.sampler)[offset * self.local_batch:
                                          self.per_epoch * self.local_batch]
            epoch, offset = epoch + 1, 0

    def __next__(self):
        if self.iterator is None:
            loader = DataLoader(self.subset, batch_size=self.local_batch,
                                sampler=self._order(self.drawn), num_workers=self.workers,
                                pin_memory=self.pin, worker_init_fn=ignore_stop_signals)
            self.iterator = iter(loader)
        self.drawn += 1
        return next(self.iterator)  # images and their indices in the full dataset


# --------------------------------------------------------------------------------------------
# Real-image labels for each method, with the pre-training stages they need (sec. 3.1).

def stage_path(cfg, name, *keys):
    """A cache file in --out named by what the stage's result depends on."""
    digest = hashlib.sha1(json.dumps([os.path.abspath(cfg["data"]), cfg["resolution"],
                                      cfg["seed"], *keys]).encode()).hexdigest()[:10]
    return os.path.join(cfg["out"], f"{name}-{digest}.pt")


def real_label_table(cfg, dataset, log, device=None):
    """(labels, used indices, number of classes, fake-label distribution or None for uniform).

    labels[i] is the label D is given for image i (-1: to be predicted by the co-training head).
    """
    kind = METHODS[cfg["method"]]["labels"]
    targets, K = dataset.targets, len(dataset.classes)
    everything = torch.arange(len(targets))
    if kind in ("true", "random"):
        return targets.clone(), everything, K, None
    if kind == "constant":
        return torch.zeros_like(targets), everything, 1, None
    if kind in ("labeled", "partial"):
        import semisup
        subset = semisup.labeled_subset(targets, cfg["label_fraction"], cfg["seed"])
        if kind == "labeled":
            used = (subset >= 0).nonzero().squeeze(1)
            return subset, used, K, None
        return subset, everything, K, None
    if kind == "cluster":
        labels = cluster_labels(cfg, dataset, log, device)
        return labels, everything, cfg["clusters"], empirical(labels, cfg["clusters"])
    if kind == "s2l":
        labels = s2l_labels(cfg, dataset, log, device)
        return labels, everything, K, empirical(labels, K)
    raise ValueError(kind)


def cached(path, compute):
    """Load a stage's result from --out, or compute it (on every process) and save it once."""
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    result = compute()
    if dist.is_initialized():
        # Every process takes rank 0's result: a network trained under DDP keeps per-process
        # BatchNorm running statistics, so its predictions can differ from rank to rank.
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint(path, result)
    if dist.is_initialized():
        dist.barrier()
    return result


def feature_extractor_path(cfg, dataset, log, device=None):
    """F pre-trained with the rotation loss (eq. 1): --f-checkpoint, or the cached file in --out,
    trained first if it is not there yet."""
    import rotation
    if cfg["f_checkpoint"]:
        return cfg["f_checkpoint"]
    path = stage_path(cfg, "F_rot", cfg["f_arch"], cfg["pretrain_steps"],
                      cfg["pretrain_batch_size"])
    if not os.path.exists(path):
        log(f"stage: rotation pre-training of F ({cfg['f_arch']}, {cfg['pretrain_steps']} "
            f"steps) -> {path}")
        F = rotation.pretrain_rotation(
            dataset, cfg["pretrain_steps"], cfg["pretrain_batch_size"], arch=cfg["f_arch"],
            resolution=cfg["resolution"], seed=cfg["seed"], log=log, workers=cfg["workers"],
            device=device)
        if not dist.is_initialized() or dist.get_rank() == 0:
            rotation.save_feature_extractor(F, path, dict(data=cfg["data"], seed=cfg["seed"]))
        if dist.is_initialized():
            dist.barrier()
    return path


def feature_extractor(cfg, dataset, log, device=None):
    import rotation
    return rotation.load_feature_extractor(feature_extractor_path(cfg, dataset, log, device),
                                           cfg["resolution"], device=device or "cpu")


def cluster_labels(cfg, dataset, log, device=None):
    """CLUSTERING (sec. 3.1): mini-batch k-means of F(x), one cluster id per image."""
    import cluster
    import rotation
    if cfg["f_checkpoint"]:     # a file re-trained in place must not reuse stale clusters
        info = os.stat(cfg["f_checkpoint"]) if os.path.isfile(cfg["f_checkpoint"]) else None
        key = [os.path.abspath(cfg["f_checkpoint"]), info and info.st_size,
               info and info.st_mtime_ns]
    else:
        key = [cfg["f_arch"], cfg["pretrain_steps"], cfg["pretrain_batch_size"]]
    if not 2 <= cfg["clusters"] <= len(dataset):
        raise ValueError(f"--clusters must be between 2 and the number of images "
                         f"({len(dataset)}); got {cfg['clusters']}")

    def compute():
        F = feature_extractor(cfg, dataset, log, device)
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # Each process extracts and clusters its own contiguous shard (sums all-reduced).
        shard = torch.arange(len(dataset)).tensor_split(world)[rank]
        features = rotation.extract_features(F, torch.utils.data.Subset(dataset, shard))
        _, assign = cluster.minibatch_kmeans(features, cfg["clusters"], cfg["seed"])
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, assign)
            assign = torch.cat(parts)
        truth = dataset.targets
        log(f"stage: {cfg['clusters']} clusters, purity {cluster.purity(assign, truth):.3f}, "
            f"NMI {cluster.nmi(assign, truth):.3f} against the true classes")
        return dict(labels=assign, purity=cluster.purity(assign, truth),
                    nmi=cluster.nmi(assign, truth))

    return cached(stage_path(cfg, "clusters", key, cfg["clusters"]), compute)["labels"]


def s2l_labels(cfg, dataset, log, device=None):
    """S2GAN (sec. 3.1, eq. 2): F and c_S2L trained on L_R + gamma CE, then y = c_S2L(F(x)).

    Every image, labeled or not, gets the classifier's label, as the paper's formula reads.
    """
    import semisup
    subset = semisup.labeled_subset(dataset.targets, cfg["label_fraction"], cfg["seed"])

    def compute():
        log(f"stage: S2L pre-training ({cfg['f_arch']}, {cfg['pretrain_steps']} steps, "
            f"{int((subset >= 0).sum())} labeled images)")
        F, clf = semisup.pretrain_s2l(
            dataset, subset, cfg["pretrain_steps"], cfg["pretrain_batch_size"],
            arch=cfg["f_arch"], resolution=cfg["resolution"], seed=cfg["seed"], log=log,
            workers=cfg["workers"], device=device)
        labels = semisup.predict_labels(F, clf, dataset)
        unlabeled = subset < 0
        accuracy = (labels == dataset.targets)[unlabeled].float().mean().item()
        log(f"stage: S2L labels agree with the true class on {accuracy:.3f} of the "
            "unlabeled images")
        return dict(labels=labels, accuracy_unlabeled=accuracy)

    key = [cfg["label_fraction"], cfg["f_arch"], cfg["pretrain_steps"],
           cfg["pretrain_batch_size"]]
    return cached(stage_path(cfg, "s2l", key), compute)["labels"]


def empirical(labels, K):
    """p^(y): fake labels for inferred labels follow their empirical distribution."""
    return torch.bincount(labels[labels >= 0], minlength=K).float() / (labels >= 0).sum()


def label_sampler(K, probs):
    if probs is None:
        return lambda n, gen: torch.randint(K, (n,), generator=gen)
    return lambda n, gen: torch.multinomial(probs, n, replacement=True, generator=gen)


# --------------------------------------------------------------------------------------------
# Outputs: log lines, sample grids, checkpoints written atomically.

LOG_KEYS = ["step", "loss_d", "loss_g", "loss_hinge_d", "loss_hinge_g", "loss_rot_d",
            "loss_rot_g", "loss_cls", "acc_rot_real", "acc_rot_fake", "acc_cls",
            "acc_labels", "img_per_s", "elapsed_s"]


METRIC_KEYS = ["FID", "IS", "FD_rot"]


def write_log(path, record):
    line = {k: record[k] for k in LOG_KEYS[:1] + METRIC_KEYS + LOG_KEYS[1:] if k in record}
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
    return "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in line.items())


def sample_grid(G_ema, cfg, K, probs, path, device):
    """EMA generator, standing BN statistics, fixed noise; one row per class (at most 16)."""
    gan.standing_stats(G_ema, cfg["standing_batches"], 64, label_sampler(K, probs),
                       seed=cfg["seed"])
    rows = torch.linspace(0, K - 1, min(K, 16)).round().long()
    cols = 8
    gen = torch.Generator().manual_seed(cfg["seed"] + 12345)
    z = torch.randn(len(rows) * cols, G_ema.z_dim, generator=gen).to(device)
    with torch.no_grad():
        images = G_ema(z, rows.repeat_interleave(cols).to(device))
    save_image(images * 0.5 + 0.5, path, nrow=cols, padding=1)


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)       # atomic: a crash leaves the old or the new file, never half


def check_resume(saved, cfg):
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {cfg.get(k)!r}"
            for k in RUN_IDENTITY if saved.get(k) != cfg.get(k)]
    if diff:
        raise SystemExit(f"error: {cfg['out']} holds a checkpoint of a different run ("
                         + "; ".join(diff) + "). Use another --out, or the same settings "
                         "to resume.")


# --------------------------------------------------------------------------------------------

def eval_feature_space(cfg, dataset, log, device=None, load=True):
    """The feature network of --eval-every, loaded once on the evaluating process (missing
    Inception weights stop the run here, before training)."""
    spec = cfg["eval_features"]
    try:
        if spec == "rotation":      # this run's own rotation pre-trained F (trained if needed)
            spec = "rotation:" + feature_extractor_path(cfg, dataset, log, device)
        if not load:
            return None
        return metrics.load_feature_space(spec, cfg["resolution"], cfg["inception_weights"])
    except ValueError as err:
        raise SystemExit(f"error: {err}")


def plot_log(log_path, png_path):
    """Loss curves and metrics over G steps, for looking at rather than reading JSON."""
    if not os.path.exists(log_path):
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path) as f:
        records = [json.loads(line) for line in f]
    keys = [k for k in LOG_KEYS + METRIC_KEYS
            if k.startswith(("loss", "acc")) or k in METRIC_KEYS]
    keys = [k for k in keys if any(k in r for r in records)]
    # One panel per kind of number that the run has: losses, accuracies, metrics
    panels = {}
    for k in keys:
        title = ("losses" if k.startswith("loss") else "accuracies" if k.startswith("acc")
                 else "FID / IS / FD_rot")
        panels.setdefault(title, []).append(k)
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, panel_keys) in zip(axes[0], panels.items()):
        for k in panel_keys:
            points = [(r["step"], r[k]) for r in records if k in r]
            # The parts of a loss dashed over its solid total: a run without extra terms
            # logs a hinge part equal to the total, which a solid line would hide
            part = k.startswith("loss") and k not in ("loss_d", "loss_g")
            ax.plot(*zip(*points), label=k, marker="." if len(points) < 30 else None,
                    linestyle="--" if part else "-", linewidth=1 if part else 2)
        ax.set_title(title)
        ax.set_xlabel("G step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def unwrap(model):
    """The plain module under torch.compile's and DDP's wrappers: its state dict has the plain
    names, and the G step calls D through it so that D's DDP reducer never sees that pass."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DDP) else model


def preflight(cfg, targets, world=1):
    """The checks that need the data or the method, shared by a run and --dry-run, before
    anything is trained: per-process batch, rotated fraction, label subset, clusters, F.

    Returns n, the number of rotated real (and fake) images per micro-batch (0: no rotation).
    """
    if cfg["batch_size"] % world:
        raise SystemExit(f"error: --batch-size {cfg['batch_size']} does not divide over "
                         f"{world} processes; use a multiple of {world}")
    local_batch = cfg["batch_size"] // world
    if local_batch % cfg["accum"]:
        raise SystemExit(f"error: the per-process batch {local_batch} does not split into "
                         f"--accum {cfg['accum']} micro-batches; use a divisor of it")
    micro, method = local_batch // cfg["accum"], METHODS[cfg["method"]]
    n = 0
    if method.get("rotation"):
        import rotation
        try:
            n = rotation.rotated_count(micro, cfg["rotated_fraction"])
        except ValueError as err:       # name where the per-process batch size comes from
            raise SystemExit(f"error: {err} (batch size {micro} per process: --batch-size "
                             f"{cfg['batch_size']} over {world} process(es) and --accum "
                             f"{cfg['accum']} micro-batches)")
    try:
        if method["labels"] in ("labeled", "partial", "s2l"):
            import semisup
            semisup.labeled_subset(targets, cfg["label_fraction"], cfg["seed"])
        if method["labels"] == "cluster":
            if not 2 <= cfg["clusters"] <= len(targets):
                raise ValueError(f"--clusters must be between 2 and the number of images "
                                 f"({len(targets)}); got {cfg['clusters']}")
            if cfg["f_checkpoint"]:
                import rotation
                rotation.load_feature_extractor(cfg["f_checkpoint"], cfg["resolution"])
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    return n


def dry_run(cfg):
    """--dry-run: what the command would do, without doing it."""
    folder = image_folder(cfg["data"])
    preflight(cfg, folder.targets)
    kind = METHODS[cfg["method"]]["labels"]
    K = {"constant": 1, "cluster": cfg["clusters"]}.get(kind, len(folder.classes))
    cfg = dict(cfg, num_classes=K)
    with torch.device("meta"):
        G, D = biggan.build_models(cfg)
        ing = gan.Ingredients(**{k: v for k, v in METHODS[cfg["method"]].items()
                                 if k != "labels"})
        D = gan.DiscriminatorWithHeads(D, ing)
    stages = []
    if kind == "cluster":
        if not cfg["f_checkpoint"]:
            stages.append(f"rotation pre-training of F ({cfg['f_arch']}, "
                          f"{cfg['pretrain_steps']} steps of {cfg['pretrain_batch_size']} "
                          "images x 4 rotations)")
        stages.append(f"mini-batch k-means of F(x) into {cfg['clusters']} clusters")
    if kind == "s2l":
        stages.append(f"S2L pre-training of F and c_S2L ({cfg['f_arch']}, "
                      f"{cfg['pretrain_steps']} steps, {cfg['label_fraction']:.0%} labels), "
                      "then every image labeled by c_S2L")
    print(json.dumps(cfg, indent=2))
    print(f"data: {len(folder.samples)} images in {len(folder.classes)} class folders; "
          f"D sees {K} classes")
    print(f"G: {biggan.count_parameters(G):,} parameters; D with its heads: "
          f"{biggan.count_parameters(D):,}")
    print("pre-training stages: " + ("; ".join(stages) if stages else "none"))
    print(f"cached stages are kept in {cfg['out']}; nothing was trained (--dry-run)")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg["dry_run"]:
        return dry_run(cfg)
    rank, world, device = setup_world(cfg["device"])
    is_main = rank == 0

    def log(msg):
        if is_main:
            tqdm.write(msg)

    # Per-process batch: the global batch is split across processes, then into --accum parts.
    micro = cfg["batch_size"] // world // cfg["accum"]
    cfg["amp"] = resolve_amp(cfg["amp"], device)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])

    # Data and the labels this method gives D for real images.
    dataset = RealImages(cfg["data"], cfg["resolution"], show_progress=is_main)
    rotated_n = preflight(cfg, dataset.targets, world)
    os.makedirs(os.path.join(cfg["out"], "samples"), exist_ok=True)
    try:
        labels, used, K, probs = real_label_table(cfg, dataset, log, device)
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    cfg["num_classes"] = K
    ing = gan.Ingredients(**{k: v for k, v in METHODS[cfg["method"]].items() if k != "labels"})
    ing.alpha, ing.beta, ing.lam, ing.soft_labels = (cfg["alpha"], cfg["beta"], cfg["lam"],
                                                     cfg["soft_labels"])
    ing.rotated_n = rotated_n
    random_labels = METHODS[cfg["method"]]["labels"] == "random"
    # S2L labels every image; the log says how often they are right on the unlabeled ones
    s2l_unlabeled = None
    if METHODS[cfg["method"]]["labels"] == "s2l":
        import semisup
        s2l_unlabeled = semisup.labeled_subset(dataset.targets, cfg["label_fraction"],
                                               cfg["seed"]) < 0

    # Models: identical initial weights on every process; per-process noise streams.
    torch.manual_seed(cfg["seed"])
    G, D = biggan.build_models(cfg)
    D = gan.DiscriminatorWithHeads(D, ing)
    G_ema = gan.make_ema(G)
    # channels_last: the layout the CPU and GPU convolution kernels prefer (1.2-1.3x on CPU).
    G, D, G_ema = (m.to(device, memory_format=torch.channels_last) for m in (G, D, G_ema))
    adam = dict(betas=(0.0, 0.999), eps=1e-6, foreach=True)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg["lr_g"], **adam)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg["lr_d"], **adam)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + rank)
    sample_labels = label_sampler(K, probs)

    # Resume exactly where the last checkpoint left off.
    ckpt_path, step = os.path.join(cfg["out"], "ckpt.pt"), 0
    if os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        check_resume(ckpt["config"], cfg)
        if not torch.equal(ckpt["labels"].cpu(), labels.cpu()):
            raise SystemExit(f"error: the real-image labels differ from those {ckpt_path} was "
                             "trained with (a pre-training stage or --f-checkpoint file "
                             "changed?); use another --out to train on the new labels")
        G.load_state_dict(ckpt["G"])
        D.load_state_dict(ckpt["D"])
        G_ema.load_state_dict(ckpt["G_ema"])
        opt_G.load_state_dict(ckpt["opt_G"])
        opt_D.load_state_dict(ckpt["opt_D"])
        step = ckpt["step"]
        if len(ckpt["rng"]["gen"]) == world:
            gen.set_state(ckpt["rng"]["gen"][rank])
        else:   # another world size: fresh, still reproducible, noise streams
            gen.manual_seed(cfg["seed"] * 1000 + rank + 7919 * step)
        log(f"resumed from {ckpt_path} at step {step}")
    elif is_main:
        with open(os.path.join(cfg["out"], "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    if world > 1:
        if device.type == "cuda":
            G = nn.SyncBatchNorm.convert_sync_batchnorm(G)
        else:
            log("note: a CPU world has no SyncBatchNorm kernel; G's BatchNorm statistics stay "
                "per process")
        G = DDP(G, device_ids=[device.index] if device.type == "cuda" else None)
        D = DDP(D, device_ids=[device.index] if device.type == "cuda" else None)

    batches = Batches(dataset, used, micro, world, rank, cfg["seed"], cfg["workers"],
                      pin=device.type == "cuda")
    batches.skip_to(step * cfg["d_steps"] * cfg["accum"])
    z_dim = G_ema.z_dim
    if cfg["compile"]:
        G, D = torch.compile(G), torch.compile(D)

    def real_batch():
        real, index = next(batches)
        real_labels = (torch.randint(K, (micro,), generator=gen) if random_labels
                       else labels[index])
        real = real.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        unlabeled = (real_labels < 0 if s2l_unlabeled is None else s2l_unlabeled[index])
        return (real, real_labels.to(device), dataset.targets[index].to(device),
                unlabeled.to(device))

    def fake_batch():
        return (torch.randn(micro, z_dim, generator=gen).to(device),
                sample_labels(micro, gen).to(device))

    def checkpoint(standing=True):
        gens = [None] * world
        if world > 1:
            dist.all_gather_object(gens, gen.get_state())
        else:
            gens = [gen.get_state()]
        if is_main and standing:
            # The saved EMA generator carries standing statistics, ready to sample from
            # (skipped when a signal asks to stop: the scheduler's grace period is short).
            gan.standing_stats(G_ema, cfg["standing_batches"], 64, sample_labels, cfg["seed"])
        if is_main:
            save_checkpoint(ckpt_path, dict(
                config=cfg, step=step, G=unwrap(G).state_dict(), D=unwrap(D).state_dict(),
                G_ema=G_ema.state_dict(), opt_G=opt_G.state_dict(), opt_D=opt_D.state_dict(),
                labels=labels, rng=dict(gen=gens, torch=torch.get_rng_state())))
        barrier(world)

    def samples():
        if is_main:
            sample_grid(G_ema, cfg, K, probs,
                        os.path.join(cfg["out"], "samples", f"step{step:07d}.png"), device)
            plot_log(log_path, os.path.join(cfg["out"], "samples", "curves.png"))
        barrier(world)

    def evaluation():
        if is_main:
            try:
                scores = metrics.evaluate(
                    G_ema, K, cfg["eval_real"], feature_space=space,
                    num_samples=cfg["eval_samples"], fake_sets=1, batch_size=64,
                    standing_batches=cfg["standing_batches"], seed=cfg["seed"],
                    device=device, progress=False)
            except ValueError as err:
                raise SystemExit(f"error: the evaluation at step {step} failed: {err}. The "
                                 f"checkpoint of step {step} is saved in {cfg['out']}; "
                                 "score it with metrics.py --ckpt, or fix --eval-real and "
                                 "run again to resume") from None
            name = "FID" if "FID" in scores else "FD_rot"
            record = {"step": step, name: round(scores[name], 3)}
            if "IS" in scores:
                record["IS"] = round(scores["IS"], 3)
            tqdm.write(write_log(log_path, record))
            plot_log(log_path, os.path.join(cfg["out"], "samples", "curves.png"))
        barrier(world)

    # A preempted job (SIGTERM from the scheduler, or SIGUSR1) saves and exits cleanly.
    stop = torch.zeros(1)
    previous = {sig: signal.signal(sig, lambda *_: stop.fill_(1))
                for sig in (signal.SIGTERM, signal.SIGUSR1)}

    log(f"{cfg['method']}: {world} process(es) on {device}, {len(used)} images, {K} classes, "
        f"G {biggan.count_parameters(unwrap(G)):,} / D {biggan.count_parameters(unwrap(D)):,} "
        f"parameters, batch {cfg['batch_size']} ({cfg['accum']} x {micro} per process), "
        f"{cfg['steps']} steps -> {cfg['out']}")
    log_path = os.path.join(cfg["out"], "log.jsonl")
    space = (eval_feature_space(cfg, dataset, log, device, load=is_main) if cfg["eval_every"]
             else None)
    if step == 0:
        samples()

    # The loop: d_steps D steps, then one G step, then the EMA; log, sample, evaluate, save.
    bar = tqdm(total=cfg["steps"], initial=step, disable=not is_main, desc=cfg["method"])
    t_start, t_log, step_log, sums = time.time(), time.time(), step, {}
    while step < cfg["steps"]:
        for _ in range(cfg["d_steps"]):
            reals = [real_batch() for _ in range(cfg["accum"])]
            fakes = [fake_batch() for _ in range(cfg["accum"])]
            results = gan.d_step(G, D, opt_D, [r[:2] + f for r, f in zip(reals, fakes)], ing,
                                 amp=cfg["amp"] == "bf16")
            for (out, parts), (_, real_labels, truth, unlabeled) in zip(results, reals):
                accumulate(sums, parts, out, real_labels, truth, unlabeled, ing)

        fakes = [fake_batch() for _ in range(cfg["accum"])]
        for out, parts in gan.g_step(G, unwrap(D), opt_G, fakes, ing, amp=cfg["amp"] == "bf16"):
            accumulate(sums, parts, out, None, None, None, ing)
        step += 1
        gan.ema_update(G_ema, unwrap(G), step, cfg["ema_decay"], cfg["ema_start"])
        bar.update(1)

        if step % cfg["log_every"] == 0 or step == cfg["steps"]:
            record = average(sums, world)
            now = time.time()
            record.update(step=step, elapsed_s=round(now - t_start, 1), img_per_s=round(
                (step - step_log) * cfg["d_steps"] * cfg["batch_size"] / (now - t_log), 2))
            if is_main:
                bar.set_postfix(d=f"{record['loss_d']:.3f}", g=f"{record['loss_g']:.3f}")
                tqdm.write(write_log(log_path, record))
            t_log, step_log, sums = now, step, {}
        if step % cfg["sample_every"] == 0 or step == cfg["steps"]:
            samples()
        if world > 1:
            dist.all_reduce(stop)       # every process stops at the same step
        if step % cfg["ckpt_every"] == 0 or step == cfg["steps"] or stop.item():
            checkpoint(standing=not stop.item())
        if stop.item():
            log(f"stopped by a signal at step {step}; checkpoint saved, run again to resume")
            break
        # After the checkpoint: an evaluation that fails loses no training
        if cfg["eval_every"] and (step % cfg["eval_every"] == 0 or step == cfg["steps"]):
            evaluation()
    bar.close()
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if world > 1:
        dist.destroy_process_group()
    return cfg


def accumulate(sums, parts, out, real_labels, true_labels, unlabeled, ing):
    """Running sums of the losses and accuracies for the next log line (no host syncs).

    unlabeled marks the real rows outside the labeled subset: for co-training, those the head
    labels; for S2L, those whose label is the pre-trained classifier's guess alone.
    """
    values = {k: v.detach() for k, v in parts.items()}
    if "loss_hinge_d" in parts:
        values["loss_d"] = sum(values.values())
        if ing.rotation:
            values["acc_rot_real"] = rotation_hits(out["real_rot_logits"], ing.rotated_n)
        # How often the label D is given for an unlabeled image is its true class.
        if ing.cotrain:
            values["acc_cls"] = (out["cls_logits"].argmax(1) == real_labels)[~unlabeled]
            values["acc_labels"] = (out["real_y"].argmax(1) == true_labels)[unlabeled]
        else:   # empty (and left out of the log) unless the labels are S2L's
            values["acc_labels"] = (real_labels == true_labels)[unlabeled]
    else:
        values["loss_g"] = sum(values.values())
        if ing.rotation:
            values["acc_rot_fake"] = rotation_hits(out["fake_rot_logits"], ing.rotated_n)
    for k, v in values.items():
        v = v.float()
        total, count = sums.get(k, (0.0, 0))
        sums[k] = (total + v.sum(), count + v.numel())


def rotation_hits(logits, n):
    import rotation
    return logits.argmax(1) == rotation.rotation_labels(n, device=logits.device)


def average(sums, world):
    """Means of the running sums, over steps and (all-reduced) over processes."""
    keys = sorted(sums)
    totals = torch.stack([torch.as_tensor(sums[k][0], dtype=torch.float32) for k in keys])
    counts = torch.tensor([float(sums[k][1]) for k in keys])
    if world > 1:
        both = torch.cat([totals.cpu(), counts])
        dist.all_reduce(both)
        totals, counts = both[:len(keys)], both[len(keys):]
    return {k: round(float(t) / max(float(c), 1.0), 4) for k, t, c in
            zip(keys, totals.cpu(), counts) if c > 0}


if __name__ == "__main__":
    main()
