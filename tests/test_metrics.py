"""Tests for metrics.py: the FID/IS math, label accuracy, and the whole evaluation path with a
small stand-in feature network (the real Inception weights are not on this machine)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

import biggan
import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_stats(d, n, seed):
    """Mean and covariance of n random correlated samples in d dimensions."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))


# --------------------------------------------------------------------------------------------
# Frechet distance

def test_fid_of_a_set_with_itself_is_zero():
    mu, s = random_stats(32, 200, 0)
    assert metrics.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-8)


def test_fid_is_symmetric():
    a, b = random_stats(32, 200, 1), random_stats(32, 200, 2)
    assert metrics.frechet_distance(*a, *b) == pytest.approx(metrics.frechet_distance(*b, *a),
                                                             rel=1e-10)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_fid_matches_scipy_sqrtm(seed):
    a, b = random_stats(24, 100, seed), random_stats(24, 100, seed + 10)
    assert metrics.frechet_distance(*a, *b) == pytest.approx(scipy_fid(*a, *b), rel=1e-6)


def test_fid_with_a_precomputed_square_root():
    a, b = random_stats(16, 100, 9), random_stats(16, 100, 10)
    A = metrics.sqrt_psd(a[1])
    np.testing.assert_allclose((A @ A).numpy(), a[1], atol=1e-9)
    assert metrics.frechet_distance(*a, *b, sqrt_sigma1=A) == pytest.approx(
        metrics.frechet_distance(*a, *b), rel=1e-12)


def test_fid_of_a_pure_mean_shift_is_the_squared_shift():
    mu, s = random_stats(16, 100, 6)
    shift = np.arange(16) / 10
    assert metrics.frechet_distance(mu, s, mu + shift, s) == pytest.approx(shift @ shift,
                                                                           rel=1e-8)


def test_fid_of_singular_covariances_is_finite_and_matches_scipy():
    # Fewer samples than dimensions, as with a short run: both covariances are singular.
    a, b = random_stats(40, 20, 7), random_stats(40, 20, 8)
    fd = metrics.frechet_distance(*a, *b)
    assert np.isfinite(fd) and fd == pytest.approx(scipy_fid(*a, *b), rel=1e-5)


def test_running_moments_match_numpy():
    x = torch.randn(103, 7, dtype=torch.float64) * 3 + 5
    moments = metrics.RunningMoments()
    for batch in x.split(10):
        moments.update(batch.float() if batch.shape[0] == 3 else batch)
    mu, sigma = moments.result()
    np.testing.assert_allclose(mu, x.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Inception Score

def test_is_of_identical_predictions_is_one():
    logits = torch.randn(1, 10).repeat(50, 1)
    assert metrics.inception_score(logits)[0] == pytest.approx(1.0, abs=1e-9)


def test_is_of_confident_even_predictions_is_the_class_count():
    k = 7
    logits = 100.0 * torch.eye(k).repeat(6, 1)   # each sample sure of one class, all classes even
    assert metrics.inception_score(logits)[0] == pytest.approx(k, rel=1e-9)


def test_is_with_splits():
    # Even predictions in every split: each split scores k, so the std over splits is 0.
    mean, std = metrics.inception_score(100.0 * torch.eye(5).repeat(10, 1), splits=10)
    assert mean == pytest.approx(5, rel=1e-9) and std == pytest.approx(0, abs=1e-9)

    # Random logits: one split differs from ten, and ten match torch-fidelity's unshuffled IS.
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(103, 12) * 3
    ref = isc_features_to_metric(logits, splits=10, shuffle=False)
    mean, std = metrics.inception_score(logits, splits=10)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-7)
    assert metrics.inception_score(logits)[0] != pytest.approx(mean, rel=1e-3)
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(logits[:5], splits=10)


# --------------------------------------------------------------------------------------------
# Label accuracy

def test_label_accuracy_direct_and_by_clusters():
    truth = torch.tensor([0, 0, 0, 1, 1, 2, 2, -1])
    pred = torch.tensor([0, 1, 0, 1, 1, 2, 0, 2])
    assert metrics.label_accuracy(pred, truth) == pytest.approx(5 / 7)   # -1 truth left out

    # Clusters 5 -> class 0 (2 of 3), 3 -> class 1 (2 of 2), 9 -> class 2 (2 of 2): 6 of 7.
    clusters = torch.tensor([5, 5, 3, 3, 3, 9, 9, 9])
    truth = torch.tensor([0, 0, 1, 1, 0, 2, 2, -1])
    assert metrics.label_accuracy(clusters, truth, clusters=True) == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="all -1"):
        metrics.label_accuracy(pred, torch.full((8,), -1))


