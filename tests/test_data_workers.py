"""lungseg.data.SliceDataset through a torch DataLoader with worker processes.

The notebooks use num_workers=0 (fast under nbdev_test); real training uses workers, and
on macOS/Windows workers start with 'spawn', which pickles the dataset. This checks both
start methods on small synthetic cases (no data files needed): every item a worker
returns is the single-process item, flipped at most, with image and mask flipped together.
"""
import multiprocessing as mp

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lungseg.data import CTVolume, Case, RoiConfig, SliceDataset, extract_slices

METHODS = [m for m in ('fork', 'spawn') if m in mp.get_all_start_methods()]


def _cases(n=3, seed=0):
    "Balls in noisy 'lung' (noise so that no flip leaves a slice unchanged)."
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(n):
        zz, yy, xx = np.indices((16, 40, 40))
        m = ((zz - 8) ** 2 + ((yy - 18 - i) * 0.8) ** 2 + ((xx - 20 + i) * 0.8) ** 2) <= 16
        img = np.where(m, 40, -850) + rng.integers(-60, 60, m.shape)
        cases.append(Case(f'ball{i}', CTVolume(img.astype(np.int16), (1.0, 0.8, 0.8)), m.astype(np.uint8)))
    return cases


@pytest.fixture(scope='module')
def slices():
    return extract_slices(_cases(), RoiConfig(size=32, spacing_mm=None))  # exact crops: no interpolation


def _flips(a):
    return [a, a.flip(-1), a.flip(-2), a.flip(-1).flip(-2)]


@pytest.mark.parametrize('method', METHODS)
def test_dataloader_workers(slices, method):
    ref = SliceDataset(slices)                       # single process, no augmentation
    ds = SliceDataset(slices, augment=True)
    torch.manual_seed(0)
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=2, multiprocessing_context=method)
    batches = list(loader)
    x = torch.cat([b[0] for b in batches]); y = torch.cat([b[1] for b in batches]); c = torch.cat([b[2] for b in batches])
    assert x.shape == (len(slices), 1, 32, 32) and y.shape == x.shape and c.shape == (len(slices),)
    assert x.dtype == y.dtype == c.dtype == torch.float32
    assert torch.equal(c, torch.from_numpy(slices.has_nodule).float())
    assert 0 < c.mean() < 1
    kinds = []
    for i in range(len(slices)):
        rx, ry, rc = ref[i]
        hits = [k for k, (fx, fy) in enumerate(zip(_flips(rx), _flips(ry))) if torch.equal(x[i], fx) and torch.equal(y[i], fy)]
        assert len(hits) == 1, f'item {i}: worker output is not a flip of the reference with image and mask together'
        kinds.append(hits[0])
    assert len(set(kinds)) > 1, 'augment=True never varied the flips across workers'
