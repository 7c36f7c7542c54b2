"""Evaluation: FID and Inception Score as the paper computes them (paper sec. 4), plus the
accuracy of inferred labels (paper sec. 3.1-3.2, Table 3).

The paper follows Brock et al. (PAPER.md sec. 6): 50k samples of the EMA generator with standing
BatchNorm statistics, z ~ N(0, I) without truncation, labels uniform over the classes, against
real images centre-cropped and resized to the generator's resolution; each metric is averaged
over 5 freshly sampled fake sets. Both metrics read the Inception network of the original IS
code (the 2015-12-05 graph):

    FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))      on the 2048-d pool_3 features
    IS  = exp(E_x KL(p(y|x) || p(y))),  p(y) = E_x p(y|x)          on the 1008-way logits

The IS is taken over all samples at once (one split), as the paper's TF-GAN code does;
`--is-splits 10` gives the common 10-split convention. The Inception network is torch-fidelity's
TensorFlow-exact port (uint8 input, TF1 bilinear resize to 299), so the numbers are comparable to
the paper's. Its weights are never downloaded here: pass `--inception-weights PATH` or put the
file in torch-fidelity's cache (see `find_inception_weights`).

For CPU runs without those weights, `--features rotation:PATH` measures the same Frechet
distance on the features of the rotation pre-trained network F (rotation.py). That number is
called FD_rot, not FID: it is on another scale and has no Inception Score.

Real statistics are computed once per (folder, resolution, image count, feature space) and
cached as a .npz file in ~/.cache/s3gan/real_stats ($XDG_CACHE_HOME respected, `--cache-dir`
overrides): they belong to the data, not to a run, so every run and checkpoint shares them.

    python metrics.py --ckpt out/RUN/ckpt.pt --real data/tiny-imagenet-10/val \
        --inception-weights weights-inception-2015-12-05-6726825d.pth
"""
import argparse
import hashlib
import json
import math
import os
import pickle

import numpy as np
import torch
import torchvision.transforms.functional as TF
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from tqdm import tqdm

# torch-fidelity's own release of the TF Inception weights (its URL_INCEPTION_V3, repeated here
# because importing torch_fidelity takes seconds); the file name is the end of the URL.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]


# --------------------------------------------------------------------------------------------
# Feature spaces: Inception (FID, IS) or the rotation network F (FD_rot)

class FeatureSpace:
    """A frozen network mapping uint8 images (B, 3, H, W) to features (B, d), and, when
    `has_logits`, also to class logits (B, C) for the IS: `net(x)` returns `(features, logits)`.

    `key` names the space in the real-statistics cache; `distance` names the Frechet distance
    ("FID" for Inception). Tests build one around any small network."""

    def __init__(self, net, key, distance="FID", has_logits=False):
        self.net, self.key, self.distance, self.has_logits = net.eval(), key, distance, has_logits

    def to(self, device):
        self.net.to(device)
        return self

    @torch.no_grad()
    def __call__(self, images):
        out = self.net(images)
        features, logits = out if self.has_logits else (out, None)
        return features.flatten(1), logits


class _FromUint8(torch.nn.Module):
    """Feeds uint8 images to a network that expects floats in [-1, 1] (rotation.py's F)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, images):
        return self.net(images.float() / 127.5 - 1)


class _Inception(torch.nn.Module):
    """torch-fidelity's TF Inception: uint8 images -> (pool_3 (B, 2048), logits (B, 1008)).

    The logits are the fc layer without its bias, as in the original IS code (torch-fidelity's
    'logits_unbiased'), computed here in float64. The convolutions run in full float32: on Ampere
    and later GPUs PyTorch lets cuDNN use TF32 by default (about 1e-3 relative error), and the
    features should match TensorFlow's float32 graph whatever a training run has enabled."""

    def __init__(self, weights):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # An explicit path keeps torch-fidelity from calling load_state_dict_from_url.
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                               feature_extractor_weights_path=weights)

    def forward(self, images):
        # torch >= 2.9 names the switch cudnn.conv.fp32_precision, older ones allow_tf32
        conv = getattr(torch.backends.cudnn, "conv", None)
        new_api = hasattr(conv, "fp32_precision")
        owner, name, full = ((conv, "fp32_precision", "ieee") if new_api
                             else (torch.backends.cudnn, "allow_tf32", False))
        saved = getattr(owner, name)
        setattr(owner, name, full)
        try:
            (pool,) = self.net(images)
        finally:
            setattr(owner, name, saved)
        return pool, pool.double() @ self.net.fc.weight.double().T


