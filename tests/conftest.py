"""Shared fixtures. ``FQVIT_TEST_DEVICE=cuda`` runs the model-building tests on a GPU
(``benchmarks/gpu_check.sh``); the default is the CPU."""
import os

import pytest
import torch


def test_device() -> torch.device:
    dev = torch.device(os.environ.get('FQVIT_TEST_DEVICE', 'cpu'))
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise RuntimeError('FQVIT_TEST_DEVICE=cuda but torch.cuda.is_available() is False')
    return dev


test_device.__test__ = False  # a helper, not a test


@pytest.fixture
def device() -> torch.device:
    """The device model-building tests run on."""
    return test_device()
