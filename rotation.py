"""Rotation self-supervision (paper sec. 3.1 eq. 1 and sec. 3.3 eq. 4-5; Gidaris et al. 2018).

A network that can tell by how much an image was rotated (0, 90, 180 or 270 degrees) has to
recognise objects and their canonical orientation, so the rotation task gives useful features
and a useful training signal without labels. The paper uses it twice, and so does this file.

1. During GAN training (sec. 3.3, S3GAN, S3GAN-CO and the "(SS)" variants). A linear head c_R on
   the discriminator's features h = D~(x) predicts the rotation r in R = {0, 90, 180, 270}:

       L_D += -beta/|R|  sum_r E_{x ~ p_data}  log p(c_R(D~(x^r)) = r)            (eq. 4)
       L_G += -alpha/|R| sum_r E_{(z,y) ~ p^}  log p(c_R(D~(G(z, y)^r)) = r)      (eq. 5)

   The batching is the official code's (compare_gan `s3gan.py`, `merge_with_rotation_data`):
   with bs real and bs fake images and n = bs // rotated_fraction // 4, only the LAST n real and
   the LAST n fake images are rotated, by 90, 180 and 270 degrees, and D sees one batch

       [ real (bs) | real_rot (3n) | fake (bs) | fake_rot (3n) ]        2 bs + 6 n rows

   The hinge loss reads the first bs rows of each half. The rotation loss reads the last 4n rows
   of each half, which are the n unrotated originals followed by their 90, 180 and 270 degree
   copies. That block order is [r=0]*n + [r=1]*n + [r=2]*n + [r=3]*n, so the labels are
   `arange(4).repeat_interleave(n)`. `arange(4).repeat(n)` = [0, 1, 2, 3, 0, 1, ...] would pair
   almost every row with a wrong rotation; a public PyTorch port has exactly this bug.
   `torch.rot90(x, k, dims=(2, 3))` rotates counter-clockwise like `np.rot90` and gives the same
   images as the official `utils.rotate_images` for k = 1, 2, 3.

2. Pre-training a feature extractor F (sec. 3.1, eq. 1; used by CLUSTERING and, with eq. 2, by
   S2GAN/S3GAN in semisup.py). F and a linear 4-way head c_R minimise

       L_R(F, c_R) = -1/|R| sum_r E_{x ~ p_data} log p(c_R(F(x^r)) = r)           (eq. 1)

   with every image of a batch present in all four rotations. The recipe is the large-batch one
   the paper cites (sec. 4; Goyal et al. 2017; Kolesnikov et al. 2019): SGD with momentum 0.9,
   weight decay 1e-4, learning rate 0.1 per 256 images, linear warm-up over the first 5/65 of
   training and x0.1 decays at 45/65 and 55/65. F is a torchvision ResNet whose final fc is an
   identity; the paper's ResNet-50 v2 x16 is out of reach here, so `resnet50` stands in for it
   at ImageNet scale and `resnet18` serves the tiny preset. On CUDA the forward pass runs in
   bfloat16 autocast; under torchrun each process takes its share of the batch and DDP averages
   the gradients.

Run `python rotation.py --data data/tiny-imagenet-10/train --val data/tiny-imagenet-10/val
--resolution 32 --steps 500 --batch-size 32 --out out/F_rot.pt` to pre-train F on a CPU: about
3 minutes on 2 cores, ending near 42% rotation accuracy on val (chance: 25%).
"""

import argparse
import os
import pickle
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as nnf
import torchvision
from torchvision import transforms
from tqdm import tqdm

import biggan

NUM_ROTATIONS = 4  # |R|: 0, 90, 180 and 270 degrees

# Kolesnikov et al. 2019 / Goyal et al. 2017 recipe, as fractions of the paper's 65 epochs
WARMUP_FRACTION = 5 / 65
DECAY_FRACTIONS = (45 / 65, 55 / 65)
LR_PER_256 = 0.1

# name -> (torchvision constructor, CIFAR stem?); see build_feature_extractor
ARCHS = {
    "resnet18": (torchvision.models.resnet18, False),
    "resnet34": (torchvision.models.resnet34, False),
    "resnet50": (torchvision.models.resnet50, False),
    "resnet18_cifar": (torchvision.models.resnet18, True),
}