def find_inception_weights(path=None):
    """The Inception weights file: `path` if given, else torch-fidelity's download cache,
    $TORCH_HOME/hub/checkpoints/<INCEPTION_FILE> (default ~/.cache/torch/hub/checkpoints).
    Missing weights end the program: there is no download and no substitute network."""
    if path is not None:
        if os.path.isfile(path):
            return path
        raise SystemExit(f"--inception-weights {path}: no such file. It should be "
                         f"{INCEPTION_FILE}, downloaded from {INCEPTION_URL}.")

    cached = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)
    if os.path.isfile(cached):
        return cached
    raise SystemExit(
        f"The Inception weights for FID/IS were not found: {INCEPTION_FILE} is not at {cached}.\n"
        f"Download it on a machine with internet access from\n  {INCEPTION_URL}\n"
        f"then either put it at {cached} (the directory follows $TORCH_HOME) or pass "
        f"--inception-weights PATH. Without Inception weights, --features rotation:F.pt "
        f"measures FD_rot on the rotation network's features instead.")


def load_feature_space(spec="inception", resolution=None, inception_weights=None):
    """'inception' -> FID and IS on torch-fidelity's TF Inception; 'rotation:PATH' -> FD_rot on
    the features of the rotation pre-trained F saved at PATH (checked against `resolution`)."""
    if spec == "inception":
        net = _Inception(find_inception_weights(inception_weights))
        return FeatureSpace(net, "inception-2015-12-05-pool3", "FID", has_logits=True)

    if spec.startswith("rotation:"):
        path = spec[len("rotation:"):]
        if not os.path.isfile(path):
            raise ValueError(f"--features {spec}: no such file; pre-train F with "
                             f"`python rotation.py --data DIR --out F.pt` first")
        import rotation

        F = rotation.load_feature_extractor(path, resolution=resolution)
        # The file's identity (not only its name) keys the cache: F may be re-trained in place.
        st = os.stat(path)
        ident = f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
        key = "rotation-" + hashlib.sha1(ident.encode()).hexdigest()[:12]
        return FeatureSpace(_FromUint8(F), key, "FD_rot", has_logits=False)

    raise ValueError(f"--features {spec!r}: use 'inception' or 'rotation:PATH'")


# --------------------------------------------------------------------------------------------
# The metrics

