"""The `lungseg` command end to end, in subprocesses as a user runs it.

- `lungseg quickstart` with its defaults (the README's main job) finishes on CPU within its budget
  (10 minutes on 2 cores) and prints the table and saves the figure;
- `lungseg train` -> `lungseg evaluate` on a case folder: checkpoints, the JSON of per-case 3D metrics;
- Ctrl-C during `lungseg train` saves a checkpoint and exits 130; `--resume` finishes the run;
- bad inputs give one clear line and exit status 2, and leave nothing half-written behind: wrong option
  values, NaN voxels, nodule-free validation cases, unsafe or truncated checkpoints, a file where a folder
  is expected and the reverse, an unwritable --out, a full disk (a small tmpfs, when the tests run as root),
  Ctrl-C during evaluate and experiment.
"""
import contextlib, json, os, re, shutil, signal, subprocess, sys, time
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
    assert r.returncode == 2 and "argument --model: invalid choice: 'vgg'" in r.stderr, r.stderr


def fails(*args, cwd, msg, rc=2):
    "Run lungseg, check the exit status, one clear message on stderr and no traceback."
    r = lungseg(*args, cwd=cwd, check=False)
    assert r.returncode == rc and msg in r.stderr and 'Traceback' not in r.stderr, (args, r.returncode, r.stderr[-3000:])
    return r


def test_bad_option_values(tmp_path):
    "Numbers that make no sense are refused by name, before anything runs (they used to fall back to defaults)."
    tr = ['train', '--data', 'phantoms:4', '--out', tmp_path / 'o']
    fails(*tr, '--epochs', 0, cwd=tmp_path, msg='lungseg train: error: argument --epochs: must be at least 1, got 0')
    fails(*tr, '--batch-size', 0, cwd=tmp_path, msg='lungseg train: error: argument --batch-size: must be at least 1, got 0')
    fails(*tr, '--val-frac', 1.5, cwd=tmp_path, msg='lungseg train: error: argument --val-frac: must be between 0 and 1')
    fails(*tr, '--threads', 0, cwd=tmp_path, msg='argument --threads: must be at least 1, got 0')
    fails(*tr, '--epochs', 'two', cwd=tmp_path, msg="argument --epochs: expected a whole number, got 'two'")
    fails(*tr, '--epochs', cwd=tmp_path, msg='argument --epochs: expected one argument')
    fails('experiment', 'table1', '--test-frac', 2, cwd=tmp_path, msg='argument --test-frac: must be between 0 and 1')
    assert not (tmp_path / 'o').exists()
    fails('quickstart', '--epochs', 0, '--out', tmp_path / 'qs', cwd=tmp_path, msg='lungseg quickstart: error: argument --epochs: must be at least 1, got 0')
    assert not (tmp_path / 'qs').exists()
    fails('train', *tr[1:], '--data', 'phantoms:0', cwd=tmp_path, msg="--data phantoms:0: 'phantoms:N' needs a whole number N of at least 2")
    assert not (tmp_path / 'o').exists()


def write_cases(folders: dict, n=6, seed=3):
    "Write `n` phantoms as a case folder per {folder: edit}, after running `edit` on `cases`, in one subprocess."
    code = ("import numpy as np; from lungseg.phantoms import make_phantom_cases; from lungseg.data import write_case_folder\n"
            + ''.join(f"cases = make_phantom_cases({n}, seed={seed})\n{edit or 'pass'}\nwrite_case_folder(cases, {str(f)!r})\n"
                      for f, edit in folders.items()))
    subprocess.run([sys.executable, '-c', code], check=True, env=ENV, timeout=300)
    return list(folders)


