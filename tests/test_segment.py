"`lungseg segment` end to end on the whole-chest phantom: geometry read back with SimpleITK, accuracy, border and overlap, bad input."
import contextlib, io, os, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from lungseg.cli import main
from lungseg.data import CTVolume, scan_id, write_dicom_series, write_volume
from lungseg.inference import demo_segmenter
from lungseg.metrics import segmentation_metrics
from lungseg.phantoms import make_chest_phantom

torch.set_num_threads(1)

def run(*argv):
    "Run `lungseg` in this process: (exit code, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A short cached training, the chest phantom and its nodule list."
    d = tmp_path_factory.mktemp('segment')
    _, _, ck = demo_segmenter('proposed', progress=False)
    chest = make_chest_phantom(5, seed=0)
    pts = pd.DataFrame([dict(seriesuid='chest', coordX=n['centre_xyz'][0], coordY=n['centre_xyz'][1], coordZ=n['centre_xyz'][2],
                             diameter_mm=n['diameter_mm']) for n in chest.meta['nodules']])
    pts.to_csv(d / 'annotations.csv', index=False)
    return d, ck, chest

@pytest.mark.parametrize('fmt', ['.nii.gz', '.nii', '.mha', '.mhd', '.nrrd', 'dicom'])
def test_geometry_every_format(setup, fmt):
    d, ck, chest = setup
    scan = d / f'in{fmt.replace(".", "_")}' / ('chest' + (fmt if fmt != 'dicom' else ''))
    if fmt == 'dicom': write_dicom_series(chest.image, scan)
    else: write_volume(chest.image, scan)
    csv = d / 'annotations.csv'
    if fmt == 'dicom':   # a series folder is named by its SeriesInstanceUID
        pd.read_csv(csv).assign(seriesuid=scan_id(scan)).to_csv(d / 'dicom.csv', index=False); csv = d / 'dicom.csv'
    out = d / f'out{fmt.replace(".", "_")}'
    rc, so, se = run('segment', '--checkpoint', ck, '--ct', scan, '--nodules', csv, '--out', out, '--threads', 1)
    assert rc == 0, se
    ref = sitk.ReadImage(str(next(scan.parent.glob('*.mhd'))) if fmt == '.mhd' else sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(scan))
                         if fmt == 'dicom' else str(scan))
    lab = sitk.ReadImage(str(out / 'labels.nii.gz'))
    assert lab.GetSize() == ref.GetSize()
    np.testing.assert_allclose(lab.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(lab.GetOrigin(), ref.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(lab.GetDirection(), ref.GetDirection(), atol=1e-6)
    table = pd.read_csv(out / 'nodules.csv')
    assert table.id.tolist() == [1, 2, 3, 4, 5] and (out / 'overview.png').stat().st_size > 1000
    assert not [p for p in d.iterdir() if p.name.startswith('.')]   # no temporary folder left

def test_accuracy(setup):
    "Dice and volume error of every nodule against its truth (a one-minute training: a floor, not a result)."
    d, ck, chest = setup
    write_volume(chest.image, d / 'acc_in' / 'chest.nii.gz')
    rc, so, se = run('segment', '--checkpoint', ck, '--ct', d / 'acc_in' / 'chest.nii.gz', '--nodules', d / 'annotations.csv',
                     '--out', d / 'acc', '--threads', 1)
    assert rc == 0, se
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / 'acc' / 'labels.nii.gz')))
    truth, table = chest.meta['labels'], pd.read_csv(d / 'acc' / 'nodules.csv').set_index('id')
    res = pd.DataFrame([dict(kind=n['kind'], dice=segmentation_metrics(lab == n['label'], truth == n['label'], chest.image.spacing)['dice'],
                             volume_error=table.loc[n['label'], 'volume_mm3'] / n['volume_mm3'] - 1) for n in chest.meta['nodules']])
    print(res.round(3).to_string())
    ok = res[res.kind != 'juxtapleural']
    assert ok.dice.mean() > 0.4, res
    # a one-minute model over-segments some small nodules by a factor that moves with the CPU's kernels
    # (the calcific one by +140% on an AVX-512 CPU), so the floor is on the median volume error
    assert ok.volume_error.abs().median() < 0.9, res
    assert int(table.n_voxels.sum()) == int((lab > 0).sum())     # no voxel counted twice