class RunningMoments:
    """Mean and covariance of a stream of feature batches in float64. Batches are merged with
    Chan et al.'s pairwise update, which is as accurate as the two-pass formula and never holds
    all 50k x 2048 features in memory."""

    def __init__(self):
        self.n, self.mu, self.m2 = 0, None, None

    def update(self, features):
        f = features.double()
        n_b, mu_b = f.shape[0], f.mean(0)
        centred = f - mu_b
        m2_b = centred.T @ centred
        if self.n == 0:
            self.n, self.mu, self.m2 = n_b, mu_b, m2_b
            return
        n = self.n + n_b
        delta = mu_b - self.mu
        self.mu = self.mu + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (self.n * n_b / n)
        self.n = n

    def result(self):
        """(mu, sigma) as float64 numpy arrays; sigma is the unbiased covariance, as np.cov."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        return self.mu.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


def sqrt_psd(sigma, device="cpu"):
    """The symmetric square root of a covariance matrix (float64 tensor on `device`), from its
    eigendecomposition with round-off negative eigenvalues clipped to 0."""
    w, V = torch.linalg.eigh(torch.as_tensor(sigma, dtype=torch.float64, device=device))
    return (V * w.clamp(min=0).sqrt()) @ V.T


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma1=None, device="cpu"):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    tr (S1 S2)^(1/2) = tr (A S2 A)^(1/2) with A = S1^(1/2), because S1 S2 = A (A S2 A) A^-1 has
    the same eigenvalues. A S2 A is symmetric positive semi-definite, so a symmetric eigensolver
    (backward stable, real eigenvalues) gives its spectrum; round-off negatives are clipped to 0.
    scipy's sqrtm of the non-symmetric S1 S2 instead can return complex values and needs an
    eps * I fix-up when S1 or S2 is singular (fewer samples than dimensions); torch-fidelity's
    general eigvals of S1 S2 is also several times slower at 2048 dimensions. torch.linalg
    rather than numpy: it runs on the GPU and keeps to torch's thread count on a shared CPU.
    Pass `sqrt_sigma1` (= sqrt_psd(sigma1)) to reuse A when S1 is fixed (the real images)."""
    def f64(x):
        return torch.as_tensor(x, dtype=torch.float64, device=device)

    mu1, sigma1, mu2, sigma2 = f64(mu1), f64(sigma1), f64(mu2), f64(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {tuple(mu1.shape)}/{tuple(sigma1.shape)}"
                         f" vs {tuple(mu2.shape)}/{tuple(sigma2.shape)}")

    # tr (A S2 A)^(1/2) = sum of the square roots of its eigenvalues.
    A = sqrt_psd(sigma1, device) if sqrt_sigma1 is None else f64(sqrt_sigma1)
    M = A @ sigma2 @ A
    tr_sqrt = torch.linalg.eigvalsh((M + M.T) / 2).clamp(min=0).sqrt().sum()

    diff = mu1 - mu2
    fd = diff @ diff + sigma1.trace() + sigma2.trace() - 2 * tr_sqrt
    return max(fd.item(), 0.0)   # a distance: only round-off makes it negative


def inception_score(logits, splits=1):
    """exp(E_x KL(p(y|x) || p(y))) over each of `splits` consecutive chunks (torch-fidelity's
    chunk boundaries) in float64; returns (mean, std) over the chunks. splits=1 is the paper's."""
    log_p = torch.as_tensor(logits).double().log_softmax(dim=1)   # log p(y|x)
    n = log_p.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"IS needs 1 <= splits <= samples, got {splits} splits of {n} samples")

    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]
        # log p(y) = log mean_x p(y|x), computed without leaving log space.
        log_py = torch.logsumexp(chunk, dim=0) - math.log(chunk.shape[0])
        kl = (chunk.exp() * (chunk - log_py)).sum(dim=1)
        scores.append(math.exp(kl.mean().item()))
    return float(np.mean(scores)), float(np.std(scores))


def label_accuracy(pred, truth, clusters=False):
    """Share of images whose inferred label agrees with the ground truth; images with truth -1
    are left out. With `clusters`, each cluster id is first mapped to its majority true class
    (cluster purity), since cluster ids are arbitrary. Inferred -1 counts as wrong."""
    pred, truth = torch.as_tensor(pred).long().flatten(), torch.as_tensor(truth).long().flatten()
    if pred.shape != truth.shape:
        raise ValueError(f"{pred.numel()} inferred labels for {truth.numel()} true labels")
    known = truth >= 0
    if not known.any():
        raise ValueError("no ground-truth labels (all -1): accuracy is undefined")
    pred, truth = pred[known], truth[known]
    if not clusters:
        return (pred == truth).double().mean().item()

    # counts[c, k]: images of cluster c with true class k; the majority class scores its count.
    assigned = pred >= 0
    counts = torch.zeros(int(pred.max().clamp(min=0)) + 1, int(truth.max()) + 1)
    counts.index_put_((pred[assigned], truth[assigned]), torch.ones(int(assigned.sum())),
                      accumulate=True)
    return (counts.max(dim=1).values.sum() / truth.numel()).item()


