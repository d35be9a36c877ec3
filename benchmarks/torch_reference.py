"""Numbers from the reference PyTorch formulas, recorded once for tests/test_golden.py (issue 28):
DC's layer-wise matching distance (DatasetCondensation utils.py, ``match_loss`` with
``dis_metric='ours'`` and its ``distance_wb``), MTT's normalised parameter loss
(mtt-distillation distill.py: ``mse_loss(student, target, reduction='sum') / num_params``
divided by the same for the starting parameters) and DM's loss (DatasetCondensation main_DM.py,
ConvNet branch without DSA: ``sum((mean(embed(real_c), 0) - mean(embed(syn_c), 0))**2)`` summed
over the classes c, with ``embed`` the flattened features of networks.py's ConvNet: depth x
[conv3x3, padding 3 on the first conv of 1-channel input else 1; GroupNorm(C, C) eps 1e-5;
ReLU; AvgPool 2x2 stride 2]), plus that loss's gradient w.r.t. the synthetic images (its norm
and two entries), on fixed arrays. Written here from reading those files, not copied.

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
# DM's network: the same ConvNet on 1-channel 10x10 images: conv1 pads by 3 (-> 14x14), pooling
# -> 7x7, conv2 pads by 1, pooling floors 7 -> 3, so the embedding is 8 * 3 * 3 = 72 features.
DM_SIZE, DM_CLASSES, DM_REAL, DM_IPC = 10, 3, 4, 2
DM_SHAPES = {**SHAPES, "classifier.weight": (3, 72)}
# Two entries of the gradient w.r.t. the synthetic images, recorded as numbers: indices into
# torch's [class, image, channel, row, column] (ours: [class, image, row, column, channel]).
# Both are large (|g| ~ 0.25-0.28, so float32 noise of ~1e-7 is small beside them) and on the
# image's border (last column; first row), where the padding matters.
DM_GRAD_ENTRIES = ((0, 1, 0, 3, 9), (1, 1, 0, 0, 1))


def arrays() -> dict[str, dict[str, np.ndarray]]:
    """Fixed float32 inputs: two gradient lists (real, synthetic; the synthetic one correlated
    with the real one, with one all-zero output row, which the reference's 1e-6 keeps finite),
    three flat parameter vectors (MTT's start, target and student), and DM's network weights
    with its real and synthetic images (:func:`dm_arrays`, from a separate generator, so adding
    them left the other arrays, and their recorded numbers, as they were)."""
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
        "dm": dm_arrays(),
    }


def dm_arrays() -> dict[str, np.ndarray]:
    """DM's inputs, float32, torch layouts: the ConvNet's weights under their :data:`DM_SHAPES`
    names (convs ~ N(0, 1/fan_in), norm scales near 1 and biases near 0, so no layer is an
    identity), "real" [classes, DM_REAL, 1, H, W] and "syn" [classes, DM_IPC, 1, H, W] images
    whose class means differ, so every class adds to the loss."""
    rng = np.random.default_rng(2828)
    out = {}
    for k, s in DM_SHAPES.items():
        if k.startswith("norm") and k.endswith("weight"):
            v = 1.0 + 0.2 * rng.normal(size=s)
        elif len(s) == 1:
            v = 0.2 * rng.normal(size=s)
        else:
            v = rng.normal(size=s) / np.sqrt(np.prod(s[1:]))
        out[k] = v.astype(np.float32)
    shape = (DM_CLASSES, 1, DM_SIZE, DM_SIZE)
    centre = rng.normal(size=shape)
    real = centre[:, None] + rng.normal(size=(DM_CLASSES, DM_REAL, *shape[1:]))
    syn = 0.5 * centre[:, None] + rng.normal(size=(DM_CLASSES, DM_IPC, *shape[1:]))
    return {**out, "real": real.astype(np.float32), "syn": syn.astype(np.float32)}


def _reference_numbers() -> dict[str, float | list[float] | str]:
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
    dm, grad = _reference_dm(a["dm"])
    return {
        "dc_matching_distance": float(dc),
        "mtt_loss": float(loss / dist),
        "dm_loss": float(dm),
        "dm_syn_grad_norm": float(torch.linalg.vector_norm(grad)),
        "dm_syn_grad_entries": [float(grad[i]) for i in DM_GRAD_ENTRIES],
        "torch": torch.__version__,
    }


def _reference_dm(d: dict[str, np.ndarray]):
    """DM's loss and its gradient w.r.t. the synthetic images [classes, DM_IPC, 1, H, W], in
    torch, one class at a time as main_DM.py's ConvNet branch."""
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(d[k]) for k in DM_SHAPES}

    def embed(x: torch.Tensor) -> torch.Tensor:
        for i in (1, 2):
            pad = 3 if x.shape[1] == 1 and i == 1 else 1
            x = F.conv2d(x, w[f"conv{i}.weight"], w[f"conv{i}.bias"], padding=pad)
            width = x.shape[1]
            x = F.group_norm(x, width, w[f"norm{i}.weight"], w[f"norm{i}.bias"], eps=1e-5)
            x = F.avg_pool2d(F.relu(x), kernel_size=2, stride=2)
        return x.reshape(x.shape[0], -1)

    syn = torch.from_numpy(d["syn"]).clone().requires_grad_(True)
    loss = torch.tensor(0.0)
    for c in range(DM_CLASSES):
        output_real = embed(torch.from_numpy(d["real"][c])).detach()
        output_syn = embed(syn[c])
        loss = loss + torch.sum((output_real.mean(dim=0) - output_syn.mean(dim=0)) ** 2)
    loss.backward()
    return loss.detach(), syn.grad


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
