"""Shared test set-up: import the top-level modules and keep torch to one thread per test run."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)

DATA = os.path.join(ROOT, "data", "tiny-imagenet-10")


@pytest.fixture(scope="session")
def data_dir():
    return DATA