# ---------------------------------------------------------------------------------------------
# GAN-time self-supervision (sec. 3.3, eq. 4-5), batched as in the official code.


def rotated_count(batch_size, rotated_fraction):
    """n, the number of real (and of fake) images whose rotations D sees per step.

    compare_gan: rotated_bs = bs // rotated_batch_fraction, n = rotated_bs // 4. We ask for exact
    division so that a typo cannot silently shrink the rotation batch.
    """
    exact = (isinstance(rotated_fraction, int) and rotated_fraction >= 1
             and batch_size % (NUM_ROTATIONS * rotated_fraction) == 0)
    if not exact:
        valid = [f for f in range(1, batch_size + 1) if batch_size % (NUM_ROTATIONS * f) == 0]
        raise ValueError(
            f"--rotated-fraction {rotated_fraction} does not fit batch size {batch_size}: "
            f"n = batch_size / rotated_fraction / 4 must be a whole number >= 1. Valid values "
            f"for batch size {batch_size}: {valid or 'none (use a batch size divisible by 4)'}")
    return batch_size // rotated_fraction // NUM_ROTATIONS


def rotate_last(x, n):
    """The last n images of x rotated by 90, 180 and 270 degrees: (3n, C, H, W), blocked."""
    if not 1 <= n <= x.shape[0]:
        raise ValueError(f"cannot rotate the last {n} images of a batch of {x.shape[0]}")
    last = x[-n:]
    return torch.cat([torch.rot90(last, k, dims=(2, 3)) for k in (1, 2, 3)])


def rotation_labels(n, device=None):
    """Rotation classes of the 4n rotation rows: [0]*n + [1]*n + [2]*n + [3]*n (blocked)."""
    return torch.arange(NUM_ROTATIONS, device=device).repeat_interleave(n)


def merge_with_rotations(real, fake, n):
    """D's input [real (bs), real_rot (3n), fake (bs), fake_rot (3n)], as compare_gan builds it."""
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} must match")
    return torch.cat([real, rotate_last(real, n), fake, rotate_last(fake, n)])


def merge_labels_with_rotations(y_real, y_fake, n):
    """Labels (indices or (B, K) rows) tiled like merge_with_rotations tiles the images.

    Each rotated block holds the same last n images, so its labels are the last n labels, and
    the three blocks repeat them whole (compare_gan's tf.tile of y[-n:]).
    """
    def tile(y):
        return torch.cat([y, y[-n:].repeat(3, *([1] * (y.dim() - 1)))])
    return torch.cat([tile(y_real), tile(y_fake)])


def split_rotations(out, bs, n):
    """Split D's output rows (logits, h, ...) into real, real_rot, fake, fake_rot.

    real_rot and fake_rot are the LAST 4n rows of each half, i.e. the n unrotated originals
    followed by their three rotated copies, in the order of rotation_labels(n).
    """
    half = bs + 3 * n
    if out.shape[0] != 2 * half:
        raise ValueError(f"expected 2*bs + 6*n = {2 * half} rows, got {out.shape[0]}")
    real, fake = out[:half], out[half:]
    return real[:bs], real[-4 * n:], fake[:bs], fake[-4 * n:]


class RotationHead(nn.Module):
    """c_R: a spectrally normalised linear map from D's features h to 4 rotation logits."""

    def __init__(self, feat_dim):
        super().__init__()
        self.linear = biggan.sn_linear(feat_dim, NUM_ROTATIONS)

    def forward(self, h):
        return self.linear(h)


def rotation_loss(logits, labels):
    """-1/|R| sum_r E log p(c_R(x^r) = r): the mean cross-entropy over the rotation rows."""
    return nnf.cross_entropy(logits, labels)