# --------------------------------------------------------------------------------------------
# The whole path: checkpoint -> samples -> features -> statistics -> numbers

class StandIn(torch.nn.Module):
    """A tiny fixed network in place of Inception: uint8 images -> (features, logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))
        return h, self.fc(h)


def stand_in_space():
    return metrics.FeatureSpace(StandIn(), "stand-in", "FID", has_logits=True)


@pytest.fixture
def real_dir(tmp_path):
    """12 non-square random images in two class folders (centre crop + resize is exercised)."""
    rng = np.random.default_rng(0)
    for i in range(12):
        folder = tmp_path / "real" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return str(tmp_path / "real")


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint in train.py's format holding a tiny G (resolution 32, ch 8, 3 classes)."""
    torch.manual_seed(0)
    cfg = dict(resolution=32, ch=8, num_classes=3, method="biggan", seed=0)
    G = biggan.Generator(cfg["resolution"], cfg["ch"], cfg["num_classes"])
    path = str(tmp_path / "run" / "ckpt.pt")
    os.makedirs(os.path.dirname(path))
    torch.save(dict(config=cfg, G_ema=G.state_dict(), step=7), path)
    return path


def test_evaluate_from_checkpoint_writes_and_reuses_the_real_cache(ckpt, real_dir, tmp_path,
                                                                   monkeypatch):
    G, _ = metrics.load_generator(ckpt)
    assert (G.resolution, G.num_classes) == (32, 3)
    G.train()
    cache = str(tmp_path / "cache")
    kwargs = dict(feature_space=stand_in_space(), num_samples=16, fake_sets=2, batch_size=8,
                  cache_dir=cache, progress=False)

    first = metrics.evaluate(G, 3, real_dir, **kwargs)
    assert first["FID"] > 0 and np.isfinite(first["FID"]) and len(first["FID_sets"]) == 2
    assert first["FID"] == pytest.approx(np.mean(first["FID_sets"]))
    assert 1 <= first["IS"] <= 4 and len(first["IS_sets"]) == 2
    assert first["FID_sets"][0] != first["FID_sets"][1]   # each set has its own noise
    assert first["num_real"] == 12
    assert G.training                                     # G comes back in its own mode
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].startswith("real-32px-12-")

    # Second call: same numbers, and the real images are not read again.
    def no_reading(*args):
        raise AssertionError("real images read despite the cache")

    monkeypatch.setattr(metrics.RealImages, "__getitem__", no_reading)
    second = metrics.evaluate(G, 3, real_dir, **kwargs)
    assert second["FID_sets"] == first["FID_sets"] and second["IS_sets"] == first["IS_sets"]

    # Another real-image count is another cache entry.
    monkeypatch.undo()
    metrics.evaluate(G, 3, real_dir, num_real=10, **kwargs)
    assert len(os.listdir(cache)) == 2


def test_evaluate_can_recompute_standing_statistics(real_dir, tmp_path):
    torch.manual_seed(0)
    G = biggan.Generator(32, 8, 3).eval()
    before = G.bn_out.running_var.clone()
    results = metrics.evaluate(G, 3, real_dir, stand_in_space(), num_samples=8, fake_sets=1,
                               batch_size=8, standing_batches=2, cache_dir=str(tmp_path),
                               progress=False)
    assert not torch.equal(G.bn_out.running_var, before) and not G.training
    assert np.isfinite(results["FID"])


def test_real_images_are_centre_cropped_and_resized(real_dir):
    images = metrics.RealImages(real_dir, 16)
    assert len(images) == 12
    x = images[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="has 12 images"):
        metrics.RealImages(real_dir, 16, count=13)
    with open(images.files[0], "r+b") as f:     # truncated: real statistics must not skip it
        f.truncate(60)
    with pytest.raises(ValueError, match="unreadable real image .*0.png"):
        images[0]


