"""Multi-process training: DDP with torchrun (gloo, 2 processes on CPU) against one process, and workers under spawn.

The equivalence tested: one process with batch 10 and two processes with batch 5 each see
the same samples at every step (`EpochBatchSampler` splits each global batch across
ranks), gradients are averaged, and each rank's loss is weighted by its share of the
global batch, so the two runs take the same optimiser steps up to floating-point
summation order, *provided the loss of a batch is the mean of per-sample losses and the
forward pass of a sample does not depend on the other samples of its batch*. Two things
break that: a Dice loss computed over the whole batch (Dice of 5 pooled slices is not
the mean of two such Dices; the test uses the per-slice Dice, `dice_per_sample=True`), and
training-mode BatchNorm (it normalises with the
statistics of 5 samples instead of 10, and SyncBatchNorm needs a GPU), so the
equivalence is tested with `bn_eval=True`; with BN in training mode the runs are
checked to differ, which shows the test can fail.
"""
import os, subprocess, sys, textwrap
from pathlib import Path
import pytest
import torch

SCRIPT = textwrap.dedent('''
    import os, sys
    import numpy as np, torch, torch.nn as nn
    torch.set_num_threads(1)
    import torch.distributed as dist
    from lungseg.blocks import SegOutput
    from lungseg.train import TrainConfig, fit

    class ToyDisks(torch.utils.data.Dataset):
        def __init__(self, n, seed, size=32):
            g = np.random.default_rng(seed); yy, xx = np.mgrid[:size, :size]
            self.x = g.normal(0.3, 0.1, (n, 1, size, size)).astype(np.float32)
            self.y = np.zeros((n, 1, size, size), np.float32); self.h = (np.arange(n) % 2 == 0).astype(np.float32)
            for i in np.flatnonzero(self.h):
                cy, cx, r = g.uniform(8, size - 8), g.uniform(8, size - 8), g.uniform(3, 7)
                d = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
                self.y[i, 0][d] = 1; self.x[i, 0][d] += 0.5
            self.case_index = np.arange(n) // 8
        def __len__(self): return len(self.x)
        def __getitem__(self, i): return torch.from_numpy(self.x[i]), torch.from_numpy(self.y[i]), torch.tensor(self.h[i])

    class ToyNet(nn.Module):
        def __init__(self, w=8):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
                                      nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
            self.seg, self.cls = nn.Conv2d(w, 1, 1), nn.Linear(w, 1)
        def forward(self, x):
            f = self.body(x); return SegOutput(self.seg(f), self.cls(f.mean((2, 3)))[:, 0])

    out, bn = sys.argv[1], sys.argv[2]
    torch.manual_seed(0); net = ToyNet()
    cfg = TrainConfig.small(epochs=2, lr=3e-3, device='cpu', bn_eval=(bn == 'eval'), dice_per_sample=True, progress=False, live_plot=False)
    h = fit(net, ToyDisks(40, 1), ToyDisks(16, 2), cfg)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:
        torch.save(dict(w=net.state_dict(), dice=[r['val_dice'] for r in h.records], loss=[r['train_loss'] for r in h.records],
                        world=world), out)
    if dist.is_initialized():   # every rank waits for rank 0's save: tearing gloo down while a peer still works can abort it
        dist.barrier(); dist.destroy_process_group()
''')

ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def _run(tmp_path, nproc, bn):
    script = tmp_path / 'ddp_fit.py'
    script.write_text(SCRIPT)
    out = tmp_path / f'{nproc}_{bn}.pt'
    if nproc == 1: cmd = [sys.executable, str(script), str(out), bn]
    else: cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', str(script), str(out), bn]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def test_ddp_two_processes_match_one(tmp_path):
    one, two = _run(tmp_path, 1, 'eval'), _run(tmp_path, 2, 'eval')
    assert (one['world'], two['world']) == (1, 2)
    diff = _max_diff(one['w'], two['w'])
    assert diff < 1e-4, f'2 x 5 (DDP) and 1 x 10 differ by {diff}'
    # metrics are reduced across ranks: the validation Dice and the logged training loss agree too
    assert max(abs(a - b) for a, b in zip(one['dice'], two['dice'])) < 1e-3, (one['dice'], two['dice'])
    assert max(abs(a - b) for a, b in zip(one['loss'], two['loss'])) < 1e-4, (one['loss'], two['loss'])
    # and training changed the weights (the comparison is not between two untouched models)
    torch.manual_seed(0)


def test_ddp_batchnorm_in_train_mode_differs(tmp_path):
    "With BN in training mode the per-rank statistics (5 samples) make DDP differ from one process (10 samples)."
    one, two = _run(tmp_path, 1, 'train'), _run(tmp_path, 2, 'train')
    assert _max_diff(one['w'], two['w']) > 1e-3


def test_workers_under_spawn(tmp_path):
    "The slice dataset and the loader's worker code work under the spawn start method (macOS, Windows)."
    code = textwrap.dedent('''
        import torch; torch.set_num_threads(1)
        from lungseg.phantoms import make_phantom_cases
        from lungseg.data import RoiConfig, extract_slices, SliceDataset
        from lungseg.baselines import build_model
        from lungseg.train import TrainConfig, fit
        if __name__ == '__main__':
            ds = SliceDataset(extract_slices(make_phantom_cases(3, seed=0), RoiConfig.small()), augment=True)
            cfg = TrainConfig.small(epochs=1, max_steps=2, num_workers=2, mp_context='spawn', device='cpu', progress=False, live_plot=False)
            h = fit(build_model('unet', 'small'), ds, None, cfg)
            assert len(h.records) == 1 and h.records[0]['train_loss'] > 0
            print('ok')
    ''')
    (tmp_path / 'spawn_fit.py').write_text(code)
    r = subprocess.run([sys.executable, str(tmp_path / 'spawn_fit.py')], capture_output=True, text=True, timeout=300, env=ENV, cwd=tmp_path)
    assert r.returncode == 0 and 'ok' in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
