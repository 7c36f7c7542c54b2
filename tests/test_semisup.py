"""The labeled subset, the co-training pieces and S2L pre-training (paper sec. 3.1-3.2)."""
import pytest
import torch
import torch.nn.functional as nnf

import semisup


def class_targets(sizes):
    """Targets with sizes[c] images of class c, interleaved like a shuffled dataset."""
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return targets[torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))]


# ---------------------------------------------------------------------------------------------
# labeled_subset


def test_subset_takes_the_fraction_of_every_class():
    targets = class_targets([500, 200, 45, 10])
    labels = semisup.labeled_subset(targets, 0.1, seed=0)
    assert labels.shape == targets.shape
    # round(0.1 * n) per class, with halves rounded up: 4.5 -> 5
    for c, expected in enumerate([50, 20, 5, 1]):
        assert int((labels == c).sum()) == expected
    kept = labels >= 0
    assert torch.equal(labels[kept], targets[kept])  # a kept label is the true one
    assert torch.all(labels[~kept] == -1)


def test_subset_is_seeded_and_ignores_the_global_rng():
    targets = class_targets([100, 100, 100])
    torch.manual_seed(1)
    a = semisup.labeled_subset(targets, 0.2, seed=5)
    torch.manual_seed(2)
    b = semisup.labeled_subset(targets, 0.2, seed=5)
    c = semisup.labeled_subset(targets, 0.2, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(semisup.labeled_subset(targets, 1.0, seed=3), targets)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_subset_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="--label-fraction"):
        semisup.labeled_subset(class_targets([10, 10]), fraction, seed=0)


def test_subset_names_the_smallest_fraction_that_labels_every_class():
    targets = class_targets([500, 20])
    with pytest.raises(ValueError, match=r"class 1 \(20 images\).*--label-fraction 0.025"):
        semisup.labeled_subset(targets, 0.02, seed=0)
    assert int((semisup.labeled_subset(targets, 0.025, seed=0) == 1).sum()) == 1


# ---------------------------------------------------------------------------------------------
# Co-training: class_loss, fill_labels, ClassifierHead


def test_class_loss_is_the_mean_ce_over_labeled_rows():
    logits = torch.randn(6, 4, requires_grad=True)
    labels = torch.tensor([2, -1, 0, -1, -1, 3])
    labeled = labels >= 0
    expected = nnf.cross_entropy(logits[labeled], labels[labeled])
    assert torch.allclose(semisup.class_loss(logits, labels), expected)
    # changing an unlabeled row's logits changes nothing
    other = logits.detach().clone()
    other[1] += 10
    assert torch.allclose(semisup.class_loss(other, labels), expected)


def test_class_loss_is_exactly_zero_without_labels_and_differentiable():
    head = semisup.ClassifierHead(8, 5)
    h = torch.randn(4, 8, requires_grad=True)
    loss = semisup.class_loss(head(h), torch.full((4,), -1))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.all(h.grad == 0)
    assert all(torch.all(p.grad == 0) for p in head.parameters() if p.grad is not None)


def test_classifier_head_is_spectrally_normalized():
    head = semisup.ClassifierHead(16, 10)
    head.train()
    for _ in range(30):  # power iterations converge
        head(torch.randn(2, 16))
    head.eval()
    with torch.no_grad():
        sigma = torch.linalg.matrix_norm(head.linear.weight, ord=2).item()
    assert sigma == pytest.approx(1.0, abs=0.05)


def test_fill_labels_hard_and_soft():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
                          requires_grad=True)
    labels = torch.tensor([-1, 2, -1])
    hard = semisup.fill_labels(logits, labels, 3)
    assert torch.equal(hard, torch.tensor([[0., 1., 0.], [0., 0., 1.], [0., 0., 1.]]))
    soft = semisup.fill_labels(logits, labels, 3, soft=True)
    assert torch.allclose(soft[0], logits[0].softmax(0))
    assert torch.equal(soft[1], torch.tensor([0., 0., 1.]))  # labeled rows stay one-hot
    assert torch.allclose(soft.sum(1), torch.ones(3))
    # the prediction is a constant for the projection: no gradient reaches the classifier
    assert not hard.requires_grad and not soft.requires_grad


def test_label_accuracy_skips_unknown_truth():
    truth = torch.tensor([0, 1, -1, 2])
    assert semisup.label_accuracy(torch.tensor([0, 2, 1, 2]), truth) == pytest.approx(2 / 3)
    logits = nnf.one_hot(torch.tensor([0, 1, 0, 0]), 3).float()
    assert semisup.label_accuracy(logits, truth) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# S2L pre-training (eq. 2) on a tiny synthetic set


class TinySet(torch.utils.data.Dataset):
    """ImageFolder-like: 24 random images of 3 classes at 8x8, in [-1, 1]."""

    classes = ["a", "b", "c"]

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(24, 3, 8, 8, generator=g) * 2 - 1
        self.targets = torch.arange(3).repeat(8).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def test_mixed_batches_are_one_labeled_to_three_unlabeled():
    labels = semisup.labeled_subset(torch.arange(4).repeat(10), 0.2, seed=0)
    labeled, unlabeled = semisup._pools(labels, labeled_only=False)
    batches = iter(semisup.MixedBatches(labeled, unlabeled, 2, 6, seed=0))
    seen = set()
    for _ in range(5):
        batch = torch.tensor(next(batches))
        assert torch.all(labels[batch[:2]] >= 0) and torch.all(labels[batch[2:]] == -1)
        seen.update(batch[:2].tolist())
    assert seen == set(labeled.tolist())  # the labeled pool is cycled through


def test_pretrain_s2l_runs_and_predicts(tmp_path):
    data = TinySet()
    labels = semisup.labeled_subset(data.targets, 0.25, seed=0)
    F, clf = semisup.pretrain_s2l(data, labels, steps=2, batch_size=8, arch="resnet18",
                                  resolution=8, log=None)
    predicted = semisup.predict_labels(F, clf, data, batch_size=16)
    assert predicted.shape == (24,) and predicted.dtype == torch.long
    assert predicted.min() >= 0 and predicted.max() < 3
    top1, top5 = semisup.evaluate(F, clf, data)
    assert 0 <= top1 <= top5 == 1.0  # 3 classes: the top 3 always hold the truth

    path = str(tmp_path / "s2l.pt")
    semisup.save_s2l(path, F, clf, {"arch": "resnet18", "resolution": 8})
    F2, clf2, meta = semisup.load_s2l(path, resolution=8)
    assert meta["num_classes"] == 3
    assert torch.equal(semisup.predict_labels(F2, clf2, data), predicted)
    with pytest.raises(ValueError, match="resolution"):
        semisup.load_s2l(path, resolution=16)


def test_labeled_only_baseline_runs():
    data = TinySet()
    labels = semisup.labeled_subset(data.targets, 0.25, seed=0)
    F, clf = semisup.pretrain_s2l(data, labels, steps=1, batch_size=4, resolution=8,
                                  log=None, labeled_only=True)
    assert clf(F(data.images[:2])).shape == (2, 3)