def test_a_file_that_is_no_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a file that torch can read"):
        metrics.load_generator(str(tmp_path / "x.pt"))
    torch.save({"meta": {}}, tmp_path / "y.pt")
    with pytest.raises(ValueError, match="is not a train.py checkpoint"):
        metrics.load_generator(str(tmp_path / "y.pt"))


def test_inception_path_with_random_weights(tmp_path, monkeypatch):
    """torch-fidelity's Inception, loaded from a weights file, end to end (random weights stand
    in for the real file, which is not on this machine)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    assert metrics.INCEPTION_URL == tfi.URL_INCEPTION_V3

    # Write a weights file in the right format without loading or downloading anything.
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = str(tmp_path / metrics.INCEPTION_FILE)
    torch.save(net.state_dict(), weights)
    monkeypatch.undo()

    # From here on, any download attempt fails the test.
    def no_download(*args, **kwargs):
        raise AssertionError("attempted a download")

    monkeypatch.setattr(tfi, "load_state_dict_from_url", no_download)
    space = metrics.load_feature_space("inception", inception_weights=weights)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features, logits = space(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)

    # Same numbers as torch-fidelity's own pool_3 and unbiased logits.
    reference = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=weights)
    pool, unbiased = reference(images)
    torch.testing.assert_close(features, pool)
    torch.testing.assert_close(logits.float(), unbiased, rtol=1e-4, atol=1e-4)

    # The same file is found in torch-fidelity's cache under $TORCH_HOME.
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    os.link(weights, checkpoints / metrics.INCEPTION_FILE)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert metrics.find_inception_weights() == str(checkpoints / metrics.INCEPTION_FILE)

    # Generated images -> uint8 -> Inception -> float64 statistics and IS logits.
    torch.manual_seed(0)
    G = biggan.Generator(32, 8, 3).eval()
    mu, sigma, logits = metrics.fake_statistics(space, G, 3, 4, 4, 0, "cpu", progress=False)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and sigma.dtype == np.float64
    assert logits.shape == (4, 1008) and metrics.inception_score(logits)[0] >= 1


# --------------------------------------------------------------------------------------------
# The command line

def test_cli_without_inception_weights_exits_with_instructions(ckpt, real_dir, tmp_path):
    torch_home = tmp_path / "empty_torch_home"
    torch_home.mkdir()
    env = dict(os.environ, TORCH_HOME=str(torch_home))
    proc = subprocess.run([sys.executable, "metrics.py", "--ckpt", ckpt, "--real", real_dir],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert metrics.INCEPTION_FILE in proc.stderr and metrics.INCEPTION_URL in proc.stderr
    assert str(torch_home / "hub" / "checkpoints") in proc.stderr
    assert "--inception-weights" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(torch_home) == []   # nothing was downloaded


def test_cli_bad_inputs_exit_clearly(ckpt, real_dir, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        metrics.main(["--ckpt", str(tmp_path / "none.pt"), "--real", real_dir])
    with pytest.raises(SystemExit, match="no such folder"):
        metrics.main(["--ckpt", ckpt, "--real", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="inception-weights"):
        metrics.main(["--ckpt", ckpt, "--real", real_dir,
                      "--inception-weights", str(tmp_path / "none.pth")])
    with pytest.raises(SystemExit, match="rotation:PATH"):
        metrics.main(["--ckpt", ckpt, "--real", real_dir, "--features", "vgg"])


def test_cli_rotation_features_report_fd_rot(ckpt, real_dir, tmp_path, monkeypatch, capsys):
    """The offline feature space is named FD_rot, never FID, and has no IS."""
    import rotation

    f_path = str(tmp_path / "F.pt")
    torch.manual_seed(0)
    F = rotation.build_feature_extractor("resnet18", 32)
    rotation.save_feature_extractor(F, f_path, dict(arch="resnet18", resolution=32))

    out = str(tmp_path / "metrics.json")
    metrics.main(["--ckpt", ckpt, "--real", real_dir, "--features", f"rotation:{f_path}",
                  "--num-samples", "8", "--fake-sets", "1", "--batch-size", "8",
                  "--workers", "0", "--cache-dir", str(tmp_path / "cache"), "--out", out])
    printed = capsys.readouterr().out
    assert "FD_rot" in printed and "FID" not in printed and "IS " not in printed
    results = json.load(open(out))
    assert results["FD_rot"] >= 0 and "FID" not in results and "IS" not in results
    assert results["step"] == 7 and results["config"]["ch"] == 8
