"""Writes the reader's test files with PyTorch (not needed to run the tests).

    python tests/data/torch_ckpt/make.py     # with torch installed (made with torch 2.13.0, CPU)

views.pt: tensors of every storage type the reader knows, non-contiguous views, storage
offsets, two views of one storage, a 0-d and an empty tensor, an nn.Parameter, nested
containers. views_expected.npz: the same tensors as torch itself materialises them
(bfloat16 as float32). legacy.pt: a file in torch's pre-1.6 (non-zip) format.
"""

import collections
from pathlib import Path

import numpy as np
import torch

here = Path(__file__).parent
g = torch.Generator().manual_seed(20240611)
base = torch.randn(5, 6, generator=g)
shared = torch.randn(10, generator=g)
tensors = {
    "f32": torch.randn(2, 3, generator=g),
    "f32_transposed": base.t(),  # stride (1, 6)
    "f32_slice": base[1:, ::2],  # offset 6, stride (6, 2)
    "f64": torch.randn(4, generator=g, dtype=torch.float64),
    "f16": torch.randn(7, generator=g).half(),
    "bf16": torch.randn(2, 3, generator=g).bfloat16(),
    "bf16_transposed": torch.randn(3, 2, generator=g).bfloat16().t(),
    "i64": torch.arange(-3, 5, dtype=torch.int64) * 1_000_000_007,
    "i32": torch.arange(-4, 4, dtype=torch.int32),
    "i16": torch.arange(-2, 3, dtype=torch.int16),
    "i8": torch.arange(-2, 3, dtype=torch.int8),
    "u8": torch.arange(250, 256, dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "shared_head": shared[:4],
    "shared_tail": shared[3:].view(7, 1),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 3),
    "param": torch.nn.Parameter(torch.randn(3, generator=g)),
}
obj = {"tensors": collections.OrderedDict(tensors),
       "nested": [1, 2.5, "three", (tensors["f32"], None), {"k": tensors["i64"]}],
       "epoch": 7}
torch.save(obj, here / "views.pt")
np.savez(here / "views_expected.npz",
         **{k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy()
            for k, v in tensors.items()})
torch.save({"w": torch.arange(3.0)}, here / "legacy.pt", _use_new_zipfile_serialization=False)