# --------------------------------------------------------------------------------------------
# Real images and their cached statistics

class RealImages(Dataset):
    """Every image under a folder (an ImageFolder root or a plain folder, searched recursively),
    centre-cropped to a square and resized to `resolution`, as uint8 (3, R, R)."""

    def __init__(self, root, resolution, count=None, seed=0):
        self.resolution = resolution
        self.files = sorted(os.path.join(d, f) for d, _, names in os.walk(root, followlinks=True)
                            for f in names if f.lower().endswith(IMG_EXTENSIONS))
        if not self.files:
            raise ValueError(f"no images found under {root} (extensions {IMG_EXTENSIONS})")
        if count is not None:
            if not 2 <= count <= len(self.files):
                raise ValueError(f"--num-real {count}: {root} has {len(self.files)} images")
            # A seeded subset, so the same count always means the same images.
            keep = torch.randperm(len(self.files), generator=torch.Generator().manual_seed(seed))
            self.files = [self.files[i] for i in sorted(keep[:count].tolist())]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            image = default_loader(self.files[i])
        except (OSError, SyntaxError) as err:
            # the real statistics must be those of the named set: stop rather than skip
            raise ValueError(f"unreadable real image {self.files[i]} ({err}); remove or "
                             "replace it") from None
        image = TF.center_crop(image, min(image.size))
        image = TF.resize(image, [self.resolution, self.resolution], antialias=True)
        return TF.pil_to_tensor(image)


def default_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "s3gan", "real_stats")


def real_statistics(space, real_dir, resolution, num_real=None, batch_size=64, cache_dir=None,
                    num_workers=0, device="cpu", progress=True):
    """(mu, sigma, count) of the real images' features, read from the cache when it holds
    them."""
    images = RealImages(real_dir, resolution, num_real)
    key = dict(real_dir=os.path.realpath(real_dir), resolution=resolution,
               count=len(images), features=space.key)
    key_text = json.dumps(key, sort_keys=True)
    name = (f"{os.path.basename(key['real_dir'])}-{resolution}px-{len(images)}-"
            f"{hashlib.sha1(key_text.encode()).hexdigest()[:12]}.npz")
    path = os.path.join(cache_dir or default_cache_dir(), name)

    # The cache file stores its key; a hash collision or a stale file is recomputed.
    if os.path.isfile(path):
        with np.load(path) as cached:
            if str(cached["key"]) == key_text:
                return cached["mu"], cached["sigma"], len(images)

    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers)
    moments = RunningMoments()
    for batch in tqdm(loader, desc=f"real features ({len(images)})", disable=not progress):
        moments.update(space(batch.to(device))[0])
    mu, sigma = moments.result()

    # Write then rename, so an interrupted run never leaves a truncated cache file.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, key=key_text)
    os.replace(tmp, path)
    return mu, sigma, len(images)


# --------------------------------------------------------------------------------------------
# Generated images

