"""Every row of the method table trains from the command line, pre-training stages included."""
import json

import pytest
import torch

import train
from test_train import SMALL, make_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("data"), classes=3, per_class=12)


@pytest.mark.parametrize("method", list(train.METHODS))
def test_two_step_smoke_run(method, folder, tmp_path):
    out = tmp_path / method
    cfg = train.main(["--data", folder, "--out", str(out), "--method", method, *SMALL,
                      "--steps", "2", "--label-fraction", "0.25"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(x["loss_d"])) for x in log)
    spec = train.METHODS[method]
    assert ("loss_rot_d" in log[-1]) == spec.get("rotation", False)
    assert ("acc_rot_fake" in log[-1]) == spec.get("rotation", False)
    assert ("loss_cls" in log[-1]) == spec.get("cotrain", False)
    # the accuracy of the labels D is given for unlabeled images, where such labels exist
    assert ("acc_labels" in log[-1]) == (spec["labels"] in ("partial", "s2l"))
    if "acc_labels" in log[-1]:
        assert 0 <= log[-1]["acc_labels"] <= 1
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    labels = ckpt["labels"]
    if spec["labels"] == "partial":
        assert (labels == -1).sum() == 27 and (labels >= 0).sum() == 9    # 3 of 12 per class
    if spec["labels"] == "constant":
        assert cfg["num_classes"] == 1 and (labels == 0).all()
    if spec["labels"] == "cluster":
        assert cfg["num_classes"] == 3 and labels.max() < 3
        assert len(list(out.glob("clusters-*.pt"))) == 1 and len(list(out.glob("F_rot-*.pt")))
    if spec["labels"] == "s2l":
        assert len(list(out.glob("s2l-*.pt"))) == 1


def test_biggan_k_trains_on_the_labeled_images_only(folder, tmp_path, monkeypatch):
    seen = []
    original = train.Batches.__next__

    def spy(self):
        images, index = original(self)
        seen.append(index)
        return images, index
    monkeypatch.setattr(train.Batches, "__next__", spy)
    train.main(["--data", folder, "--out", str(tmp_path / "k"), "--method", "biggan_k",
                *SMALL, "--batch-size", "4", "--steps", "3", "--label-fraction", "0.5"])
    labels = torch.load(tmp_path / "k" / "ckpt.pt", weights_only=False)["labels"]
    index = torch.cat(seen)
    assert (labels[index] >= 0).all() and len(set(index.tolist())) <= 18


def test_pretraining_stages_are_cached(folder, tmp_path):
    args = ["--data", folder, "--out", str(tmp_path / "c"), "--method", "clustering", *SMALL]
    train.main(args + ["--steps", "1"])
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*-*.pt")}
    train.main(args + ["--steps", "2"])
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*-*.pt")}


@pytest.mark.parametrize("args, message", [
    (["--method", "s3gan_co", "--rotated-fraction", "3"], "--rotated-fraction 3"),
    (["--method", "clustering", "--clusters", "1"], "--clusters must be between 2"),
    (["--method", "clustering", "--clusters", "1000"], "--clusters must be between 2"),
    (["--method", "clustering", "--f-checkpoint", "/no/F.pt"], "no feature extractor"),
    (["--method", "s3gan_co", "--batch-size", "12"], "--rotated-fraction 2 does not fit"),
    (["--method", "s2gan", "--label-fraction", "0.01"], "leaves class 0"),
])
@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_bad_method_flags(args, message, dry, folder, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(["--data", folder, "--out", str(tmp_path / "x"), *SMALL, "--steps", "1",
                    *args, *dry])
    assert not (tmp_path / "x").exists()     # refused before anything was written