def test_border_and_overlap(setup):
    "Two nodules 14 mm apart (overlapping ROIs) and one on the first slice, given as voxel indices: each keeps its own label."
    d, ck, _ = setup
    sites = [(20, 112, 84), (20, 128, 96), (1, 120, 232)]
    near = make_chest_phantom(3, seed=3, kinds=('isolated', 'calcific', 'cavitary'), sites=sites)
    write_volume(near.image, d / 'near' / 'near.mha')
    pd.DataFrame([dict(x=n['centre_zyx'][2], y=n['centre_zyx'][1], z=n['centre_zyx'][0]) for n in near.meta['nodules']]).to_csv(d / 'near.csv', index=False)
    rc, so, se = run('segment', '--checkpoint', ck, '--ct', d / 'near' / 'near.mha', '--nodules', d / 'near.csv', '--voxel', '--out', d / 'near_out')
    assert rc == 0, se
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(d / 'near_out' / 'labels.nii.gz')))
    table = pd.read_csv(d / 'near_out' / 'nodules.csv').set_index('id')
    assert set(np.unique(lab)) <= {0, 1, 2, 3}
    assert int(table.n_voxels.sum()) == int((lab > 0).sum())
    for k in (1, 2, 3):
        assert (lab == k).any(), (k, table)
        hit = near.meta['labels'][lab == k]
        # of the nodule voxels it claims, most are its own: a short-trained model spills into the background (by an amount that
        # moves with the CPU's kernels), but a label must not take its neighbour's nodule
        assert (hit == k).any() and (hit == k).sum() >= 0.5 * (hit > 0).sum(), (k, np.unique(hit, return_counts=True))

def test_folder_of_scans(setup):
    d, ck, chest = setup
    write_volume(chest.image, d / 'folder' / 'chest.nrrd'); write_volume(chest.image, d / 'folder' / 'other.nii.gz')
    with pytest.warns(UserWarning, match='no nodule listed for seriesuid other'):
        rc, so, se = run('segment', '--checkpoint', ck, '--ct', d / 'folder', '--nodules', d / 'annotations.csv', '--out', d / 'fold_out')
    assert rc == 0, se
    assert sorted(p.name for p in (d / 'fold_out').iterdir()) == ['chest', 'nodules.csv']   # 'other' has no row: skipped

def test_bad_input(setup, tmp_path):
    d, ck, chest = setup
    scan = tmp_path / 'chest.nii.gz'; write_volume(chest.image, scan)
    def fails(csv_text, contains, ct=scan, ckpt=ck, extra=()):
        csv = tmp_path / 'bad.csv'; csv.write_text(csv_text)
        rc, so, se = run('segment', '--checkpoint', ckpt, '--ct', ct, '--nodules', csv, '--out', tmp_path / 'never', *extra)
        assert rc == 2 and contains in se, (rc, se)
        assert not (tmp_path / 'never').exists() and not [p for p in tmp_path.iterdir() if p.name.startswith('.')]
    x, y, z = chest.meta['nodules'][0]['centre_xyz']
    fails('a,b\n1,2\n', 'bad.csv: has no coordinate columns')
    fails(f'x,y,z\n{x},{y},{z}\n{x},{y},oops\n', 'bad.csv: line 3: non-numeric')
    fails(f'x,y,z\n{x},{y},{z}\n{x},{y},{z + 400}\n', 'bad.csv: line 3: point')
    fails(f'seriesuid,coordX,coordY,coordZ\nchest,{x},{y},{z}\nnope,{x},{y},{z}\n', "bad.csv: line 3: seriesuid 'nope' matches no scan")
    flat = tmp_path / 'flat.nii.gz'; sitk.WriteImage(sitk.Image(30, 30, sitk.sitkInt16), str(flat))
    fails('x,y,z\n1,1,0\n', 'flat.nii.gz: is a 2D image', ct=flat)
    other = tmp_path / 'other.pt'; torch.save({'weights': torch.zeros(2)}, other)
    fails(f'x,y,z\n{x},{y},{z}\n', 'is not a lungseg checkpoint', ckpt=other)
    (tmp_path / 'full').mkdir(); (tmp_path / 'full' / 'keep.txt').write_text('mine')
    rc, so, se = run('segment', '--checkpoint', ck, '--ct', scan, f'--at={x},{y},{z}', '--out', tmp_path / 'full')
    assert rc == 2 and 'not empty' in se and (tmp_path / 'full' / 'keep.txt').read_text() == 'mine'

