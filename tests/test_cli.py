"""The `lungseg` command end to end, in subprocesses as a user runs it.

- `lungseg quickstart` with its defaults (the README's main job) finishes on CPU within its budget
  (10 minutes on 2 cores) and prints the table and saves the figure;
- `lungseg train` -> `lungseg evaluate` on a case folder: checkpoints, the JSON of per-case 3D metrics;
- Ctrl-C during `lungseg train` saves a checkpoint and exits 130; `--resume` finishes the run;
- bad inputs give one clear line and exit status 2.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
LUNGSEG = [sys.executable, '-c', 'import sys; from lungseg.cli import main; sys.exit(main())']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
QUICKSTART_BUDGET_S = 600


def lungseg(*args, cwd, timeout=600, check=True):
    r = subprocess.run(LUNGSEG + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=cwd)
    if check: assert r.returncode == 0, f'lungseg {" ".join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


@pytest.fixture(scope='module')
def case_folder(tmp_path_factory):
    "Eight phantoms written as a case folder (images/, masks/), as a user's data would be."
    d = tmp_path_factory.mktemp('cases')
    code = ("from lungseg.phantoms import make_phantom_cases; from lungseg.data import write_case_folder; "
            f"write_case_folder(make_phantom_cases(8, seed=3), {str(d / 'cases')!r})")
    subprocess.run([sys.executable, '-c', code], check=True, env=ENV, timeout=300)
    return d / 'cases'


def test_help(tmp_path):
    r = lungseg('--help', cwd=tmp_path)
    for cmd in ('quickstart', 'train', 'evaluate', 'experiment'): assert cmd in r.stdout
    for cmd, opts in [('train', ['--data', '--model', '--preset', '--epochs', '--device', '--out', '--resume']),
                      ('evaluate', ['--checkpoint', '--data']),
                      ('experiment', ['table1', '--data', '--preset', '--epochs', '--folds', '--seeds', '--out']),
                      ('quickstart', ['--out', '--epochs'])]:
        out = lungseg(cmd, '--help', cwd=tmp_path).stdout
        for o in opts: assert o in out, (cmd, o)


def test_bad_inputs(tmp_path, case_folder):
    r = lungseg('train', '--data', tmp_path / 'nowhere', '--out', tmp_path / 'o', cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'No such data folder' in r.stderr, r.stderr
    r = lungseg('evaluate', '--checkpoint', tmp_path / 'missing.pt', '--data', case_folder, cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'No checkpoint file' in r.stderr, r.stderr
    (tmp_path / 'junk.pt').write_text('junk')
    r = lungseg('evaluate', '--checkpoint', tmp_path / 'junk.pt', '--data', case_folder, cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'not a readable lungseg checkpoint' in r.stderr, r.stderr
    r = lungseg('train', '--data', case_folder, '--out', tmp_path / 'fresh', '--resume', cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'Cannot resume' in r.stderr, r.stderr
    empty = tmp_path / 'empty'; (empty / 'images').mkdir(parents=True); (empty / 'masks').mkdir()
    r = lungseg('train', '--data', empty, '--out', tmp_path / 'o2', cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'lungseg train: error:' in r.stderr and 'Traceback' not in r.stderr, r.stderr
    r = lungseg('train', '--data', case_folder, '--model', 'vgg', '--out', tmp_path / 'o3', cwd=tmp_path, check=False)
    assert r.returncode == 2 and 'Unknown model' in r.stderr, r.stderr


def test_train_then_evaluate(tmp_path, case_folder):
    out = tmp_path / 'run'
    r = lungseg('train', '--data', case_folder, '--model', 'unet', '--epochs', 2, '--device', 'cpu', '--out', out, '--threads', 1, cwd=tmp_path)
    assert {'last.pt', 'best.pt', 'history.csv'} <= {p.name for p in out.iterdir()}, list(out.iterdir())
    assert 'Best validation Dice' in r.stdout
    import torch
    ck = torch.load(out / 'last.pt', weights_only=True)            # safe to open
    assert ck['epoch'] == 2 and ck['spec']['name'] == 'unet' and ck['config']['epochs'] == 2
    js = tmp_path / 'metrics.json'
    lungseg('evaluate', '--checkpoint', out / 'best.pt', '--data', case_folder, '--out', js, '--device', 'cpu', cwd=tmp_path)
    res = json.loads(js.read_text())
    assert res['n_cases'] == 8 and len(res['per_case']) == 8
    assert res['model']['name'] == 'unet' and res['model']['preset'] == 'small'
    for k in ('precision', 'sensitivity', 'dice', 'iou', 'hd', 'assd'): assert k in res['mean'], k
    dices = [c['dice'] for c in res['per_case'] if c['dice'] is not None]
    assert all(0 <= d <= 1 for d in dices)
    if dices: assert abs(res['mean']['dice'] - sum(dices) / len(dices)) < 1e-9


def test_ctrl_c_then_resume(tmp_path, case_folder):
    out = tmp_path / 'run'
    args = ['train', '--data', case_folder, '--model', 'unet', '--epochs', 4, '--device', 'cpu', '--out', out, '--threads', 1]
    p = subprocess.Popen(LUNGSEG + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=tmp_path)
    t0 = time.time()
    while not (out / 'last.pt').exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.2)
    assert p.poll() is None, 'training finished before it could be interrupted'
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, (p.returncode, stderr[-2000:])
    assert 'Interrupted' in stderr and '--resume' in stderr, stderr[-2000:]
    import torch
    ck = torch.load(out / 'last.pt', weights_only=True)
    assert ck['epoch'] < 4
    r = lungseg(*args, '--resume', cwd=tmp_path)
    assert 'Resuming' in r.stdout
    assert torch.load(out / 'last.pt', weights_only=True)['epoch'] == 4


def test_quickstart(tmp_path):
    "The README's main job, with its defaults, on CPU, within its time budget."
    t0 = time.time()
    r = lungseg('quickstart', '--out', tmp_path / 'qs', '--device', 'cpu', cwd=tmp_path, timeout=QUICKSTART_BUDGET_S + 60)
    wall = time.time() - t0
    assert wall < QUICKSTART_BUDGET_S, f'quickstart took {wall:.0f} s'
    for label in ('Proposed model', 'UNet', 'Dice', 'HD(mm)', 'ASSD(mm)'): assert label in r.stdout, label
    fig = tmp_path / 'qs' / 'quickstart_comparison.png'
    assert fig.exists() and fig.stat().st_size > 10_000
    print(f'quickstart wall time {wall:.0f} s')
