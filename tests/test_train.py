"""The command line (train.py): outputs, exact resume, and clear errors for bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--resolution", "32", "--ch", "8", "--batch-size", "8", "--standing-batches", "1",
         "--log-every", "1", "--pretrain-steps", "2", "--pretrain-batch-size", "8",
         "--clusters", "3", "--f-arch", "resnet18"]


def make_folder(root, classes=3, per_class=8, size=40, mode="RGB"):
    """A tiny ImageFolder: each class a different colour, plus noise."""
    gen = torch.Generator().manual_seed(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            base = torch.zeros(size, size, 3)
            base[..., c % 3] = 0.7
            pixels = ((base + 0.3 * torch.rand(size, size, 3, generator=gen)) * 255).byte()
            img = Image.fromarray(pixels.numpy()).convert(mode)
            img.save(os.path.join(root, f"class{c}", f"{i}.png"))
    return str(root)


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


def run(folder, out, *extra):
    return train.main(["--data", folder, "--out", str(out), *SMALL, *extra])


def test_a_run_leaves_config_log_samples_and_checkpoint(folder, tmp_path):
    out = tmp_path / "run"
    run(folder, out, "--steps", "2", "--sample-every", "1")
    assert sorted(os.listdir(out / "samples")) == [
        "curves.png", "step0000000.png", "step0000001.png", "step0000002.png"]
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "biggan" and config["num_classes"] == 3
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert list(lines[0])[:3] == ["step", "loss_d", "loss_g"]
    assert all(torch.isfinite(torch.tensor(x["loss_d"])) for x in lines)
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["config"]["ch"] == 8
    assert {"G", "D", "G_ema", "opt_G", "opt_D", "labels", "rng"} <= set(ckpt)
    assert not os.path.exists(str(out / "ckpt.pt") + ".tmp")
    # A 3-row grid: one row per class, 8 columns of 32x32 images and 1-pixel padding.
    assert Image.open(out / "samples" / "step0000002.png").size == (8 * 33 + 1, 3 * 33 + 1)


@pytest.mark.parametrize("method", ["biggan", "s3gan_co"])
def test_resume_continues_exactly(folder, tmp_path, method):
    run(folder, tmp_path / "full", "--method", method, "--steps", "4")
    run(folder, tmp_path / "half", "--method", method, "--steps", "2")
    run(folder, tmp_path / "half", "--method", method, "--steps", "4")
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=False)
    half = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=False)
    for key in ("G", "D", "G_ema"):
        for name, value in full[key].items():
            assert torch.equal(value, half[key][name]), (key, name)


def test_grayscale_and_rgba_images_are_converted(tmp_path):
    make_folder(tmp_path / "d", classes=2, per_class=4, mode="L")
    make_folder(tmp_path / "d2", classes=2, per_class=4, mode="RGBA")
    for d in ("d", "d2"):
        data = train.RealImages(str(tmp_path / d), 32, show_progress=False)
        assert data.pixels.shape == (8, 3, 32, 32)


def test_a_truncated_image_is_skipped_with_a_warning(folder):
    bad = os.path.join(folder, "class1", "broken.png")
    with open(os.path.join(folder, "class1", "0.png"), "rb") as f:
        head = f.read(60)
    with open(bad, "wb") as f:
        f.write(head)
    with pytest.warns(UserWarning, match="broken.png"):
        data = train.RealImages(folder, 32, show_progress=False)
    assert len(data) == 24 and all("broken" not in p for p, _ in data.samples)


@pytest.mark.parametrize("args, message", [
    (["--data", "/no/such/folder"], "does not exist"),
    (["--resolution", "48"], "--resolution 48 is not supported"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--label-fraction", "0"], "--label-fraction must be in (0, 1]"),
    (["--label-fraction", "1.5"], "--label-fraction must be in (0, 1]"),
    (["--preset", "imagenet128"], "needs --data"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--eval-every", "5", "--eval-real", "/no/such/val"], "--eval-real /no/such/val is not"),
])
def test_bad_flags_give_clear_messages(args, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace("]", r"\]")):
        train.main(args + ["--steps", "1"] if "--steps" not in args else args)


def test_folder_without_classes_or_images(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no usable class folders"):
        run(str(tmp_path / "empty"), tmp_path / "o1", "--steps", "1")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "x.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning), pytest.raises(SystemExit, match="no readable images"):
        run(str(tmp_path / "junk"), tmp_path / "o2", "--steps", "1")


def test_label_fraction_too_small_for_a_class(folder, tmp_path):
    with pytest.raises(SystemExit, match="label-fraction"):
        run(folder, tmp_path / "o", "--method", "s2gan_co", "--label-fraction", "0.01",
            "--steps", "1")


def test_a_checkpoint_of_another_configuration_is_not_overwritten(folder, tmp_path):
    out = tmp_path / "run"
    run(folder, out, "--steps", "1")
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match=r"different run \(lr_g"):
        run(folder, out, "--steps", "2", "--lr-g", "0.001")
    assert (out / "ckpt.pt").read_bytes() == before


def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--data", str(tmp_path / "nope")],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_trains_nothing(folder, tmp_path, capsys):
    cfg = run(folder, tmp_path / "dry", "--method", "s3gan", "--dry-run")
    out = capsys.readouterr().out
    assert cfg["num_classes"] == 3 and "S2L pre-training" in out and "parameters" in out
    assert not (tmp_path / "dry").exists()


def test_eval_every_logs_a_frechet_distance(folder, tmp_path):
    out = tmp_path / "ev"
    run(folder, out, "--steps", "2", "--eval-every", "2", "--eval-samples", "16",
        "--eval-features", "rotation", "--eval-real", folder)
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    scored = [x for x in lines if "FD_rot" in x]
    assert len(scored) == 1 and scored[0]["step"] == 2 and scored[0]["FD_rot"] > 0
    assert "FID" not in scored[0]


def test_signal_saves_a_checkpoint_that_resumes(folder, tmp_path, monkeypatch):
    import signal
    out = tmp_path / "sig"
    original = train.gan.ema_update

    def send_sigterm(G_ema, G, step, *args):     # a scheduler pre-empts the job at step 2
        original(G_ema, G, step, *args)
        if step == 2:
            signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(train.gan, "ema_update", send_sigterm)
    run(folder, out, "--steps", "5")
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(train.gan, "ema_update", original)
    run(folder, out, "--steps", "5")
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 5


def test_curves_have_one_panel_per_kind_of_number(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [dict(step=s, loss_d=1.0 / s, loss_g=0.5) for s in (1, 2, 3)] + [
        dict(step=3, FD_rot=12.5)]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    train.plot_log(str(log), str(tmp_path / "curves.png"))
    # losses and FD_rot, no empty accuracy panel: two 5-inch panels at 80 dpi
    assert Image.open(tmp_path / "curves.png").size[0] == 2 * 5 * 80


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda, but torch sees no CUDA GPU"):
        train.parse_args(["--device", "cuda"])


def test_resume_refuses_another_pre_training_budget(folder, tmp_path):
    run(folder, tmp_path / "r", "--method", "clustering", "--steps", "1")
    with pytest.raises(SystemExit, match="pretrain_steps: checkpoint 2, now 3"):
        run(folder, tmp_path / "r", "--method", "clustering", "--steps", "2",
            "--pretrain-steps", "3")


def test_a_failed_evaluation_keeps_the_checkpoint(folder, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("unreadable real image x.png")
    monkeypatch.setattr(train.metrics, "evaluate", broken)
    with pytest.raises(SystemExit, match="evaluation at step 2 failed: unreadable real image"):
        run(folder, tmp_path / "e", "--steps", "2", "--eval-every", "2",
            "--eval-features", "rotation", "--eval-real", folder)
    assert torch.load(tmp_path / "e" / "ckpt.pt", weights_only=False)["step"] == 2