def test_console_command(setup, tmp_path):
    "The installed console entry point runs the same command."
    d, ck, chest = setup
    scan = tmp_path / 'c.mha'; write_volume(chest.image, scan)
    x, y, z = chest.meta['nodules'][2]['centre_xyz']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, '-c', 'import sys; from lungseg.cli import main; sys.exit(main())', 'segment', '--checkpoint', str(ck),
                        '--ct', str(scan), f'--at={x},{y},{z}', '--out', str(tmp_path / 'o'), '--threads', '1'],
                       capture_output=True, encoding='utf-8', errors='replace', env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'o' / 'labels.nii.gz').is_file() and 'wrote' in p.stdout

def restack(vol, axes, flips=()):
    "The same scan stored another way: array axes reordered by `axes`, then reversed along `flips`; every voxel keeps its world position."
    arr = np.flip(np.transpose(vol.array, axes), flips) if flips else np.transpose(vol.array, axes)
    first = np.zeros(3); first[[axes[a] for a in flips]] = np.array(vol.shape)[[axes[a] for a in flips]] - 1
    cols = [vol.direction[:, 2 - axes[2 - i]] * (-1 if 2 - i in flips else 1) for i in range(3)]   # ITK axis i = array axis 2 - i
    return CTVolume(np.ascontiguousarray(arr), tuple(vol.spacing[a] for a in axes), tuple(vol.voxel_to_world(first)), np.stack(cols, 1))

def test_any_orientation(setup, tmp_path):
    "A chest stored as axial, sagittal or coronal slices (axes permuted, some reversed) or feet first: the same nodules, labels in each input's own geometry."
    d, ck, _ = setup
    chest = make_chest_phantom(5, seed=0, direction=np.eye(3))
    pts = pd.DataFrame([dict(x=n['centre_xyz'][0], y=n['centre_xyz'][1], z=n['centre_xyz'][2]) for n in chest.meta['nodules']])
    pts.to_csv(tmp_path / 'pts.csv', index=False)
    res = {}
    for name, axes, flips in [('axial', (0, 1, 2), ()), ('sagittal', (2, 0, 1), (1,)), ('coronal', (1, 0, 2), (2,)), ('feet_first', (0, 1, 2), (0,))]:
        img, truth = restack(chest.image, axes, flips), restack(chest.image.like(chest.meta['labels']), axes, flips)
        v = np.array([[0, 0, 0], [3, 17, 29], np.array(img.shape) - 1])   # every voxel keeps its world position
        old = np.zeros_like(v); n = np.array(chest.image.shape)
        for b, a in enumerate(axes): old[:, a] = n[a] - 1 - v[:, b] if b in flips else v[:, b]
        np.testing.assert_allclose(img.voxel_to_world(v), chest.image.voxel_to_world(old), atol=1e-6)
        scan = tmp_path / name / 'chest.nii.gz'; write_volume(img, scan)
        rc, so, se = run('segment', '--checkpoint', ck, '--ct', scan, '--nodules', tmp_path / 'pts.csv', '--out', tmp_path / f'{name}_out', '--threads', 1)
        assert rc == 0, se
        ref, lab = sitk.ReadImage(str(scan)), sitk.ReadImage(str(tmp_path / f'{name}_out' / 'labels.nii.gz'))
        assert lab.GetSize() == ref.GetSize()
        np.testing.assert_allclose(lab.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(lab.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(lab.GetDirection(), ref.GetDirection(), atol=1e-6)
        arr, table = sitk.GetArrayFromImage(lab), pd.read_csv(tmp_path / f'{name}_out' / 'nodules.csv').set_index('id')
        res[name] = pd.DataFrame([dict(dice=segmentation_metrics(arr == n['label'], truth.array == n['label'], img.spacing)['dice'],
                                       volume=table.loc[n['label'], 'volume_mm3'], x=table.loc[n['label'], 'x_mm']) for n in chest.meta['nodules']])
    print(pd.concat(res, axis=1).round(3).to_string())
    for name in ('sagittal', 'coronal', 'feet_first'):
        np.testing.assert_allclose(res[name].dice, res['axial'].dice, atol=0.02)
        np.testing.assert_allclose(res[name].volume, res['axial'].volume, rtol=0.02, atol=1.)
        np.testing.assert_allclose(res[name].x, res['axial'].x, atol=0.1)   # centroids in world mm

def dicom_chest(chest, folder):
    "The chest as a DICOM series (`write_dicom_series` writes the FrameOfReferenceUID a DICOM SEG needs)."
    write_dicom_series(chest.image, folder)
    return folder

def test_dicom_seg_without_highdicom(setup, tmp_path, monkeypatch):
    "Without the optional extra: labels, tables and figure are written, and the warning and the error say `pip install \"lungseg[dicomseg]\"`."
    d, ck, chest = setup
    series = dicom_chest(chest, tmp_path / 'series')
    for m in [m for m in sys.modules if m.split('.')[0] in ('highdicom', 'pydicom')]: monkeypatch.delitem(sys.modules, m)
    monkeypatch.setitem(sys.modules, 'highdicom', None)   # `import highdicom` raises ImportError
    from lungseg.inference import write_dicom_seg
    with pytest.raises(ImportError, match=r'pip install "lungseg\[dicomseg\]"'): write_dicom_seg(chest.image, series, tmp_path / 'x.dcm', 1)
    x, y, z = chest.meta['nodules'][0]['centre_xyz']
    with pytest.warns(UserWarning, match=r'no DICOM SEG was written \(pip install "lungseg\[dicomseg\]"\)'):
        rc, so, se = run('segment', '--checkpoint', ck, '--ct', series, f'--at={x},{y},{z}', '--out', tmp_path / 'o', '--threads', 1)
    assert rc == 0, se
    assert sorted(p.name for p in (tmp_path / 'o').iterdir()) == ['labels.nii.gz', 'nodules.csv', 'nodules.json', 'overview.png']

def test_dicom_seg(setup, tmp_path):
    "With highdicom installed, a DICOM series gets labels_seg.dcm: one segment per nodule, on the source slices, equal to labels.nii.gz."
    d, ck, chest = setup
    series = dicom_chest(chest, tmp_path / 'series')
    pd.read_csv(d / 'annotations.csv').assign(seriesuid=scan_id(series)).to_csv(tmp_path / 'pts.csv', index=False)
    try: import highdicom as hd, pydicom
    except ImportError: hd = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        rc, so, se = run('segment', '--checkpoint', ck, '--ct', series, '--nodules', tmp_path / 'pts.csv', '--out', tmp_path / 'o', '--threads', 1)
    assert rc == 0, se
    if hd is None:   # the optional extra is not installed here: the warning names it (CI installs it, so this branch is the exception)
        assert any('lungseg[dicomseg]' in str(w.message) for w in caught); return
    assert not [w for w in caught if 'DICOM SEG' in str(w.message)], [str(w.message) for w in caught]
    s = hd.seg.segread(tmp_path / 'o' / 'labels_seg.dcm')
    assert s.get_segment_numbers() == [1, 2, 3, 4, 5]
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series))]
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / 'o' / 'labels.nii.gz')))
    np.testing.assert_array_equal(s.get_pixels_by_source_instance(uids, combine_segments=True, relabel=False), lab)

