"""The networks (paper sec. 4): parameter counts, shapes, spectral norm, conditioning."""
import pytest
import torch

import biggan


def test_parameter_counts_equal_the_official_code():
    # compare_gan's resnet_biggan.py docstring: 128x128, ch 96, 1000 classes; and 256x256.
    with torch.device("meta"):
        G, D = biggan.build_models(dict(resolution=128, ch=96, num_classes=1000))
        G256, D256 = biggan.build_models(dict(resolution=256, ch=96, num_classes=1000))
    assert biggan.count_parameters(G) == 70_433_988
    assert biggan.count_parameters(D) == 87_982_370
    assert biggan.count_parameters(G256) == 82_097_604
    assert biggan.count_parameters(D256) == 98_635_298


def test_architecture_matches_paper_at_128():
    with torch.device("meta"):
        G, D = biggan.build_models(dict(resolution=128, ch=96, num_classes=1000))
    assert G.z_dim == 120 and len(G.blocks) == 5
    assert [b.conv1.out_channels for b in G.blocks] == [1536, 768, 384, 192, 96]
    assert G.attn_after == 3 and G.attn.theta.in_channels == 192      # after B4, at 64x64
    assert D.attn_after == 0 and D.attn.theta.in_channels == 96       # after B1, at 64x64
    assert D.feat_dim == 1536 and D.blocks[-1].shortcut is None
    assert G.shared.weight.shape == (1000, 128)


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_output_shapes(resolution):
    torch.manual_seed(0)
    G, D = biggan.build_models(dict(resolution=resolution, ch=8, num_classes=5))
    z = torch.randn(2, G.z_dim)
    x = G(z, torch.tensor([0, 4]))
    assert x.shape == (2, 3, resolution, resolution)
    assert x.min() >= -1 and x.max() <= 1
    logit, h = D(x, torch.eye(5)[:2])
    assert logit.shape == (2,) and h.shape == (2, D.feat_dim)
    assert (h >= 0).all()       # ReLU, then sum pooling


def test_bad_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match="resolution 48 is not supported"):
        biggan.Generator(48)


def test_spectral_norm_bounds_the_largest_singular_value():
    torch.manual_seed(0)
    G, D = biggan.build_models(dict(resolution=32, ch=8, num_classes=3))
    x = torch.randn(4, 3, 32, 32)
    for _ in range(30):         # one power iteration per training-mode forward
        D(x, torch.zeros(4, 3))
    layers = [m for m in list(G.modules()) + list(D.modules())
              if hasattr(m, "parametrizations") and "weight" in m.parametrizations]
    assert len(layers) > 20
    for m in D.modules():
        if hasattr(m, "parametrizations"):
            sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
            assert 0.9 < sigma < 1.05, (m, sigma)
    # Every G and D weight is normalised, except G's shared embedding (as compare_gan).
    plain = [n for n, p in list(G.named_parameters()) + list(D.named_parameters())
             if p.dim() > 1 and "original" not in n]
    assert plain == ["shared.weight"]


def test_labels_change_the_generator_output():
    torch.manual_seed(0)
    G = biggan.Generator(32, 8, 4).eval()
    z = torch.randn(1, G.z_dim).repeat(4, 1)
    x = G(z, torch.arange(4))
    assert all((x[i] - x[j]).abs().max() > 1e-3 for i in range(4) for j in range(i))


def test_projection_is_linear_in_y_and_vanishes_for_no_label():
    torch.manual_seed(0)
    D = biggan.Discriminator(32, 8, 3).eval()
    h = D.features(torch.randn(2, 3, 32, 32))
    zero = D.score(h, torch.zeros(2, 3))
    assert torch.allclose(zero, D.fc(h).squeeze(1))
    e0, e1 = D.score(h, torch.eye(3)[[0, 0]]), D.score(h, torch.eye(3)[[1, 1]])
    soft = D.score(h, torch.tensor([[0.25, 0.75, 0.0]] * 2))
    assert torch.allclose(soft - zero, 0.25 * (e0 - zero) + 0.75 * (e1 - zero), atol=1e-5)


def test_summary_command(capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["biggan.py", "--resolution", "32", "--ch", "8",
                                     "--num-classes", "10"])
    biggan.main()
    out = capsys.readouterr().out
    assert "G: " in out and "D: " in out and "parameters" in out
