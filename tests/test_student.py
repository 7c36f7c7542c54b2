"""Executable claims about three core functions, for the project's code or a student's own.

    STUDENT=docs/student.py python -m pytest -q tests/test_student.py   # a student's version

Without STUDENT the claims are checked against gan.py, rotation.py and semisup.py.
"""
import importlib.util
import math
import os
import types

import pytest
import torch
import torch.nn.functional as F

import gan
import rotation
import semisup


def implementation():
    path = os.environ.get("STUDENT")
    if not path:
        return types.SimpleNamespace(
            hinge_loss_d=gan.hinge_loss_d, hinge_loss_g=gan.hinge_loss_g,
            rotate_last=rotation.rotate_last, rotation_labels=rotation.rotation_labels,
            class_loss=semisup.class_loss)
    spec = importlib.util.spec_from_file_location("student", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


impl = implementation()


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])       # 1 - r: -1, 0.5, 2 -> clipped 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])       # 1 + f: -1, 1, 2   -> clipped 0, 1, 2
    assert float(impl.hinge_loss_d(real, fake)) == pytest.approx(2.5 / 3 + 3 / 3)
    assert float(impl.hinge_loss_g(fake)) == pytest.approx(1 / 3)


def test_rotate_last_uses_the_last_n_images_in_blocks():
    x = torch.arange(4 * 4).float().view(4, 1, 2, 2)     # four different 2x2 images
    out = impl.rotate_last(x, 2)
    assert out.shape == (6, 1, 2, 2)
    a = x[2, 0]                                           # [[8, 9], [10, 11]]
    by_hand_90 = torch.tensor([[9.0, 11.0], [8.0, 10.0]])  # counter-clockwise, as np.rot90
    assert torch.equal(out[0, 0], by_hand_90)
    assert torch.equal(out[2, 0], a.flip(0).flip(1))      # 180 degrees
    assert torch.equal(out[4, 0], by_hand_90.flip(0).flip(1))   # 270 = 90 + 180
    assert torch.equal(out[1, 0], torch.rot90(x[3, 0], 1))      # second image, same block


def test_rotation_labels_are_blocked_not_interleaved():
    labels = impl.rotation_labels(3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_class_loss_ignores_unlabeled_rows_and_is_zero_without_labels():
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([1, -1, 3, -1])
    expected = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    assert torch.allclose(impl.class_loss(logits, labels), expected)
    none = impl.class_loss(logits, torch.full((4,), -1))
    assert none.item() == 0.0 and not math.isnan(none.item())
    none.backward()                      # still part of the graph, with a zero gradient
    assert logits.grad is not None and not logits.grad.any()
