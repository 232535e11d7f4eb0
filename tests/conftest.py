import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n auto: one worker per core; torch's default pool (one thread per core) in every worker would
    # spin against each other (README#speed: 5-15x slower small-batch inference on busy cores)
    import torch

    torch.set_num_threads(1)