def test_dicomseg_extra_declared():
    "settings.ini declares the optional extra that the messages name."
    import configparser
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(Path(__file__).parents[1] / 'settings.ini')
    assert 'highdicom' in cfg['DEFAULT']['dicomseg_requirements']

def test_threshold(setup):
    "`--threshold` reaches the masks: a higher threshold labels fewer voxels; without it, the threshold stored in the checkpoint is used."
    d, ck, chest = setup
    write_volume(chest.image, d / 'thr_in' / 'chest.nii.gz')
    n = {}
    for t in (0.3, 0.9):
        rc, so, se = run('segment', '--checkpoint', ck, '--ct', d / 'thr_in' / 'chest.nii.gz', '--nodules', d / 'annotations.csv',
                         '--out', d / f'thr{t}', '--threads', 1, '--threshold', t)
        assert rc == 0, se
        n[t] = int((sitk.GetArrayFromImage(sitk.ReadImage(str(d / f'thr{t}' / 'labels.nii.gz'))) > 0).sum())
    assert 0 < n[0.9] < n[0.3], n
    from lungseg.train import load_checkpoint, save_checkpoint   # a checkpoint whose threshold lungseg train chose: used when none is given
    tuned = {**load_checkpoint(ck), 'infer': dict(threshold=0.9, planes='axial', keep_centre=True, cases=3, dice={})}
    save_checkpoint(tuned, d / 'tuned.pt')
    rc, so, se = run('segment', '--checkpoint', d / 'tuned.pt', '--ct', d / 'thr_in' / 'chest.nii.gz', '--nodules', d / 'annotations.csv',
                     '--out', d / 'thr_tuned', '--threads', 1)
    assert rc == 0, se
    assert 'threshold 0.90 (chosen on 3 validation case(s)' in so, so
    assert int((sitk.GetArrayFromImage(sitk.ReadImage(str(d / 'thr_tuned' / 'labels.nii.gz'))) > 0).sum()) == n[0.9]