def test_bad_data(tmp_path, case_folder):
    # an image whose voxels are all NaN, written as float32 NIfTI (SimpleITK would read them as 0)
    from lungseg.data import holdout_split
    val = holdout_split([str(i) for i in range(6)], 0.2, 0)[1].tolist()
    nan, free = write_cases({tmp_path / 'nan': "c = cases[2]; c.image = c.image.like(np.full(c.image.shape, np.nan, np.float32))",
                             tmp_path / 'free': f"[setattr(cases[i], 'mask', np.zeros_like(cases[i].mask)) for i in {val}]"})
    n_vox = 32 * 64 * 64
    r = fails('train', '--data', nan, '--out', tmp_path / 'o', cwd=tmp_path, msg=f'voxels that are not finite ({n_vox} NaN, 0 inf)')
    assert 'images/' in r.stderr and f'has {n_vox} of {n_vox} voxels' in r.stderr, r.stderr
    assert not (tmp_path / 'o').exists()
    # nodule-free cases are accepted and counted (test_train_then_evaluate), but not a split whose validation cases have none
    fails('train', '--data', free, '--out', tmp_path / 'o', cwd=tmp_path,
          msg=f'None of the {len(val)} validation case(s) has a nodule, so there is no validation Dice to pick best.pt by')
    assert not (tmp_path / 'o').exists()
    # a file where a folder is expected, and the reverse
    (tmp_path / 'file').write_text('x')
    fails('train', '--data', tmp_path / 'file', '--out', tmp_path / 'o', cwd=tmp_path, msg='--data must be a folder, not the file')
    fails('train', '--data', case_folder, '--out', tmp_path / 'file', cwd=tmp_path, msg='file is a file; it must be a folder')
    fails('evaluate', '--checkpoint', tmp_path, '--data', case_folder, cwd=tmp_path, msg=f'No checkpoint file at {tmp_path}')
    fails('experiment', 'table1', '--data', case_folder, '--out', tmp_path / 'file', cwd=tmp_path, msg='file is a file; it must be a folder')


