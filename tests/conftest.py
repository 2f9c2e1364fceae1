import os

import pytest
import torch

DATA = os.path.join(os.path.dirname(__file__), "data")
TINY_UNET_STEPS = 40  # enough tiny UNet steps for the diffusion loss to fall clearly (about 6 s on one CPU thread)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A tiny demo world trained once per session (demo.train --tiny on CPU): (weights folder, summary).

    Shared by tests/test_demo.py (the training), tests/test_quality.py and tests/test_world.py (the benches)."""
    from demo import train

    out = tmp_path_factory.mktemp("tiny_world")
    summary = train.main(["--tiny", "--device", "cpu", "--unet-steps", str(TINY_UNET_STEPS), "--out", str(out)])
    return out, summary


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory):
    """One classifier cache folder per session: bench.world and bench.quality train the tiny world's identity
    classifier once (bench.identity.load_or_train keys it by the VAE's tensors)."""
    return tmp_path_factory.mktemp("classifier_cache")
