"""The networks: BigGAN's generator and discriminator (paper sec. 4; Brock et al. 2019).

The paper uses BigGAN at the configuration of the official code (compare_gan,
`architectures/resnet_biggan.py`): channel multiplier ch = 96, a 120-d z split hierarchically into
equal chunks of 20 (one for the first linear layer, one per generator block), one shared class
embedding of 128 concatenated with each chunk to condition the BatchNorm of every G block,
self-attention at 64x64, spectral norm on every weight of G and D, orthogonal initialisation, and
a projection discriminator (Miyato & Koyama 2018):

    D(x, y) = c_r/f(D~(x)) + (E^T y) . D~(x),        D~(x) = sum-pool(ReLU(last block))

D~(x) is what `Discriminator.features` returns as h; the rotation head (rotation.py) and the
co-training classifier head (semisup.py) read the same h. y is a (B, K) matrix: one-hot for a
label, a probability vector for a soft label, all zeros for "no label" (then D(x) = c_r/f(h)).

Where compare_gan departs from BigGAN as published, this file follows BigGAN, because the paper
presents its model as BigGAN and the departures are known to hurt (compare_gan#54):
  - conditional BatchNorm gain is (1 + gamma(cond)), not gamma(cond), so it starts near identity;
  - G upsamples by nearest neighbour, not by zero insertion;
  - D blocks with equal input and output width and no downsampling keep an identity skip;
  - D's first block has no pre-activation ReLU (our images are in [-1, 1], so a ReLU would
    discard half the input; compare_gan's images are in [0, 1] where it is a no-op).
None of these changes a parameter count: at 128x128, ch 96, 1000 classes this file builds
G = 70,433,988 and D = 87,982,370 parameters, as the official code's docstring states.

Run `python biggan.py --resolution 128 --ch 96 --num-classes 1000` for a summary.
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

Z_CHUNK = 20        # size of each hierarchical z chunk (120 = 6 x 20 at 128x128)
SHARED_DIM = 128    # shared class embedding
BN_EPS = 1e-5

# Per resolution: G block widths (multiples of ch, the first is the 4x4 input), the resolution
# after which G has attention, D block output widths, which D blocks halve the resolution, and
# the resolution after which D has attention (None: no attention). 128 and 256 follow
# compare_gan; 32 and 64 follow BigGAN-PyTorch's published small configurations, with
# attention at 32x32 at 64x64 (a 64x64 attention map is too slow for a CPU run).
ARCH = {
    32: dict(g=[4, 4, 4, 4], g_attn=None,
             d=[4, 4, 4, 4], d_down=[1, 1, 0, 0], d_attn=None),
    64: dict(g=[16, 16, 8, 4, 2], g_attn=32,
             d=[1, 2, 4, 8, 16], d_down=[1, 1, 1, 1, 0], d_attn=32),
    128: dict(g=[16, 16, 8, 4, 2, 1], g_attn=64,
              d=[1, 2, 4, 8, 16, 16], d_down=[1, 1, 1, 1, 1, 0], d_attn=64),
    256: dict(g=[16, 16, 8, 8, 4, 2, 1], g_attn=128,
              d=[1, 2, 4, 8, 8, 16, 16], d_down=[1, 1, 1, 1, 1, 1, 0], d_attn=64),
}


def check_resolution(resolution):
    if resolution not in ARCH:
        raise ValueError(f"resolution {resolution} is not supported: use one of "
                         f"{sorted(ARCH)} (--resolution)")


# --------------------------------------------------------------------------------------------
# Layers with spectral norm and orthogonal initialisation

def _sn(module, init=nn.init.orthogonal_):
    # Initialise before registering spectral norm: its power iteration starts from this weight.
    init(module.weight)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return spectral_norm(module, eps=1e-12)


def sn_conv(c_in, c_out, kernel=3, bias=True):
    return _sn(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias))


def sn_linear(d_in, d_out, bias=True):
    """A linear layer with spectral norm and orthogonal init (also for the heads on h)."""
    return _sn(nn.Linear(d_in, d_out, bias=bias))


class ConditionalBatchNorm(nn.Module):
    """BatchNorm without its own affine, then x * (1 + gamma(cond)) + beta(cond).

    gamma and beta are bias-free SN linear maps of cond = [z_i, shared(y)], as in compare_gan;
    the "1 +" is BigGAN's, so that every block starts as plain BatchNorm.
    """

    def __init__(self, channels, cond_dim):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS, affine=False)
        self.gain = sn_linear(cond_dim, channels, bias=False)
        self.bias = sn_linear(cond_dim, channels, bias=False)

    def forward(self, x, cond):
        gamma = 1 + self.gain(cond)[:, :, None, None]
        beta = self.bias(cond)[:, :, None, None]
        return self.bn(x) * gamma + beta


class Attention(nn.Module):
    """SAGAN's non-local block: x + sigma * o(softmax(theta phi^T) g), sigma starting at 0."""

    def __init__(self, channels):
        super().__init__()
        self.theta = sn_conv(channels, channels // 8, 1, bias=False)
        self.phi = sn_conv(channels, channels // 8, 1, bias=False)
        self.g = sn_conv(channels, channels // 2, 1, bias=False)
        self.o = sn_conv(channels // 2, channels, 1, bias=False)
        self.sigma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        B, C, H, W = x.shape
        theta = self.theta(x).flatten(2)                        # (B, C/8, HW)
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)           # (B, C/8, HW/4)
        g = F.max_pool2d(self.g(x), 2).flatten(2)               # (B, C/2, HW/4)
        attn = torch.softmax(theta.transpose(1, 2) @ phi, -1)   # (B, HW, HW/4)
        o = (g @ attn.transpose(1, 2)).view(B, C // 2, H, W)
        return x + self.sigma * self.o(o)


# --------------------------------------------------------------------------------------------
# Generator

class GBlock(nn.Module):
    """CBN -> ReLU -> up x2 -> conv3x3 -> CBN -> ReLU -> conv3x3, plus up x2 -> conv1x1."""

    def __init__(self, c_in, c_out, cond_dim):
        super().__init__()
        self.bn1 = ConditionalBatchNorm(c_in, cond_dim)
        self.conv1 = sn_conv(c_in, c_out)
        self.bn2 = ConditionalBatchNorm(c_out, cond_dim)
        self.conv2 = sn_conv(c_out, c_out)
        self.shortcut = sn_conv(c_in, c_out, 1)

    def forward(self, x, cond):
        h = F.relu(self.bn1(x, cond))
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.bn2(h, cond)))
        # A 1x1 convolution commutes with nearest upsampling: convolve first, 4x cheaper.
        return h + F.interpolate(self.shortcut(x), scale_factor=2, mode="nearest")


class Generator(nn.Module):
    """G(z, y): z (B, z_dim) ~ N(0, I), y (B,) class indices -> images (B, 3, R, R) in [-1, 1]."""

    def __init__(self, resolution=32, ch=32, num_classes=10):
        super().__init__()
        check_resolution(resolution)
        arch = ARCH[resolution]
        widths = [m * ch for m in arch["g"]]
        self.resolution, self.ch, self.num_classes = resolution, ch, num_classes
        self.num_blocks = len(widths) - 1
        self.z_dim = Z_CHUNK * (self.num_blocks + 1)
        cond_dim = Z_CHUNK + SHARED_DIM

        # One embedding shared by all blocks; compare_gan gives it no spectral norm.
        self.shared = nn.Embedding(num_classes, SHARED_DIM)
        nn.init.orthogonal_(self.shared.weight)
        self.fc = sn_linear(Z_CHUNK, 4 * 4 * widths[0])
        self.blocks = nn.ModuleList()
        self.attn_after = None
        size = 4
        for i in range(self.num_blocks):
            self.blocks.append(GBlock(widths[i], widths[i + 1], cond_dim))
            size *= 2
            if size == arch["g_attn"]:
                self.attn_after, self.attn = i, Attention(widths[i + 1])
        self.bn_out = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.conv_out = sn_conv(widths[-1], 3)

    def forward(self, z, y):
        chunks = z.split(Z_CHUNK, dim=1)
        e_y = self.shared(y)
        h = self.fc(chunks[0]).view(z.shape[0], -1, 4, 4)
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([chunks[i + 1], e_y], dim=1))
            if i == self.attn_after:
                h = self.attn(h)
        return torch.tanh(self.conv_out(F.relu(self.bn_out(h))))


# --------------------------------------------------------------------------------------------
# Discriminator

class DBlock(nn.Module):
    """[ReLU] -> conv3x3 -> ReLU -> conv3x3 -> [avgpool], plus a 1x1 shortcut when the width or
    size changes (identity otherwise)."""

    def __init__(self, c_in, c_out, downsample, preactivation):
        super().__init__()
        self.conv1 = sn_conv(c_in, c_out)
        self.conv2 = sn_conv(c_out, c_out)
        self.downsample, self.preactivation = downsample, preactivation
        self.shortcut = sn_conv(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h + self._skip(x)

    def _skip(self, x):
        # BigGAN's order: a pre-activated block convolves first (cheaper after the pool),
        # the input block pools first.
        if self.preactivation:
            x = self.shortcut(x) if self.shortcut is not None else x
            return F.avg_pool2d(x, 2) if self.downsample else x
        x = F.avg_pool2d(x, 2) if self.downsample else x
        return self.shortcut(x) if self.shortcut is not None else x


class Discriminator(nn.Module):
    """D(x, y) = c_r/f(h) + (E^T y) . h with h = D~(x); returns (logit (B,), h (B, feat_dim))."""

    def __init__(self, resolution=32, ch=32, num_classes=10):
        super().__init__()
        check_resolution(resolution)
        arch = ARCH[resolution]
        widths = [3] + [m * ch for m in arch["d"]]
        self.resolution, self.ch, self.num_classes = resolution, ch, num_classes
        self.feat_dim = widths[-1]

        self.blocks = nn.ModuleList()
        self.attn_after = None
        size = resolution
        for i, down in enumerate(arch["d_down"]):
            self.blocks.append(DBlock(widths[i], widths[i + 1], bool(down), preactivation=i > 0))
            size //= 2 if down else 1
            if size == arch["d_attn"] and self.attn_after is None:
                self.attn_after, self.attn = i, Attention(widths[i + 1])
        self.fc = sn_linear(self.feat_dim, 1)
        # E: (K -> feat_dim), glorot-normal as in compare_gan; a Linear so that soft and
        # all-zero label rows work the same way as one-hot rows.
        self.embed = _sn(nn.Linear(num_classes, self.feat_dim, bias=False), nn.init.xavier_normal_)

    def features(self, x):
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.attn_after:
                h = self.attn(h)
        return F.relu(h).sum(dim=(2, 3))

    def score(self, h, y):
        return self.fc(h).squeeze(1) + (self.embed(y) * h).sum(dim=1)

    def forward(self, x, y):
        h = self.features(x)
        return self.score(h, y), h


def build_models(cfg):
    """G and D for a resolved configuration (train.py's config or a checkpoint's)."""
    kwargs = dict(resolution=cfg["resolution"], ch=cfg["ch"], num_classes=cfg["num_classes"])
    return Generator(**kwargs), Discriminator(**kwargs)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def main():
    parser = argparse.ArgumentParser(description="Build BigGAN's G and D and print a summary.")
    parser.add_argument("--resolution", type=int, default=128,
                        help="image side in pixels: 32, 64, 128 or 256 (default 128)")
    parser.add_argument("--ch", type=int, default=96, help="channel multiplier (default 96)")
    parser.add_argument("--num-classes", type=int, default=1000,
                        help="number of classes (default 1000)")
    args = parser.parse_args()
    try:
        with torch.device("meta"):      # shapes only: no memory, no initialisation time
            G, D = build_models(vars(args))
    except ValueError as err:
        raise SystemExit(f"error: {err}")
    print(f"BigGAN {args.resolution}x{args.resolution}, ch {args.ch}, {args.num_classes} classes")
    print(f"  G: {count_parameters(G):,} parameters, z {G.z_dim} "
          f"({G.num_blocks + 1} chunks of {Z_CHUNK}), blocks {len(G.blocks)}, "
          f"attention after block {G.attn_after + 1 if G.attn_after is not None else '-'}")
    print(f"  D: {count_parameters(D):,} parameters, h {D.feat_dim}-d, blocks {len(D.blocks)}, "
          f"attention after block {D.attn_after + 1 if D.attn_after is not None else '-'}")


if __name__ == "__main__":
    main()
