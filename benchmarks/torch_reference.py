"""Numbers from the reference PyTorch formulas, recorded once for tests/test_golden.py (issue 28):
DC's layer-wise matching distance (DatasetCondensation utils.py, ``match_loss`` with
``dis_metric='ours'`` and its ``distance_wb``) and MTT's normalised parameter loss
(mtt-distillation distill.py: ``mse_loss(student, target, reduction='sum') / num_params``
divided by the same for the starting parameters), on fixed arrays. Written here from reading
those files, not copied.

torch is not a dependency of this repository or its tests; in a separate venv:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py    # writes tests/fixtures/torch_reference.json

The arrays come from :func:`arrays` (numpy only), which the test calls too. They are in
torch's layouts: conv weights [out, in, kh, kw], linear [out, in]; the test moves them to ours
(HWIO, [in, out]), so the comparison also checks that both split rows on the output channel.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "torch_reference.json")
# A ConvNet of width 8, depth 2 on 1-channel images, 3 classes, in torch's parameter order:
# conv1 weight, conv1 bias, norm1 weight, norm1 bias, conv2 ..., classifier weight and bias.
SHAPES = {
    "conv1.weight": (8, 1, 3, 3),
    "conv1.bias": (8,),
    "norm1.weight": (8,),
    "norm1.bias": (8,),
    "conv2.weight": (8, 8, 3, 3),
    "conv2.bias": (8,),
    "norm2.weight": (8,),
    "norm2.bias": (8,),
    "classifier.weight": (3, 32),
    "classifier.bias": (3,),
}


def arrays() -> dict[str, dict[str, np.ndarray]]:
    """Fixed float32 inputs: two gradient lists (real, synthetic; the synthetic one correlated
    with the real one, with one all-zero output row, which the reference's 1e-6 keeps finite)
    and three flat parameter vectors (MTT's start, target and student)."""
    rng = np.random.default_rng(2812)
    real = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    syn = {
        k: (0.6 * v + 0.4 * rng.normal(size=v.shape)).astype(np.float32) for k, v in real.items()
    }
    syn["conv2.weight"][3] = 0.0
    n = sum(int(np.prod(s)) for s in SHAPES.values())
    start = rng.normal(size=n).astype(np.float32)
    target = (start + 0.1 * rng.normal(size=n)).astype(np.float32)
    student = (start + 0.7 * (target - start) + 0.02 * rng.normal(size=n)).astype(np.float32)
    return {
        "real": real,
        "syn": syn,
        "mtt": {"start": start, "target": target, "student": student},
    }


def _reference_numbers() -> dict[str, float]:
    import torch

    def distance_wb(gwr: torch.Tensor, gws: torch.Tensor) -> torch.Tensor:
        shape = gwr.shape
        if len(shape) == 4:  # conv: one row per output channel
            gwr, gws = gwr.reshape(shape[0], -1), gws.reshape(shape[0], -1)
        elif len(shape) == 1:  # biases and norm parameters: not matched
            return torch.tensor(0.0)
        dot = torch.sum(gwr * gws, dim=-1)
        return torch.sum(1 - dot / (torch.norm(gwr, dim=-1) * torch.norm(gws, dim=-1) + 1e-6))

    a = arrays()
    dc = torch.tensor(0.0)
    for k in SHAPES:
        dc = dc + distance_wb(torch.from_numpy(a["real"][k]), torch.from_numpy(a["syn"][k]))
    start, target, student = (torch.from_numpy(a["mtt"][k]) for k in ("start", "target", "student"))
    num_params = start.numel()
    loss = torch.nn.functional.mse_loss(student, target, reduction="sum") / num_params
    dist = torch.nn.functional.mse_loss(start, target, reduction="sum") / num_params
    return {
        "dc_matching_distance": float(dc),
        "mtt_loss": float(loss / dist),
        "torch": torch.__version__,
    }


def main() -> int:
    numbers = _reference_numbers()
    record = {
        "about": "benchmarks/torch_reference.py: the reference PyTorch formulas on arrays()",
        **numbers,
    }
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