def to_uint8(x):
    """Images in [-1, 1] -> uint8 in [0, 255], as if saved to an image file."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate(G, num_classes, num_samples, batch_size, seed, device):
    """Yields uint8 batches of G(z, y), z ~ N(0, I), y uniform over the classes. The noise comes
    from its own seeded generator (on the CPU, so it does not depend on the device) and leaves
    the global RNG of a training run untouched."""
    rng = torch.Generator().manual_seed(seed)
    for start in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - start)
        z = torch.randn(b, G.z_dim, generator=rng)
        y = torch.randint(num_classes, (b,), generator=rng)
        yield to_uint8(G(z.to(device), y.to(device)))


def fake_statistics(space, G, num_classes, num_samples, batch_size, seed, device, progress=True,
                    desc="fake features"):
    """(mu, sigma, logits) of one set of generated images (logits None without IS)."""
    moments, logits = RunningMoments(), []
    batches = generate(G, num_classes, num_samples, batch_size, seed, device)
    total = math.ceil(num_samples / batch_size)
    for images in tqdm(batches, total=total, desc=desc, disable=not progress):
        features, batch_logits = space(images)
        moments.update(features)
        if batch_logits is not None:
            logits.append(batch_logits.float().cpu())
    mu, sigma = moments.result()
    return mu, sigma, (torch.cat(logits) if logits else None)


# --------------------------------------------------------------------------------------------
# The paper's protocol

def evaluate(G, num_classes, real_dir, feature_space="inception", num_samples=50000,
             fake_sets=5, batch_size=64, is_splits=1, num_real=None, inception_weights=None,
             cache_dir=None, standing_batches=0, seed=42, num_workers=0, device=None,
             progress=True):
    """FID and IS (or FD_rot) of generator G, averaged over `fake_sets` sets of `num_samples`.

    G should be the EMA generator; its BatchNorm buffers should hold standing statistics (the
    checkpoint's G_ema does), or pass `standing_batches` > 0 to recompute them here with
    gan.standing_stats (this overwrites G's BN buffers). G is sampled in eval mode and given
    back in the mode it came in. `feature_space` is a spec for `load_feature_space` or a
    FeatureSpace. Returns a dict: '<FID|FD_rot>', '<...>_std' (over the fake sets), '<...>_sets',
    and for Inception 'IS', 'IS_std', 'IS_sets' (each set's IS; with is_splits > 1 its mean over
    splits, and 'IS_split_std' the mean over sets of the std over splits)."""
    device = device or next(G.parameters()).device
    if not os.path.isdir(real_dir):
        raise ValueError(f"real image folder {real_dir} does not exist")
    space = feature_space
    if not isinstance(space, FeatureSpace):
        space = load_feature_space(feature_space, G.resolution, inception_weights)
    space.to(device)

    # Step 1: the real statistics, computed once per folder, resolution, count and space.
    mu_r, sigma_r, count = real_statistics(space, real_dir, G.resolution, num_real, batch_size,
                                           cache_dir, num_workers, device, progress)

    # Step 2: the generator's BN in inference mode, with standing statistics if asked.
    was_training = G.training
    if standing_batches > 0:
        import gan

        gan.standing_stats(G, standing_batches, batch_size,
                           lambda b, rng: torch.randint(num_classes, (b,), generator=rng),
                           seed=seed)
    G.eval()

    # Step 3: each fake set gets its own noise seed; metrics are averaged over the sets.
    sqrt_sigma_r = sqrt_psd(sigma_r, device)
    fds, scores, split_stds = [], [], []
    for k in range(fake_sets):
        mu_g, sigma_g, logits = fake_statistics(
            space, G, num_classes, num_samples, batch_size, seed + k, device, progress,
            desc=f"fake set {k + 1}/{fake_sets}")
        fds.append(frechet_distance(mu_r, sigma_r, mu_g, sigma_g, sqrt_sigma_r, device))
        if logits is not None:
            score, split_std = inception_score(logits, is_splits)
            scores.append(score)
            split_stds.append(split_std)
    G.train(was_training)

    name = space.distance
    results = {name: float(np.mean(fds)), f"{name}_std": float(np.std(fds)), f"{name}_sets": fds}
    if scores:
        results.update(IS=float(np.mean(scores)), IS_std=float(np.std(scores)), IS_sets=scores)
        if is_splits > 1:
            results["IS_split_std"] = float(np.mean(split_stds))
    results.update(features=space.key, num_samples=num_samples, fake_sets=fake_sets,
                   is_splits=is_splits, num_real=count)
    return results


# --------------------------------------------------------------------------------------------
# Command line

def load_generator(ckpt_path, device="cpu"):
    """The EMA generator of a train.py checkpoint, rebuilt from the checkpoint alone."""
    import biggan

    if not os.path.isfile(ckpt_path):
        raise ValueError(f"checkpoint {ckpt_path} does not exist (train.py writes "
                         f"out/<run>/ckpt.pt)")
    # weights_only=False: a train.py checkpoint also holds RNG states and a config dict.
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(f"{ckpt_path} is not a file that torch can read ({err}); pass the "
                         "ckpt.pt that train.py writes") from None
    missing = [k for k in ("config", "G_ema") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{ckpt_path} is not a train.py checkpoint: no {missing}")
    cfg = ckpt["config"]
    G = biggan.Generator(cfg["resolution"], cfg["ch"], cfg["num_classes"])
    G.load_state_dict(ckpt["G_ema"])
    return G.to(device).eval(), ckpt


def main(argv=None):
    p = argparse.ArgumentParser(description="FID and IS (paper sec. 4) of a train.py checkpoint's "
                                            "EMA generator against a folder of real images.")
    p.add_argument("--ckpt", required=True, help="out/<run>/ckpt.pt written by train.py")
    p.add_argument("--real", required=True,
                   help="folder of real images (ImageFolder root or plain folder, recursive)")
    p.add_argument("--features", default="inception",
                   help="'inception' (FID, IS) or 'rotation:F.pt' (FD_rot; offline, CPU)")
    p.add_argument("--inception-weights", default=None,
                   help=f"path to {INCEPTION_FILE} (default: torch-fidelity's cache under "
                        f"$TORCH_HOME/hub/checkpoints)")
    p.add_argument("--num-samples", type=int, default=50000, help="samples per fake set")
    p.add_argument("--fake-sets", type=int, default=5, help="fake sets averaged (paper: 5)")
    p.add_argument("--num-real", type=int, default=None,
                   help="seeded subset of the real images (default: all)")
    p.add_argument("--is-splits", type=int, default=1,
                   help="IS splits: 1 as the paper (default), 10 for the common convention")
    p.add_argument("--standing-batches", type=int, default=0,
                   help="recompute G's standing BN statistics from this many batches "
                        "(default 0: keep the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=42, help="noise seed of the first fake set")
    p.add_argument("--cache-dir", default=None,
                   help=f"real-statistics cache (default {default_cache_dir()})")
    p.add_argument("--workers", type=int, default=2, help="data loader workers for real images")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="JSON file (default: metrics.json beside --ckpt)")
    args = p.parse_args(argv)

    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"--ckpt {args.ckpt}: no such file (train.py writes out/<run>/ckpt.pt)")
    if not os.path.isdir(args.real):
        raise SystemExit(f"--real {args.real}: no such folder of real images")
    if args.fake_sets < 1 or args.num_samples < 2 or args.batch_size < 1:
        raise SystemExit("--fake-sets and --batch-size must be at least 1 and --num-samples "
                         "at least 2")
    try:
        # G, then the feature space: missing weights stop the run before any sampling.
        G, ckpt = load_generator(args.ckpt, args.device)
        space = load_feature_space(args.features, G.resolution, args.inception_weights)
        results = evaluate(G, G.num_classes, args.real, space, args.num_samples,
                           args.fake_sets, args.batch_size, args.is_splits, args.num_real,
                           cache_dir=args.cache_dir, standing_batches=args.standing_batches,
                           seed=args.seed, num_workers=args.workers, device=args.device)
    except ValueError as err:
        raise SystemExit(f"metrics.py: {err}")

    # One line per metric, then the JSON record.
    for name in (space.distance, "IS"):
        if name in results:
            print(f"{name} {results[name]:.4f} +- {results[name + '_std']:.4f} "
                  f"({args.fake_sets} sets x {args.num_samples} samples)")
    results.update(ckpt=os.path.abspath(args.ckpt), step=ckpt.get("step"),
                   real=os.path.abspath(args.real), config=ckpt["config"])
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "metrics.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
