"""The adversarial game: hinge losses, projection, one D step and one G step, EMA of G.

Paper sec. 2-3 (PAPER.md sec. 2.1, 2.4, 2.5, 3). With D(x, y) = c_r/f(D~(x)) + (E^T y) . D~(x):

    L_D = E_x[max(0, 1 - D(x, y_x))] + E_(z,y)[max(0, 1 + D(G(z, y), y))]
          + beta * L_rot(real rotated)                       (eq. 4, S3GAN and the (SS) methods)
          + lambda * L_CT(labeled reals)                     (eq. 3, co-training)
    L_G = -E_(z,y)[D(G(z, y), y)] + alpha * L_rot(fake rotated)   (eq. 5)

Unlabeled real images get y from the co-training head c_CT(D~(x)), with the gradient stopped,
before the projection (eq. 3). The rotated copies of a batch follow the official batching
(rotation.py). Every term reads the same features h = D~(x) of one forward pass.

`Ingredients` says which terms a method has; train.py maps each --method to one.
"""
import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import rotation
import semisup


@dataclass
class Ingredients:
    """What the training step needs to know about a method (DESIGN.md's method table)."""
    project: bool = True        # projection of y onto h; False for SINGLE LABEL: D(x) = c(h)
    rotation: bool = False      # rotation self-supervision during GAN training (sec. 3.3)
    cotrain: bool = False       # co-training classifier head c_CT on h (sec. 3.2)
    alpha: float = 0.2          # G's rotation loss weight (eq. 5)
    beta: float = 1.0           # D's rotation loss weight (eq. 4)
    lam: float = 1.0            # co-training classification loss weight (eq. 3)
    soft_labels: bool = False   # predicted labels as softmax instead of one-hot argmax
    rotated_n: int = 0          # n: how many of the last real/fake images are rotated


def hinge_loss_d(real_logit, fake_logit):
    return F.relu(1 - real_logit).mean() + F.relu(1 + fake_logit).mean()


def hinge_loss_g(fake_logit):
    return -fake_logit.mean()


def one_hot(labels, num_classes):
    """Rows for class indices; label -1 (unlabeled) gives an all-zero row, as tf.one_hot does."""
    y = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    known = labels >= 0
    y[known, labels[known]] = 1.0
    return y


class DiscriminatorWithHeads(nn.Module):
    """D together with the heads that read h, in one forward pass (so that DDP sees one module).

    forward(real, real_labels, fake, fake_labels) takes either half or both. It rotates the last
    n images of each half when the method uses rotation, computes h once, fills in the labels of
    unlabeled reals from c_CT when the method co-trains, and returns a dict with the real/fake
    logits of the unrotated rows, the rotation logits of the last 4n rows of each half, and the
    classifier logits of the unrotated reals.
    """

    def __init__(self, D, ingredients):
        super().__init__()
        self.D, self.ing = D, ingredients
        self.rot_head = rotation.RotationHead(D.feat_dim) if ingredients.rotation else None
        self.cls_head = (semisup.ClassifierHead(D.feat_dim, D.num_classes)
                         if ingredients.cotrain else None)

    def forward(self, real=None, real_labels=None, fake=None, fake_labels=None):
        ing, K = self.ing, self.D.num_classes
        n = ing.rotated_n if ing.rotation else 0
        halves = [x for x in (real, fake) if x is not None]
        if n:
            halves = [torch.cat([x, rotation.rotate_last(x, n)]) for x in halves]
        h = self.D.features(torch.cat(halves))
        h_parts = list(h.split([x.shape[0] for x in halves]))

        out = {}
        for name, x, labels in (("real", real, real_labels), ("fake", fake, fake_labels)):
            if x is None:
                continue
            h_half = h_parts.pop(0)
            h_x, bs = h_half[:x.shape[0]], x.shape[0]
            y = one_hot(labels, K)
            if name == "real" and self.cls_head is not None:
                out["cls_logits"] = self.cls_head(h_x)
                y = semisup.fill_labels(out["cls_logits"], labels, K, soft=ing.soft_labels)
                out["real_y"] = y
            if not ing.project:
                y = torch.zeros_like(y)
            out[f"{name}_logit"] = self.D.score(h_x, y)
            if n:
                out[f"{name}_rot_logits"] = self.rot_head(h_half[bs - n:])
        return out


def d_loss(out, real_labels, ing):
    """L_D and its parts from a DiscriminatorWithHeads output on a real and a fake half."""
    out = {k: v.float() for k, v in out.items()}        # losses in float32 under --amp
    parts = {"loss_hinge_d": hinge_loss_d(out["real_logit"], out["fake_logit"])}
    loss = parts["loss_hinge_d"]
    if ing.rotation:
        r = rotation.rotation_labels(ing.rotated_n, device=out["real_rot_logits"].device)
        parts["loss_rot_d"] = rotation.rotation_loss(out["real_rot_logits"], r)
        loss = loss + ing.beta * parts["loss_rot_d"]
    if ing.cotrain:
        parts["loss_cls"] = semisup.class_loss(out["cls_logits"], real_labels)
        loss = loss + ing.lam * parts["loss_cls"]
    return loss, parts