def rotation_accuracy(logits, labels):
    """Share of rows whose most likely rotation is the true one (a float, for logging)."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


# ---------------------------------------------------------------------------------------------
# Pre-training F with the rotation loss (sec. 3.1, eq. 1).


def rotate_all(x):
    """Every image in all four rotations: (4B, C, H, W) in the order of rotation_labels(B)."""
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(NUM_ROTATIONS)])


def image_folder(root, resolution, train=False):
    """An ImageFolder of RGB images, centre-cropped, resized to resolution, in [-1, 1].

    train=True adds a random horizontal flip, which keeps every rotation label correct.
    """
    if not os.path.isdir(root):
        raise ValueError(f"image folder {root!r} does not exist; pass a directory with one "
                         f"sub-folder of images per class (e.g. data/tiny-imagenet-10/train)")
    steps = [transforms.Resize(resolution), transforms.CenterCrop(resolution)]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    try:
        return torchvision.datasets.ImageFolder(root, transforms.Compose(steps),
                                                loader=_tolerant_loader)
    except FileNotFoundError as err:
        raise ValueError(f"no images found under {root!r}: {err}") from None


def _tolerant_loader(path):
    """An RGB image; an unreadable file becomes a grey one with a warning that names it, so
    that one bad file neither stops hours of pre-training nor shifts the images' order."""
    try:
        return torchvision.datasets.folder.default_loader(path)
    except (OSError, ValueError, SyntaxError) as err:
        warnings.warn(f"unreadable image {path} replaced by a grey image: {err}")
        from PIL import Image
        return Image.new("RGB", (64, 64), (128, 128, 128))


def build_feature_extractor(arch="resnet18", resolution=32):
    """F: a torchvision ResNet with its fc replaced by an identity, (B, 3, R, R) -> (B, feat_dim).

    resnet18/34/50 keep torchvision's ImageNet stem (7x7 stride-2 conv, max-pool) at every
    resolution, so at 32x32 layer1 runs at 8x8. resnet18_cifar swaps in the CIFAR stem (3x3
    stride-1 conv, no max-pool) and runs layer1 at 32x32, for ~25x the CPU time per image: too
    slow for the 2-core tiny preset, where a 3x3 stem that kept the max-pool (3x the cost) was
    no more accurate at rotation than resnet18 for the same CPU time. resolution is recorded
    with F so that loading can check it.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    constructor, cifar_stem = ARCHS[arch]
    F = constructor(weights=None)

    # CIFAR stem: keep the full resolution until layer1
    if cifar_stem:
        F.conv1 = nn.Conv2d(3, F.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(F.conv1.weight, mode="fan_out", nonlinearity="relu")
        F.maxpool = nn.Identity()

    # The pre-logits global-pool features are F(x); the rotation head lives outside F
    F.feat_dim = F.fc.in_features
    F.fc = nn.Identity()
    F.arch, F.resolution = arch, resolution
    return F


def lr_multiplier(step, steps):
    """Linear warm-up over the first 5/65 of the steps, then x0.1 at 45/65 and at 55/65."""
    warmup = max(1, round(WARMUP_FRACTION * steps))
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 ** sum(step >= round(f * steps) for f in DECAY_FRACTIONS)


def _world():
    """(distributed, rank, world size); a plain process is a world of one."""
    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


def _default_device():
    """The current CUDA device (under torchrun, the caller has set it to LOCAL_RANK), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _batches(dataset, per_rank_batch, seed, workers):
    """Endless shuffled batches, drop_last, sharded across ranks when torch.distributed is up."""
    _, rank, world = _world()
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, per_rank_batch, sampler=sampler,
                                         num_workers=workers, drop_last=True,
                                         pin_memory=torch.cuda.is_available())
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def pretrain_rotation(dataset, steps, batch_size, lr=LR_PER_256, arch="resnet18",
                      resolution=32, momentum=0.9, weight_decay=1e-4, seed=0, log=print,
                      log_every=50, workers=0, device=None, return_head=False):
    """Train F and a linear c_R with the rotation loss L_R (eq. 1); returns F (or (F, c_R)).

    batch_size counts source images (all ranks together); each enters in all 4 rotations, so
    the network sees 4 * batch_size images per step. lr is per 256 source images (Goyal et al.).
    Under torchrun each rank takes batch_size / world images and DDP averages the gradients.
    """
    distributed, rank, world = _world()
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} must divide by the {world} processes")
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one batch of "
                         f"{batch_size}; lower --batch-size")
    device = torch.device(device) if device else _default_device()
    torch.manual_seed(seed)

    # F, c_R and the optimiser of the recipe
    F = build_feature_extractor(arch, resolution).to(device)
    c_R = nn.Linear(F.feat_dim, NUM_ROTATIONS).to(device)
    model = nn.Sequential(F, c_R)
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    peak_lr = lr * batch_size / 256
    opt = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=momentum,
                          weight_decay=weight_decay)

    # The loop: every image in all four rotations, one SGD step per batch
    batches = _batches(dataset, batch_size // world, seed, workers)
    bar = tqdm(range(steps), desc="rotation pre-training", disable=rank != 0)
    start, seen = time.time(), 0
    window = torch.zeros(3, device=device)  # loss sum, correct rotations, rows since last log
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = peak_lr * lr_multiplier(step, steps)
        x, _ = next(batches)
        x_r = rotate_all(x.to(device, non_blocking=True))
        r = rotation_labels(x.shape[0], device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x_r)
        loss = rotation_loss(logits.float(), r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        # One log line every log_every steps, with loss and accuracy averaged since the last
        # line and over all ranks (single batches are noisy); no GPU sync in between
        seen += x_r.shape[0] * world
        window[0] += loss.detach() * r.numel()
        window[1] += (logits.detach().argmax(dim=1) == r).sum()
        window[2] += r.numel()
        if (step + 1) % log_every == 0 or step == steps - 1:
            if distributed:
                dist.all_reduce(window)
            loss_avg, acc_avg = (window[:2] / window[2]).tolist()
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=f"{acc_avg:.3f}")
            if rank == 0:
                log(f"step {step + 1:6d}/{steps} | loss {loss_avg:.4f} | rot acc {acc_avg:.3f}"
                    f" | lr {opt.param_groups[0]['lr']:.4f} | "
                    f"{seen / (time.time() - start):.0f} img/s")
            window.zero_()

    F.eval()
    return (F, c_R) if return_head else F


@torch.no_grad()
def evaluate_rotation(F, c_R, dataset, batch_size=256, workers=0):
    """Accuracy of c_R(F(x^r)) on every image of dataset in all four rotations (eval mode)."""
    device = next(F.parameters()).device
    was_training = F.training
    F.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers)
    correct = total = 0
    for x, _ in tqdm(loader, desc="rotation accuracy", leave=False):
        x_r = rotate_all(x.to(device))
        r = rotation_labels(x.shape[0], device)
        correct += (c_R(F(x_r)).argmax(dim=1) == r).sum().item()
        total += r.numel()
    F.train(was_training)
    return correct / total