def test_bad_checkpoints(tmp_path, case_folder):
    class Code:   # a pickle that runs a program when loaded
        def __reduce__(self): return (os.system, ('echo pwned',))
    import torch
    torch.save({'format': 'lungseg-checkpoint-1', 'model': Code()}, tmp_path / 'unsafe.pt')
    r = fails('evaluate', '--checkpoint', tmp_path / 'unsafe.pt', '--data', case_folder, cwd=tmp_path,
              msg='unsafe.pt is not a readable lungseg checkpoint: it asks to load the Python object')
    assert 'pwned' not in r.stdout and 'weights_only' not in r.stderr and 'written by lungseg' in r.stderr, r.stderr
    assert 'written by another program, or has been tampered with' in r.stderr, r.stderr
    torch.save({'format': 'lungseg-checkpoint-1', 'model': {'w': torch.zeros(20000)}}, tmp_path / 'whole.pt')
    b = (tmp_path / 'whole.pt').read_bytes(); (tmp_path / 'cut.pt').write_bytes(b[:len(b) // 3])
    r = fails('evaluate', '--checkpoint', tmp_path / 'cut.pt', '--data', case_folder, cwd=tmp_path, msg='cut.pt is not a readable lungseg checkpoint: it is truncated or corrupt')
    assert 'likelihood' not in r.stderr and r.stderr.strip().endswith('(best.pt or last.pt).'), r.stderr
    r = fails('train', '--data', case_folder, '--out', tmp_path / 'o', '--init', tmp_path / 'cut.pt', '--epochs', 1, '--threads', 1,
              cwd=tmp_path, msg='cut.pt is not a readable lungseg checkpoint')


@contextlib.contextmanager
def small_disk(path, size='256k', read_only=False):
    "A tmpfs of `size` (or read-only) at `path`; skips the test where mounting is not allowed (not root)."
    path.mkdir()
    opts = f'size={size}' + (',ro' if read_only else '')
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', str(path)], capture_output=True).returncode:
        pytest.skip('mounting a tmpfs needs root')
    try: yield path
    finally: subprocess.run(['umount', '-l', str(path)])


def test_unwritable_out(tmp_path, case_folder):
    with small_disk(tmp_path / 'ro', read_only=True) as ro:
        fails('train', '--data', case_folder, '--out', ro / 'run', cwd=tmp_path, msg=f'cannot write to --out {ro / "run"}: Read-only file system')
        fails('quickstart', '--out', ro / 'qs', cwd=tmp_path, msg='cannot write to --out')
        fails('experiment', 'table1', '--data', case_folder, '--out', ro / 'x', cwd=tmp_path, msg='cannot write to --out')
        fails('evaluate', '--checkpoint', tmp_path / 'none.pt', '--data', case_folder, '--out', ro / 'm.json', cwd=tmp_path,
              msg=f'cannot write to --out {ro}: Read-only file system')


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory, case_folder):
    "A U-Net trained for one epoch on the case folder."
    out = tmp_path_factory.mktemp('ck') / 'run'
    lungseg('train', '--data', case_folder, '--model', 'unet', '--epochs', 1, '--device', 'cpu', '--out', out, '--threads', 1, cwd=out.parent)
    return out / 'best.pt'


def test_full_disk(tmp_path, case_folder, checkpoint):
    with small_disk(tmp_path / 'full', size='256k') as full:
        with contextlib.suppress(OSError), open(full / 'filler', 'wb') as f:
            while True: f.write(b'\0' * 4096); f.flush()
        fails('evaluate', '--checkpoint', checkpoint, '--data', case_folder, '--out', full / 'm.json', '--threads', 1, cwd=tmp_path,
              msg=f'cannot write --out {full / "m.json"}: No space left on device')
        assert sorted(p.name for p in full.iterdir()) == ['filler'], list(full.iterdir())
        fails('train', '--data', case_folder, '--model', 'unet', '--epochs', 1, '--out', full / 'run', '--threads', 1, cwd=tmp_path,
              msg=f'Cannot write the checkpoint {full / "run" / "last.pt"}')
        assert not list((full / 'run').glob('*.tmp')), list((full / 'run').iterdir())


def interrupt(args, cwd, ready, timeout=300):
    "Start lungseg, send Ctrl-C once `ready(stderr so far)` is true; returns (returncode, stderr)."
    log = Path(cwd) / f'stderr-{time.time_ns()}.txt'
    with open(log, 'w') as f:
        # the child gets the default Ctrl-C: a pytest started in the background (`cmd &` without job control) has SIGINT
        # ignored, and a child inherits that, so the Ctrl-C below would be lost (seen: evaluate ran to the end, rc 0)
        p = subprocess.Popen(LUNGSEG + [str(a) for a in args], stdout=subprocess.DEVNULL, stderr=f, text=True, env=ENV, cwd=cwd,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        t0 = time.time()
        while not ready(log.read_text()) and p.poll() is None and time.time() - t0 < timeout: time.sleep(0.1)
        assert p.poll() is None, f'the command finished before it could be interrupted:\n{log.read_text()[-2000:]}'
        p.send_signal(signal.SIGINT)
        p.wait(timeout=timeout)
    err = log.read_text(); log.unlink()
    return p.returncode, err


def test_ctrl_c_evaluate_and_experiment(tmp_path, case_folder, checkpoint):
    many, = write_cases({tmp_path / 'many': None}, n=40, seed=5)
    js = tmp_path / 'res' / 'metrics.json'
    rc, err = interrupt(['evaluate', '--checkpoint', checkpoint, '--data', many, '--out', js, '--threads', 1], tmp_path,
                        ready=lambda err: 'evaluate:' in err)
    assert rc == 130 and 'lungseg evaluate: interrupted' in err, (rc, err[-2000:])
    assert not (tmp_path / 'res').exists(), list(tmp_path.iterdir())
    out_dir = tmp_path / 'exp'
    rc, err = interrupt(['experiment', 'table1', '--model', 'unet', '--data', case_folder, '--folds', 2, '--epochs', 3,
                         '--threads', 1, '--out', out_dir], tmp_path, ready=lambda err: any(tmp_path.glob('.exp.partial-*/runs/*/last.pt')))
    assert rc == 130 and 'lungseg experiment: interrupted' in err, (rc, err[-2000:])
    assert not out_dir.exists() and not list(tmp_path.glob('.exp*')), list(tmp_path.iterdir())


def test_experiment_tune_threshold(tmp_path, case_folder):
    "`lungseg experiment --tune-threshold`: each fold model's threshold chosen on its pick cases, the test ensemble at their median."
    import pandas as pd
    out = tmp_path / 'exp'
    r = lungseg('experiment', 'table1', '--model', 'unet', '--data', case_folder, '--folds', 2, '--epochs', 1, '--tune-threshold',
                '--device', 'cpu', '--threads', 1, '--out', out, cwd=tmp_path)
    assert json.loads((out / 'table1_protocol.json').read_text())['config']['tune_threshold'] is True
    cv, test = pd.read_csv(out / 'table1_cv.csv'), pd.read_csv(out / 'table1_test.csv')
    fold_t = cv.groupby('fold').threshold.first()
    from lungseg.inference import THRESHOLDS
    assert set(fold_t) <= set(THRESHOLDS), fold_t
    assert set(test.threshold) == {float(fold_t.median())}, (test.threshold.unique(), fold_t)


def test_train_then_evaluate(tmp_path, case_folder):
    out = tmp_path / 'run'
    r = lungseg('train', '--data', case_folder, '--model', 'unet', '--epochs', 2, '--device', 'cpu', '--out', out, '--threads', 1, cwd=tmp_path)
    assert {'last.pt', 'best.pt', 'history.csv'} <= {p.name for p in out.iterdir()}, list(out.iterdir())
    assert 'Best validation Dice' in r.stdout and 'Best validation Dice nan' not in r.stdout, r.stdout
    assert '1 of 8 cases have no nodule' in r.stdout, r.stdout    # make_phantom_cases: 15% nodule-free, accepted and counted
    import torch
    ck = torch.load(out / 'last.pt', weights_only=True)            # safe to open
    assert ck['epoch'] == 2 and ck['spec']['name'] == 'unet' and ck['config']['epochs'] == 2
    tuned = torch.load(out / 'best.pt', weights_only=True)['infer']   # the threshold chosen on the validation cases
    assert tuned['planes'] == 'axial' and tuned['keep_centre'] is True and tuned['cases'] >= 1, tuned
    from lungseg.inference import THRESHOLDS
    assert tuned['threshold'] in THRESHOLDS and len(tuned['dice']) == len(THRESHOLDS), tuned
    assert tuned['dice'][f"{tuned['threshold']:.2f}"] == max(tuned['dice'].values()), tuned
    assert f"Threshold {tuned['threshold']:.2f} chosen on the {tuned['cases']} validation case" in r.stdout, r.stdout
    js = tmp_path / 'metrics.json'
    lungseg('evaluate', '--checkpoint', out / 'best.pt', '--data', case_folder, '--out', js, '--device', 'cpu', cwd=tmp_path)
    res = json.loads(js.read_text())
    assert res['n_cases'] == 8 and len(res['per_case']) == 8
    assert res['model']['name'] == 'unet' and res['model']['preset'] == 'small'
    for k in ('precision', 'sensitivity', 'dice', 'iou', 'hd', 'assd'): assert k in res['mean'], k
    dices = [c['dice'] for c in res['per_case'] if c['dice'] is not None]
    assert all(0 <= d <= 1 for d in dices)
    if dices: assert abs(res['mean']['dice'] - sum(dices) / len(dices)) < 1e-9
    assert res['switches'] == dict(keep_centre=False, tta_flip=False, gate_cls=False, planes='axial', seg_prior=False)
    assert res['threshold'] == tuned['threshold'] and 'validation' in res['threshold_source'], res['threshold_source']
    kc = tmp_path / 'metrics_kc.json'   # the post-processing switches reach the scoring
    lungseg('evaluate', '--checkpoint', out / 'best.pt', '--data', case_folder, '--out', kc, '--device', 'cpu', '--keep-centre', '--tta', cwd=tmp_path)
    res_kc = json.loads(kc.read_text())
    assert res_kc['switches'] == dict(keep_centre=True, tta_flip=True, gate_cls=False, planes='axial', seg_prior=False)
    assert [c['case_id'] for c in res_kc['per_case']] == [c['case_id'] for c in res['per_case']]
    two = tmp_path / 'metrics_two.json'   # two checkpoints are one ensemble; the same one twice scores as it alone
    lungseg('evaluate', '--checkpoint', out / 'best.pt', out / 'best.pt', '--data', case_folder, '--out', two, '--device', 'cpu', cwd=tmp_path)
    res_two = json.loads(two.read_text())
    assert res_two['checkpoint'] == [str(out / 'best.pt')] * 2 and res_two['threshold'] == res['threshold'], res_two['threshold_source']
    for a, b in zip(res_two['per_case'], res['per_case']):   # Dice is null (undefined) on the nodule-free case in both
        assert (a['dice'] is None and b['dice'] is None) or abs(a['dice'] - b['dice']) < 1e-6, (a, b)


def test_context_train_evaluate_segment(tmp_path, case_folder):
    "2.5D (--context 1): the checkpoint records 3 input channels, and evaluate and segment give the model its neighbouring slices."
    out = tmp_path / 'run'
    lungseg('train', '--data', case_folder, '--model', 'unet', '--epochs', 1, '--context', 1, '--device', 'cpu', '--out', out, '--threads', 1, cwd=tmp_path)
    import torch
    ck = torch.load(out / 'best.pt', weights_only=True)
    assert ck['spec']['overrides'] == {'in_ch': 3}, ck['spec']
    js = tmp_path / 'metrics.json'
    lungseg('evaluate', '--checkpoint', out / 'best.pt', '--data', case_folder, '--out', js, '--device', 'cpu', cwd=tmp_path)
    assert json.loads(js.read_text())['n_cases'] == 8
    scan = sorted((case_folder / 'images').iterdir())[0]
    seg = tmp_path / 'seg'
    lungseg('segment', '--checkpoint', out / 'best.pt', '--ct', scan, '--at=32,32,16', '--voxel', '--out', seg, '--threads', 1, cwd=tmp_path)
    assert (seg / 'labels.nii.gz').is_file() and (seg / 'nodules.csv').is_file()
    r = lungseg('train', '--data', case_folder, '--context', -1, '--out', tmp_path / 'bad', cwd=tmp_path, check=False)
    assert r.returncode == 2 and '--context' in r.stderr, r.stderr


def test_norm_switches_train_evaluate(tmp_path, case_folder):
    "--norm/--cls-norm (not in the paper): the checkpoint records them, evaluate rebuilds the same layers; MONAI's U-Net trains by name."
    out = tmp_path / 'mixed'
    lungseg('train', '--data', case_folder, '--epochs', 1, '--norm', 'instance', '--cls-norm', 'batch', '--device', 'cpu', '--out', out, '--threads', 1, cwd=tmp_path)
    import torch
    from lungseg.train import load_trained
    model, ck = load_trained(out / 'best.pt')
    assert ck['spec']['name'] == 'proposed' and ck['spec']['overrides'] == {'norm': 'instance', 'cls_norm': 'batch'}, ck['spec']
    kinds = lambda m: {type(l).__name__ for l in m.modules()} & {'BatchNorm2d', 'InstanceNorm2d'}
    assert kinds(model.segmenter) == {'InstanceNorm2d'} and kinds(model.classifier) == {'BatchNorm2d'}
    js = tmp_path / 'metrics.json'
    lungseg('evaluate', '--checkpoint', out / 'best.pt', '--data', case_folder, '--out', js, '--device', 'cpu', '--threads', 1, cwd=tmp_path)
    assert json.loads(js.read_text())['n_cases'] == 8
    lungseg('train', '--data', case_folder, '--model', 'monai_basicunet', '--epochs', 1, '--device', 'cpu', '--out', tmp_path / 'monai', '--threads', 1, cwd=tmp_path)
    assert torch.load(tmp_path / 'monai' / 'best.pt', weights_only=True)['spec']['name'] == 'monai_basicunet'
    r = lungseg('train', '--data', case_folder, '--model', 'unet', '--norm', 'instance', '--out', tmp_path / 'bad', cwd=tmp_path, check=False)
    assert r.returncode == 2 and '--norm applies to the proposed model and monai_basicunet, not to unet' in r.stderr, r.stderr
    assert not (tmp_path / 'bad').exists()


def test_roi_size_train_evaluate_segment(tmp_path, case_folder):
    "--roi-size/--roi-mm (not in the paper): the checkpoint records the ROI, and training, evaluate and segment all cut it; the augmentation switches are recorded too."
    import numpy as np
    from lungseg.train import load_trained
    from lungseg.inference import spec_roi, roi_inputs
    from lungseg.data import RoiConfig
    out = tmp_path / 'fine'
    r = lungseg('train', '--data', case_folder, '--model', 'unet', '--epochs', 1, '--roi-size', 48, '--roi-mm', 1.2, '--device', 'cpu',
                '--rot90', '--scale', 0.1, '--out', out, '--threads', 1, cwd=tmp_path)
    assert "augmentation: flips and {'rot90': True, 'scale': 0.1}" in r.stdout, r.stdout[-2000:]
    model, ck = load_trained(out / 'best.pt')
    assert ck['spec']['roi'] == {'size': 48, 'spacing_mm': 1.2} and ck['spec']['augment'] == {'rot90': True, 'scale': 0.1}, ck['spec']
    roi = spec_roi(ck['spec'])
    assert roi == RoiConfig(size=48, spacing_mm=1.2)
    hu, (rows, cols) = roi_inputs(np.full((4, 64, 64), -800, np.float32), [1, 2], (32., 32.), (0.8, 0.8), roi)
    assert hu.shape == (2, 48, 48) and abs((rows[1] - rows[0]) * 0.8 - 1.2) < 1e-6   # 48 px of 1.2 mm on a 0.8 mm scan
    js = tmp_path / 'metrics.json'
    lungseg('evaluate', '--checkpoint', out / 'best.pt', '--data', case_folder, '--out', js, '--device', 'cpu', '--threads', 1, cwd=tmp_path)
    got = json.loads(js.read_text())
    assert got['n_cases'] == 8 and got['model']['roi'] == {'size': 48, 'spacing_mm': 1.2} and got['model']['augment']['rot90'] is True
    scan = sorted((case_folder / 'images').iterdir())[0]
    lungseg('segment', '--checkpoint', out / 'best.pt', '--ct', scan, '--at=32,32,16', '--voxel', '--out', tmp_path / 'seg', '--threads', 1, cwd=tmp_path)
    assert (tmp_path / 'seg' / 'labels.nii.gz').is_file()
    r = lungseg('train', '--data', case_folder, '--roi-size', 40, '--out', tmp_path / 'bad', cwd=tmp_path, check=False)
    assert r.returncode == 2 and '--roi-size must be a multiple of 16' in r.stderr, r.stderr
    assert not (tmp_path / 'bad').exists()


def test_planes_train_evaluate(tmp_path, case_folder):
    "--planes all (not in the paper): training slices from three planes at the axial run's steps per epoch; evaluate averages three views."
    import torch
    n = {}
    for planes in ('axial', 'all'):
        r = lungseg('train', '--data', case_folder, '--model', 'unet', '--epochs', 1, '--planes', planes, '--device', 'cpu',
                    '--out', tmp_path / planes, '--threads', 1, cwd=tmp_path)
        n[planes] = int(re.search(r'training \((\d+) slices\)', r.stdout).group(1))
    assert n['all'] > 2 * n['axial'], n
    ck = {p: torch.load(tmp_path / p / 'last.pt', weights_only=True) for p in ('axial', 'all')}
    assert ck['all']['spec']['train_planes'] == 'all' and ck['axial']['spec']['train_planes'] == 'axial'
    assert ck['axial']['config']['max_steps'] is None
    assert ck['all']['config']['max_steps'] == -(-n['axial'] // ck['all']['config']['batch_size'])   # the axial run's batches per epoch
    assert torch.load(tmp_path / 'all' / 'best.pt', weights_only=True)['infer']['planes'] == 'all'   # its threshold chosen on all planes
    js = tmp_path / 'metrics.json'
    lungseg('evaluate', '--checkpoint', tmp_path / 'all' / 'best.pt', '--data', case_folder, '--keep-centre',
            '--threshold', 0.35, '--out', js, '--device', 'cpu', '--threads', 1, cwd=tmp_path)
    got = json.loads(js.read_text())   # no --planes: the planes it was trained on
    assert got['n_cases'] == 8 and got['switches']['planes'] == 'all' and got['switches']['keep_centre'] is True, got['switches']
    assert got['threshold'] == 0.35 and got['threshold_source'] == '--threshold'


def test_ctrl_c_then_resume(tmp_path, case_folder):
    out = tmp_path / 'run'
    args = ['train', '--data', case_folder, '--model', 'unet', '--epochs', 4, '--schedule', 'cosine', '--device', 'cpu', '--out', out, '--threads', 1]
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
    assert 'Note: --model, --schedule not read with --resume' in r.stderr, r.stderr[-2000:]   # taken from last.pt, and said so
    done = torch.load(out / 'last.pt', weights_only=True)
    assert done['epoch'] == 4 and done['config']['schedule'] == 'cosine'
    from lungseg.train import cosine_factor   # the resumed run keeps the cosine schedule, epoch by epoch
    assert [round(h['lr'], 12) for h in done['history']] == [round(1e-3 * cosine_factor(e, 4), 12) for e in range(4)], done['history']


def test_quickstart(tmp_path):
    "The README's main job, with its defaults, on CPU, within its time budget."
    t0 = time.time()
    r = lungseg('quickstart', '--out', tmp_path / 'qs', '--device', 'cpu', cwd=tmp_path, timeout=QUICKSTART_BUDGET_S + 60)
    wall = time.time() - t0
    assert wall < QUICKSTART_BUDGET_S, f'quickstart took {wall:.0f} s'
    for label in ('Proposed model', 'UNet', 'Dice', 'HD(mm)', 'ASSD(mm)'): assert label in r.stdout, label
    legend = 'empty = how many cases have an infinite HD, because exactly one of the prediction and the truth is empty'
    assert legend in r.stdout and legend in (tmp_path / 'qs' / 'quickstart_table.md').read_text()   # the table says what it counts
    fig = tmp_path / 'qs' / 'quickstart_comparison.png'
    assert fig.exists() and fig.stat().st_size > 10_000
    print(f'quickstart wall time {wall:.0f} s')
