import os
import tempfile
from pathlib import Path

import pytest

from tests.tiny import save_tiny

# Set before anything imports huggingface_hub, which reads these once: no test touches the
# network or the user's Hugging Face cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="moetool-hf-home-")
os.environ.pop("HF_HUB_CACHE", None)
os.environ["COLUMNS"] = "120"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, fused=False) -> folder of that family's tiny model, saved once per session."""
    root = tmp_path_factory.mktemp("tiny")
    made: dict[tuple[str, bool], Path] = {}

    def get(family: str, fused: bool = False) -> Path:
        key = (family, fused)
        if key not in made:
            made[key] = save_tiny(family, root / f"{family}-{'fused' if fused else 'hub'}", fused=fused)
        return made[key]

    return get


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)

