"""Tests for rotation.py: the official rotation batching (sec. 3.3) and pre-training of F (eq. 1).

Run: python -m pytest tests/test_rotation.py -v
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import rotation


def test_rot90_is_counter_clockwise_like_numpy_and_compare_gan():
    x = torch.arange(1, 10.0).view(1, 1, 3, 3)
    by_hand = {1: [[3, 6, 9], [2, 5, 8], [1, 4, 7]],
               2: [[9, 8, 7], [6, 5, 4], [3, 2, 1]],
               3: [[7, 4, 1], [8, 5, 2], [9, 6, 3]]}

    # compare_gan utils.rotate_images: 90 = flip_ud(transpose), 180 = flip_lr(flip_ud),
    # 270 = transpose(flip_ud), with H, W at dims 2, 3
    transpose = lambda t: t.transpose(2, 3)  # noqa: E731
    flip_ud = lambda t: t.flip(2)  # noqa: E731
    official = {1: flip_ud(transpose(x)), 2: flip_ud(x).flip(3), 3: transpose(flip_ud(x))}

    for k in (1, 2, 3):
        rotated = torch.rot90(x, k, dims=(2, 3))
        assert rotated[0, 0].tolist() == by_hand[k]
        assert np.array_equal(rotated[0, 0].numpy(), np.rot90(x[0, 0].numpy(), k))
        assert torch.equal(rotated, official[k])


def test_rotate_last_takes_the_last_n_images_in_blocked_order():
    x = torch.randn(5, 3, 4, 4)
    out = rotation.rotate_last(x, 2)
    assert out.shape == (6, 3, 4, 4)
    for block, k in enumerate((1, 2, 3)):
        assert torch.equal(out[2 * block:2 * block + 2], torch.rot90(x[3:], k, dims=(2, 3)))


def test_rotation_labels_are_blocked_not_interleaved():
    labels = rotation.rotation_labels(3)
    assert labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert labels.dtype == torch.long
    assert not torch.equal(labels, torch.arange(4).repeat(3))


@pytest.mark.parametrize("fraction, n", [(1, 4), (2, 2), (4, 1)])
def test_merge_gives_2bs_plus_6n_rows_and_split_inverts_it(fraction, n):
    bs = 16
    assert rotation.rotated_count(bs, fraction) == n

    # Image i of the real batch is constant i, of the fake batch constant 100 + i, with a
    # marked corner so that a rotation is visible
    real = torch.arange(bs, dtype=torch.float).view(bs, 1, 1, 1).expand(bs, 3, 4, 4).clone()
    fake = real + 100
    real[:, :, 0, 0] = fake[:, :, 0, 0] = -1
    x_D = rotation.merge_with_rotations(real, fake, n)
    assert x_D.shape[0] == 2 * bs + 6 * n

    real_rows, real_rot, fake_rows, fake_rot = rotation.split_rotations(x_D, bs, n)
    assert torch.equal(real_rows, real) and torch.equal(fake_rows, fake)

    # Undoing each row's labelled rotation gives back the image it came from: row j is a
    # copy of the j % n-th of the last n images
    labels = rotation.rotation_labels(n)
    for rows, source in ((real_rot, real[-n:]), (fake_rot, fake[-n:])):
        assert rows.shape[0] == 4 * n
        for j, r in enumerate(labels.tolist()):
            assert torch.equal(torch.rot90(rows[j], -r, dims=(1, 2)), source[j % n])


def test_labels_are_tiled_like_the_images():
    bs, n = 8, 2
    real = torch.arange(bs, dtype=torch.float).view(bs, 1, 1, 1).expand(bs, 3, 2, 2)
    fake = real + 100
    y_real, y_fake = torch.arange(bs), torch.arange(bs) + 100
    x_D = rotation.merge_with_rotations(real, fake, n)
    y_D = rotation.merge_labels_with_rotations(y_real, y_fake, n)
    assert torch.equal(x_D[:, 0, 0, 0].long(), y_D)

    # (B, K) label matrices tile the same way
    Y = rotation.merge_labels_with_rotations(torch.eye(bs), torch.eye(bs), n)
    assert Y.shape == (2 * bs + 6 * n, bs)
    assert torch.equal(Y.argmax(1), y_D % 100)


def test_split_works_on_features_and_checks_row_count():
    bs, n = 8, 1
    h = torch.randn(2 * bs + 6 * n, 5)
    parts = rotation.split_rotations(h, bs, n)
    assert [p.shape[0] for p in parts] == [bs, 4 * n, bs, 4 * n]
    assert torch.equal(parts[1], h[bs - n:bs + 3 * n])
    with pytest.raises(ValueError, match="rows"):
        rotation.split_rotations(h[:-1], bs, n)


def test_rotation_loss_perfect_head_is_zero_and_uniform_head_is_log4():
    labels = rotation.rotation_labels(5)
    perfect = 50.0 * torch.nn.functional.one_hot(labels, 4).float()
    assert rotation.rotation_loss(perfect, labels).item() < 1e-6
    assert rotation.rotation_accuracy(perfect, labels) == 1.0
    uniform = torch.zeros(20, 4)
    assert rotation.rotation_loss(uniform, labels).item() == pytest.approx(math.log(4))


@pytest.mark.parametrize("bs, fraction", [(64, 3), (8, 4), (64, 0), (6, 1), (64, 2.0)])
def test_rotated_count_rejects_fractions_that_do_not_divide(bs, fraction):
    with pytest.raises(ValueError, match="--rotated-fraction") as err:
        rotation.rotated_count(bs, fraction)
    if bs == 64:
        assert "[1, 2, 4, 8, 16]" in str(err.value)


def test_rotation_head_is_spectrally_normalised_linear_to_4_logits():
    head = rotation.RotationHead(12)
    assert head(torch.randn(3, 12)).shape == (3, 4)
    assert torch.nn.utils.parametrize.is_parametrized(head.linear, "weight")


def test_lr_schedule_warms_up_then_decays_at_45_and_55_of_65():
    lr = [rotation.lr_multiplier(step, 65) for step in range(65)]
    assert lr[0] == pytest.approx(1 / 5) and lr[4] == 1.0
    assert lr[44] == 1.0 and lr[45] == pytest.approx(0.1)
    assert lr[54] == pytest.approx(0.1) and lr[55] == pytest.approx(0.01)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Two classes of four random 20x20 RGB PNGs (centre-cropped/resized to 16 by the tests)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return str(root)


def test_image_folder_is_rgb_in_minus1_1_at_the_resolution(tiny_folder):
    ds = rotation.image_folder(tiny_folder, 16)
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
    with pytest.raises(ValueError, match="does not exist"):
        rotation.image_folder(tiny_folder + "/missing", 16)


@pytest.mark.parametrize("arch, stem_stride", [("resnet18", 2), ("resnet18_cifar", 1)])
def test_feature_extractor_maps_images_to_feat_dim(arch, stem_stride):
    F = rotation.build_feature_extractor(arch, 16).eval()
    assert F.conv1.stride == (stem_stride, stem_stride) and F.feat_dim == 512
    assert F(torch.zeros(2, 3, 16, 16)).shape == (2, 512)
    with pytest.raises(ValueError, match="unknown arch"):
        rotation.build_feature_extractor("vgg", 16)


def test_pretrain_a_few_steps_gives_F_with_features(tiny_folder):
    ds = rotation.image_folder(tiny_folder, 16, train=True)
    lines = []
    F, c_R = rotation.pretrain_rotation(ds, steps=2, batch_size=4, resolution=16,
                                        log=lines.append, log_every=1, device="cpu",
                                        return_head=True)
    assert F.feat_dim == 512 and not F.training
    assert F(torch.zeros(2, 3, 16, 16)).shape == (2, 512)
    assert c_R(F(torch.zeros(2, 3, 16, 16))).shape == (2, 4)
    assert len(lines) == 2 and "rot acc" in lines[-1]
    assert 0 <= rotation.evaluate_rotation(F, c_R, ds) <= 1
    with pytest.raises(ValueError, match="batch"):
        rotation.pretrain_rotation(ds, steps=1, batch_size=16, resolution=16)


def test_pretrain_under_a_one_process_torch_distributed_world(tiny_folder, tmp_path):
    ds = rotation.image_folder(tiny_folder, 16, train=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                            world_size=1)
    try:
        F = rotation.pretrain_rotation(ds, steps=1, batch_size=4, resolution=16,
                                       log=lambda line: None, device="cpu")
    finally:
        dist.destroy_process_group()
    assert F(torch.zeros(1, 3, 16, 16)).shape == (1, 512)


def test_extract_features_save_load_roundtrip_and_wrong_resolution(tiny_folder, tmp_path):
    ds = rotation.image_folder(tiny_folder, 16)
    F = rotation.build_feature_extractor("resnet18", 16)
    F.train()
    features = rotation.extract_features(F, ds, batch_size=3)
    assert features.shape == (8, 512) and F.training  # eval inside, mode restored after

    path = str(tmp_path / "sub" / "F.pt")
    rotation.save_feature_extractor(F, path, {"steps": 7, "data": tiny_folder})
    G = rotation.load_feature_extractor(path, resolution=16)
    assert G.meta["steps"] == 7 and G.meta["arch"] == "resnet18" and G.resolution == 16
    assert torch.allclose(rotation.extract_features(G, ds, batch_size=8), features)

    with pytest.raises(ValueError, match="pre-trained at 16x16"):
        rotation.load_feature_extractor(path, resolution=32)
    ckpt = torch.load(path)
    ckpt["meta"]["arch"] = "resnet18_cifar"  # a file whose weights do not fit its arch
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="pre-train F again"):
        rotation.load_feature_extractor(path)
    with pytest.raises(ValueError, match="no feature extractor"):
        rotation.load_feature_extractor(str(tmp_path / "nothing.pt"))

    # files that are not an F: garbage bytes, and another torch file (semisup.py's S2L model)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a file that torch can read"):
        rotation.load_feature_extractor(str(tmp_path / "garbage.pt"))
    torch.save({"F": {}, "clf": {}, "meta": {}}, tmp_path / "s2l.pt")
    with pytest.raises(ValueError, match="not a feature extractor written by rotation.py"):
        rotation.load_feature_extractor(str(tmp_path / "s2l.pt"))


def test_an_unreadable_image_becomes_grey_with_a_warning(tiny_folder, tmp_path):
    import shutil
    folder = tmp_path / "data"
    shutil.copytree(tiny_folder, folder)
    first = sorted((folder / sorted(os.listdir(folder))[0]).iterdir())[0]
    first.write_bytes(first.read_bytes()[:60])      # truncated
    ds = rotation.image_folder(str(folder), 16)
    with pytest.warns(UserWarning, match=first.name):
        x, _ = ds[0]
    assert len(ds) == 8 and torch.allclose(x, torch.full_like(x, 128 / 255 * 2 - 1), atol=1e-6)


def test_cli_rejects_a_missing_data_folder(tmp_path):
    with pytest.raises(SystemExit, match="bad --data"):
        rotation.main(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "F.pt")])
