"""Fill in the blanks: three core functions of the paper, for students to write themselves.

Copy this file, replace each `raise NotImplementedError` with your code, and check it with

    STUDENT=path/to/your_copy.py python -m pytest -q tests/test_student.py

The same tests run against the project's own functions when STUDENT is not set (gan.py,
rotation.py, semisup.py hold the reference answers: read them after you have tried).
"""
import torch
import torch.nn.functional as F


def hinge_loss_d(real_logit, fake_logit):
    """Discriminator hinge loss (paper sec. 2.1):
    E[max(0, 1 - D(x, y))] + E[max(0, 1 + D(G(z, y), y))], means over the batch."""
    raise NotImplementedError("your code here")


def hinge_loss_g(fake_logit):
    """Generator hinge loss: -E[D(G(z, y), y)]."""
    raise NotImplementedError("your code here")


def rotate_last(x, n):
    """The last n images of x (B, C, H, W) rotated by 90, 180 and 270 degrees counter-clockwise,
    blocked: all 90s, then all 180s, then all 270s -> (3n, C, H, W) (paper sec. 3.3; hint:
    torch.rot90 and its dims argument)."""
    raise NotImplementedError("your code here")


def rotation_labels(n):
    """Rotation classes of the 4n rows [x[-n:], rotate_last(x, n)]: n zeros, n ones, n twos,
    n threes (a LongTensor)."""
    raise NotImplementedError("your code here")


def class_loss(logits, labels):
    """Co-training loss (sec. 3.2, eq. 3): mean cross-entropy over the rows whose label is not
    -1; exactly 0 (not NaN) when no row is labeled."""
    raise NotImplementedError("your code here")
