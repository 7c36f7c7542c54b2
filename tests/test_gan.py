"""The game (paper sec. 2-3): hinge losses, EMA, standing statistics, one step of every method."""
import math

import pytest
import torch

import biggan
import gan
import train


def test_hinge_losses_on_hand_computed_logits():
    real = torch.tensor([2.0, 0.5, -1.0])        # max(0, 1 - r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])        # max(0, 1 + f) = 0, 1, 2     -> mean 1
    assert gan.hinge_loss_d(real, fake).item() == pytest.approx(5 / 6 + 1)
    assert gan.hinge_loss_g(fake).item() == pytest.approx(1 / 3)


def test_one_hot_gives_zero_rows_for_unlabeled():
    y = gan.one_hot(torch.tensor([2, -1, 0]), 3)
    assert torch.equal(y, torch.tensor([[0., 0, 1], [0, 0, 0], [1, 0, 0]]))


def test_ema_copies_before_start_and_averages_after():
    G = torch.nn.Linear(2, 1, bias=False)
    G_ema = gan.make_ema(G)
    with torch.no_grad():
        G.weight.fill_(1.0)
    gan.ema_update(G_ema, G, step=5, decay=0.9, start=10)       # before start: a copy
    assert torch.allclose(G_ema.weight, torch.ones(1, 2))
    with torch.no_grad():
        G.weight.fill_(3.0)
    gan.ema_update(G_ema, G, step=10, decay=0.9, start=10)      # 0.9 * 1 + 0.1 * 3
    assert torch.allclose(G_ema.weight, torch.full((1, 2), 1.2))
    assert not G_ema.weight.requires_grad


def test_standing_stats_average_the_batch_statistics():
    torch.manual_seed(0)
    G = biggan.Generator(32, 8, 3)
    bn = G.bn_out
    means = []
    hook = bn.register_forward_hook(lambda m, i, o: means.append(i[0].mean(dim=(0, 2, 3))))
    sampler = train.label_sampler(3, None)
    gan.standing_stats(G, num_batches=4, batch_size=8, sample_labels=sampler, seed=1)
    hook.remove()
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert not G.training and bn.momentum == 0.1
    # A private generator: the global random stream is untouched and the result repeatable.
    state = torch.get_rng_state()
    gan.standing_stats(G, num_batches=4, batch_size=8, sample_labels=sampler, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)


@pytest.mark.parametrize("method", list(train.METHODS))
def test_one_training_step_per_method(method):
    torch.manual_seed(0)
    spec = train.METHODS[method]
    K = 1 if spec["labels"] == "constant" else 4
    ing = gan.Ingredients(**{k: v for k, v in spec.items() if k != "labels"})
    ing.rotated_n = 2 if ing.rotation else 0
    G, D = biggan.build_models(dict(resolution=32, ch=8, num_classes=K))
    D = gan.DiscriminatorWithHeads(D, ing)
    opt_G = torch.optim.Adam(G.parameters(), 1e-4, betas=(0.0, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), 1e-4, betas=(0.0, 0.999))
    bs = 8
    real = torch.rand(bs, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, -1, 1, -1, 2, -1, 3, -1]) if ing.cotrain else torch.zeros(bs).long()
    y_f = torch.randint(K, (bs,))
    before = [p.detach().clone() for p in D.parameters()]
    [(out, parts)] = gan.d_step(G, D, opt_D, [(real, labels, torch.randn(bs, G.z_dim), y_f)],
                                 ing)
    assert all(math.isfinite(v.item()) for v in parts.values())
    assert ("loss_rot_d" in parts) == ing.rotation and ("loss_cls" in parts) == ing.cotrain
    assert any(not torch.equal(a, b) for a, b in zip(before, D.parameters()))
    before_D = [p.detach().clone() for p in D.parameters()]
    [(out, parts)] = gan.g_step(G, D, opt_G, [(torch.randn(bs, G.z_dim), y_f)], ing)
    assert all(math.isfinite(v.item()) for v in parts.values())
    assert ("loss_rot_g" in parts) == ing.rotation
    # The G step leaves D's weights alone and computes no gradient for them.
    assert all(torch.equal(a, b) for a, b in zip(before_D, D.parameters()))
    assert all(p.requires_grad for p in D.parameters())


def test_d_batch_with_rotations_has_2bs_plus_6n_rows():
    ing = gan.Ingredients(rotation=True, rotated_n=2)
    D = gan.DiscriminatorWithHeads(biggan.Discriminator(32, 8, 3), ing)
    seen = []
    D.D.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = D(torch.randn(8, 3, 32, 32), torch.zeros(8).long(),
            torch.randn(8, 3, 32, 32), torch.zeros(8).long())
    assert seen == [2 * 8 + 6 * 2]
    assert out["real_logit"].shape == (8,) and out["real_rot_logits"].shape == (8, 4)


def test_single_label_has_no_projection():
    ing = gan.Ingredients(project=False)
    torch.manual_seed(0)
    D = gan.DiscriminatorWithHeads(biggan.Discriminator(32, 8, 1), ing).eval()
    x = torch.randn(2, 3, 32, 32)
    out = D(x, torch.zeros(2).long())
    assert torch.allclose(out["real_logit"], D.D.fc(D.D.features(x)).squeeze(1))


def test_cotraining_fills_unlabeled_rows_with_the_head_prediction():
    ing = gan.Ingredients(cotrain=True)
    torch.manual_seed(0)
    D = gan.DiscriminatorWithHeads(biggan.Discriminator(32, 8, 5), ing).eval()
    labels = torch.tensor([3, -1, -1])
    out = D(torch.randn(3, 3, 32, 32), labels)
    y = out["real_y"]
    assert torch.equal(y[0], torch.eye(5)[3])
    assert torch.equal(y[1:], torch.eye(5)[out["cls_logits"][1:].argmax(1)])
    assert not y.requires_grad


def test_accumulated_micro_batches_average_the_gradient():
    """Two micro-batches of 4 give the gradient of one batch of 8 (D has no BatchNorm)."""
    torch.manual_seed(0)
    ing = gan.Ingredients()
    G = biggan.Generator(32, 8, 3).eval()       # eval: the fakes do not depend on the split
    # eval: no power iteration, which would otherwise run once per micro-batch.
    D = gan.DiscriminatorWithHeads(biggan.Discriminator(32, 8, 3), ing).eval()
    real, labels = torch.randn(8, 3, 32, 32), torch.randint(3, (8,))
    z, y_f = torch.randn(8, G.z_dim), torch.randint(3, (8,))
    grads = []
    for split in ([slice(0, 8)], [slice(0, 4), slice(4, 8)]):
        D_copy = __import__("copy").deepcopy(D)
        opt = torch.optim.SGD(D_copy.parameters(), lr=0.0)
        gan.d_step(G, D_copy, opt, [(real[s], labels[s], z[s], y_f[s]) for s in split], ing)
        grads.append([p.grad.clone() for p in D_copy.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)    # float32 summation order