def g_loss(out, ing):
    """L_G and its parts from a DiscriminatorWithHeads output on a fake half."""
    out = {k: v.float() for k, v in out.items()}
    parts = {"loss_hinge_g": hinge_loss_g(out["fake_logit"])}
    loss = parts["loss_hinge_g"]
    if ing.rotation:
        r = rotation.rotation_labels(ing.rotated_n, device=out["fake_rot_logits"].device)
        parts["loss_rot_g"] = rotation.rotation_loss(out["fake_rot_logits"], r)
        loss = loss + ing.alpha * parts["loss_rot_g"]
    return loss, parts


@contextlib.contextmanager
def precision(amp, *models):
    """bf16 autocast for the convolutions (--amp bf16, CUDA or a CPU with bf16 units), with
    spectral norm in float32.

    Each normalised weight W / sigma(W) is computed once, before autocast and cached for the
    forward and backward pass, so the power iteration never runs in bf16.
    """
    if not amp:
        yield
        return
    device_type = next(models[0].parameters()).device.type
    with parametrize.cached():
        for model in models:
            for module in model.modules():
                if parametrize.is_parametrized(module, "weight"):
                    module.weight       # computed here in float32, then cached
        with torch.autocast(device_type, torch.bfloat16):
            yield


def _sync_last(model, last):
    """DDP averages gradients only on the last micro-batch of an accumulated step."""
    no_sync = getattr(model, "no_sync", None)
    return contextlib.nullcontext() if last or no_sync is None else no_sync()


def d_step(G, D, opt_D, micro_batches, ing, amp=False):
    """One discriminator update; micro_batches: [(real, real_labels, z, fake_labels)], whose
    gradients are averaged (--accum). Fakes come from fresh (z, y_f), without gradient."""
    opt_D.zero_grad(set_to_none=True)
    results = []
    for i, (real, real_labels, z, fake_labels) in enumerate(micro_batches):
        with _sync_last(D, i == len(micro_batches) - 1):
            with precision(amp, G, D):
                with torch.no_grad():
                    fake = G(z, fake_labels)
                out = D(real, real_labels, fake, fake_labels)
            loss, parts = d_loss(out, real_labels, ing)
            (loss / len(micro_batches)).backward()
        results.append((out, parts))
    opt_D.step()
    return results


def g_step(G, D, opt_G, micro_batches, ing, amp=False):
    """One generator update; micro_batches: [(z, fake_labels)]. D is frozen: no gradient is
    computed for its weights (pass the module itself, not its DDP wrapper)."""
    D.requires_grad_(False)
    opt_G.zero_grad(set_to_none=True)
    results = []
    for i, (z, fake_labels) in enumerate(micro_batches):
        with _sync_last(G, i == len(micro_batches) - 1):
            with precision(amp, G, D):
                out = D(fake=G(z, fake_labels), fake_labels=fake_labels)
            loss, parts = g_loss(out, ing)
            (loss / len(micro_batches)).backward()
        results.append((out, parts))
    opt_G.step()
    D.requires_grad_(True)
    return results


# --------------------------------------------------------------------------------------------
# EMA of G's weights and standing BatchNorm statistics

def make_ema(G):
    """A frozen copy of G, initialised from the live weights."""
    G_ema = copy.deepcopy(G).eval()
    G_ema.requires_grad_(False)
    return G_ema


@torch.no_grad()
def ema_update(G_ema, G, step, decay, start):
    """theta_ema <- decay * theta_ema + (1 - decay) * theta, tracking G exactly before `start`.

    Buffers are copied: spectral norm's power-iteration vectors follow the live weights, and
    the BatchNorm statistics are re-estimated by `standing_stats` before G_ema is used.
    """
    d = decay if step >= start else 0.0
    for p_ema, p in zip(G_ema.parameters(), G.parameters()):
        p_ema.lerp_(p, 1 - d)
    for b_ema, b in zip(G_ema.buffers(), G.buffers()):
        b_ema.copy_(b)


@torch.no_grad()
def standing_stats(G, num_batches, batch_size, sample_labels, seed=0):
    """Re-estimate G's BatchNorm statistics as the average over many batches of fresh noise.

    As compare_gan does at evaluation (it averages per-batch mean and variance over 204,800
    samples): the last training batch's statistics are noisy and the running averages lag the
    weights. `sample_labels(batch_size, generator)` draws the class labels. A private generator
    keeps the training random stream untouched, so sampling never changes a run.
    """
    device = next(G.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bns = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None          # None: a cumulative (equal-weight) average over batches
    # Only BatchNorm in training mode: spectral norm keeps its vectors (no power iteration).
    G.eval()
    for bn in bns:
        bn.train()
    for _ in range(num_batches):
        z = torch.randn(batch_size, G.z_dim, generator=gen).to(device)
        G(z, sample_labels(batch_size, gen).to(device))
    for bn in bns:
        bn.momentum = 0.1
    G.eval()
