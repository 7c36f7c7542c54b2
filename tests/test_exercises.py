"""The commands of docs/exercises.md run as written (shrunk to a few steps on tiny data).

The page's numbers come from the full commands; these tests check that every command's flags
exist, that each setting has two seeds, and that one seed of each setting trains and ends with
an FD_rot line, as the page promises.
"""
import json
import os
import sys

import pytest
import torch

import rotation
import train
from test_train import SMALL, make_folder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "scripts"))
import exercises  # noqa: E402

VARIABLES, COMMANDS = exercises.read_page()
TRAIN = [(n, exercises.expand(c, VARIABLES)) for n, c in COMMANDS if "train.py" in c]
SEED0 = [(n, words) for n, words in TRAIN if exercises.flag(words, "--seed") == "0"]


def test_the_page_covers_six_exercises_each_with_two_seeds():
    assert {n for n, _ in TRAIN} == {1, 2, 3, 4, 5, 6}
    settings = {}
    for n, words in TRAIN:
        out = exercises.flag(words, "--out")
        settings.setdefault(out.rsplit("_", 1)[0], set()).add(exercises.flag(words, "--seed"))
    assert all(seeds == {"0", "1"} for seeds in settings.values()), settings
    outs = [exercises.flag(words, "--out") for _, words in TRAIN]
    assert len(set(outs)) == len(outs)


@pytest.mark.parametrize("words", [w for _, w in TRAIN], ids=lambda w: " ".join(w[2:6]))
def test_every_command_parses(words, monkeypatch):
    monkeypatch.chdir(exercises.ROOT)
    cfg = train.parse_args(words[2:])
    assert cfg["steps"] == 300 and cfg["eval_every"] == 300
    assert cfg["eval_features"] == "rotation:out/F_rot.pt"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny data folder and an F made by the page's own rotation.py command, shrunk."""
    root = tmp_path_factory.mktemp("ex")
    folder = make_folder(root / "data", classes=3, per_class=12)
    setup = [exercises.expand(c, VARIABLES) for n, c in COMMANDS if "rotation.py" in c]
    assert len(setup) == 1
    F_path = str(root / "F_rot.pt")
    rotation.main(setup[0][2:] + ["--data", folder, "--val", folder, "--steps", "2",
                                  "--batch-size", "8", "--out", F_path])
    return folder, F_path


@pytest.mark.parametrize("exercise,words", SEED0, ids=lambda x: x if isinstance(x, int) else
                         exercises.flag(x, "--out").split("/", 1)[1])
def test_one_seed_of_each_setting_trains_and_is_scored(exercise, words, small, tmp_path):
    folder, F_path = small
    out = tmp_path / "run"
    argv = [w.replace("out/F_rot.pt", F_path) for w in words[2:]]
    argv += [*SMALL, "--data", folder, "--out", str(out), "--steps", "2",
             "--eval-every", "2", "--eval-samples", "16"]
    cfg = train.main(argv)
    assert cfg["method"] == exercises.flag(words, "--method")
    assert cfg["soft_labels"] == ("--soft-labels" in words)
    result = exercises.summary(str(out))
    assert result["step"] == 2 and result["FD_rot"] > 0
    assert torch.isfinite(torch.tensor([result["loss_d"], result["loss_g"]])).all()


def test_the_table_groups_seeds_and_reports_the_mean(tmp_path, monkeypatch):
    monkeypatch.setattr(exercises, "ROOT", str(tmp_path))
    for seed, fd in (("0", 10.0), ("1", 14.0)):
        run = tmp_path / "out" / f"a_{seed}"
        run.mkdir(parents=True)
        lines = [dict(step=3, loss_d=1.0, loss_g=2.0, elapsed_s=5.0), dict(step=3, FD_rot=fd)]
        (run / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    commands = [(1, f"python train.py --seed {s} --out out/a_{s}") for s in "01"]
    commands.append((2, "python train.py --seed 0 --out out/b_0"))
    rows = exercises.table(commands, {}).splitlines()
    assert rows[2].startswith("| 1 | `out/a` | 0,1 | 12 (10 / 14) | 1 (1 / 1) | 2 (2 / 2) |")
    assert rows[3].startswith("| 2 | `out/b` | not run |")