@torch.no_grad()
def extract_features(F, dataset, batch_size=256, workers=0):
    """F(x) for every image of dataset in its order: a (N, feat_dim) float tensor on the CPU."""
    device = next(F.parameters()).device
    was_training = F.training
    F.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size, num_workers=workers)
    features = [F(x.to(device)).float().cpu() for x, _ in tqdm(loader, desc="features of F")]
    F.train(was_training)
    return torch.cat(features)


def save_feature_extractor(F, path, meta=None):
    """Write F's weights and metadata (arch, resolution, feat_dim, plus meta) atomically."""
    meta = {**(meta or {}), "arch": F.arch, "resolution": F.resolution,
            "feat_dim": F.feat_dim}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.cpu() for k, v in F.state_dict().items()}
    torch.save({"meta": meta, "state_dict": state}, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_feature_extractor(path, resolution=None, device="cpu"):
    """Rebuild F from save_feature_extractor's file, in eval mode; F.meta holds the metadata.

    Passing resolution checks that F was pre-trained at the resolution the caller will feed it.
    """
    if not os.path.isfile(path):
        raise ValueError(f"no feature extractor at {path!r}; pre-train one with "
                         f"`python rotation.py --data DIR --out {path}`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path} is not a file that torch can read ({err}); pass the F "
                         "written by `python rotation.py --out PATH`") from None
    if not isinstance(ckpt, dict) or not {"meta", "state_dict"} <= set(ckpt):
        raise ValueError(f"{path} is not a feature extractor written by rotation.py (an S2L "
                         "file of semisup.py or a train.py checkpoint?); pass the F written "
                         "by `python rotation.py --out PATH`")
    meta = ckpt["meta"]
    if resolution is not None and resolution != meta["resolution"]:
        raise ValueError(
            f"{path} was pre-trained at {meta['resolution']}x{meta['resolution']} but "
            f"{resolution}x{resolution} images were asked for; pre-train F again with "
            f"`python rotation.py --resolution {resolution} ...`")
    F = build_feature_extractor(meta["arch"], meta["resolution"])
    try:
        F.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path} does not match the {meta['arch']} that this rotation.py "
                         f"builds (an older file?); pre-train F again: {err}") from None
    F.meta = meta
    return F.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Command line: pre-train F on an ImageFolder and save it.


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Pre-train a feature extractor F with the rotation loss (paper eq. 1)")
    parser.add_argument("--data", required=True,
                        help="ImageFolder directory of training images (one sub-folder per "
                             "class; the classes are not used)")
    parser.add_argument("--val", default=None,
                        help="optional ImageFolder directory for the final rotation accuracy")
    parser.add_argument("--resolution", type=int, default=32,
                        help="image side in pixels after centre-crop and resize (default 32)")
    parser.add_argument("--arch", default="resnet18", choices=sorted(ARCHS),
                        help="torchvision ResNet for F (default resnet18; resnet50 at "
                             "ImageNet scale; resnet18_cifar has the CIFAR stem, ~25x slower "
                             "at 32x32)")
    parser.add_argument("--steps", type=int, default=500,
                        help="SGD steps; warm-up and decays scale with it (default 500)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="source images per step, each seen in all 4 rotations (default 32)")
    parser.add_argument("--lr", type=float, default=LR_PER_256,
                        help="peak learning rate per 256 source images, scaled by "
                             "batch/256 (default 0.1)")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="SGD weight decay (default 1e-4)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for init and shuffling (default 0)")
    parser.add_argument("--log-every", type=int, default=50,
                        help="steps between log lines (default 50)")
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader worker processes (default 0: load in the main process)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads for torch (default 2, the tiny preset's CPU budget)")
    parser.add_argument("--out", default="out/F_rot.pt",
                        help="where to write F and its metadata (default out/F_rot.pt)")
    args = parser.parse_args(argv)
    for flag in ("resolution", "steps", "batch_size", "threads"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    torch.set_num_threads(args.threads)

    # Data: the classes of the folders are ignored, only the images are used
    try:
        train = image_folder(args.data, args.resolution, train=True)
        val = image_folder(args.val, args.resolution) if args.val else None
    except ValueError as err:
        raise SystemExit(f"bad --data/--val: {err}")
    print(f"rotation pre-training of {args.arch} at {args.resolution}x{args.resolution} on "
          f"{len(train)} images from {args.data}: {args.steps} steps of {args.batch_size} x 4")

    # Pre-train, then report the rotation accuracy on the training (and val) images
    start = time.time()
    try:
        F, c_R = pretrain_rotation(train, args.steps, args.batch_size, args.lr, args.arch,
                                   args.resolution, weight_decay=args.weight_decay,
                                   seed=args.seed, log=tqdm.write, log_every=args.log_every,
                                   workers=args.workers, return_head=True)
    except ValueError as err:
        raise SystemExit(str(err))
    minutes = (time.time() - start) / 60
    meta = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed, "data": args.data, "minutes": round(minutes, 2)}
    if val is not None:
        meta["val_rotation_accuracy"] = evaluate_rotation(F, c_R, val)
        print(f"rotation accuracy on {args.val}: {meta['val_rotation_accuracy']:.4f} "
              f"(chance 0.25)")
    print(f"pre-training took {minutes:.1f} min")

    save_feature_extractor(F, args.out, meta)
    print(f"wrote F ({F.arch}, feat_dim {F.feat_dim}) to {args.out}")


if __name__ == "__main__":
    main()
