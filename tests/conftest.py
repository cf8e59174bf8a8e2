import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # shared helpers such as bnb_oracle


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
