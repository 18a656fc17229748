"""README.md and nbs/00_index.ipynb say the same thing, and what README shows works."""
import json, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _index_markdown():
    nb = json.loads((ROOT / 'nbs' / '00_index.ipynb').read_text())
    return [''.join(c['source']).strip() for c in nb['cells'] if c['cell_type'] == 'markdown']


def test_index_matches_readme():
    "Quarto (and so nbdev_readme) is not available: the index notebook keeps README's sections verbatim."
    sections = [p.strip() for p in re.split(r'(?m)^(?=## )', (ROOT / 'README.md').read_text())]
    assert _index_markdown() == sections


def test_ci_runs_readme_commands():
    readme, ci = (ROOT / 'README.md').read_text(), (ROOT / '.ci' / 'run').read_text()
    for cmd in ['pip install torch==2.13.0', 'pip install -c constraints.txt -e ".[dev]"']:
        assert cmd in readme and cmd in ci
    assert 'nbdev_test && pytest tests' in readme
    # CI runs the two halves on separate lines: under `set -e` a failure inside `a && b` would not stop the script
    assert re.search(r'^nbdev_test\b', ci, re.M) and re.search(r'^pytest tests\b', ci, re.M)


def test_readme_python_example_runs(tmp_path):
    "The 'Use it from Python' snippet in README runs as written."
    code = re.search(r'## Use it from Python\s+```python\n(.*?)```', (ROOT / 'README.md').read_text(), re.S).group(1)
    code = 'import torch; torch.set_num_threads(1)\n' + code + '\nassert out.seg.shape[-2:] == ds[0][0].shape[-2:]\n'
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_readme_results_table_is_the_saved_run():
    "README's LIDC table is computed from the raw results saved in nbs/results/lidc, not typed in."
    from lungseg.experiments import load_result, results_table, markdown_table, combine_results, every_case, pool_repeats
    readme, saved = (ROOT / 'README.md').read_text(), ROOT / 'nbs' / 'results' / 'lidc'
    four = ('unet', 'proposed', 'monai', 'instance_norm_segmenter')
    every = lambda run, switch='', models=four: every_case(combine_results(*(load_result(saved, f'{run}_{m}{switch}') for m in models), name='table1'))
    runs = ('k5', 'k5s1', 'k5s2')
    tables = {'table1 + reference': combine_results(load_result(saved, 'table1'), load_result(saved, 'reference')),
              'table3': load_result(saved, 'table3'),
              'five folds, every case, three repeats': pool_repeats(*(every(run) for run in runs)),
              'the same, all planes and the centre component': pool_repeats(*(every(run, '+planes+keep_centre', four + ('all_planes', 'monai_all_planes', 'same_time')) for run in runs))}
    for name, res in tables.items():
        table = markdown_table(results_table(res))
        assert table in readme, f'README lacks the {name} table of nbs/results/lidc:\n{table}'


def test_readme_flow_table_is_the_saved_run():
    "README's table of its own commands (lungseg train, then lungseg evaluate --keep-centre) is computed from the saved JSON files."
    from lungseg.experiments import evaluation_result, results_table, markdown_table
    readme, flow = (ROOT / 'README.md').read_text(), ROOT / 'nbs' / 'results' / 'lidc' / 'flow'
    rows = {'Proposed, instance norm in the segmenter, all planes, cosine': 'prop_cos',
            'Proposed, instance norm in the segmenter, all planes': 'prop_best',
            'Proposed, instance norm in the segmenter, all planes, cosine, pretrained on phantoms': 'tl_cos',
            'MONAI BasicUNet': 'monai', 'MONAI BasicUNet, all planes': 'monai_planes', 'MONAI BasicUNet, all planes, cosine': 'monai_planes_cos',
            'UNet, all planes, cosine': 'unet_cos', 'ResUNet, all planes, cosine': 'resunet_cos', 'ResUNet++, all planes, cosine': 'resunetpp_cos',
            'DeepLabv3+, all planes': 'deeplab', 'Proposed model': 'paper'}
    res = evaluation_result({label: [flow / f'{run}_s{s}+keep_centre.json' for s in (0, 1, 2)] for label, run in rows.items()})
    table = markdown_table(results_table(res, reference=next(iter(rows))))
    assert table in readme, f'README lacks the table of its own commands:\n{table}'


def test_readme_cv5_table_is_the_saved_run():
    "README's five-fold table of all 100 nodules is computed from the saved lungseg evaluate files of every fold and training seed."
    from lungseg.experiments import evaluation_result, results_table, markdown_table
    readme, cv5 = (ROOT / 'README.md').read_text(), ROOT / 'nbs' / 'results' / 'lidc' / 'cv5'
    rows = {'Proposed, instance norm in the segmenter, all planes, cosine': ('prop_cos', (0, 1, 2)),
            'MONAI BasicUNet, all planes, cosine': ('monai_planes_cos', (0, 1, 2)), 'UNet, all planes, cosine': ('unet_cos', (0, 1, 2))}
    files = lambda run, seed: [cv5 / f"{run}{f'_s{seed}' if seed else ''}_f{i}+keep_centre.json" for i in range(5)]
    res = evaluation_result({label: [files(run, s) for s in seeds] for label, (run, seeds) in rows.items()})
    assert res.test.case_id.nunique() == 100
    table = markdown_table(results_table(res))
    assert table in readme, f'README lacks the five-fold table:\n{table}'


def test_split_holds_out_the_readme_test_nodules(tmp_path):
    "lungseg split --data lidc, with its defaults, writes the 80 training and the 20 test nodules the README's table used."
    from lungseg.cli import main
    from lungseg.data import find_lidc, load_case_folder
    assert find_lidc() is not None, 'the LIDC sample (../shared/data/lidc-nodules or $LUNGSEG_LIDC_DIR) is needed here'
    assert main(['split', '--data', 'lidc', '--out', str(tmp_path)]) == 0
    split = json.loads((tmp_path / 'split.json').read_text())
    scored = json.loads((ROOT / 'nbs' / 'results' / 'lidc' / 'flow' / 'prop_cos_s0+keep_centre.json').read_text())['per_case']
    assert sorted(split['test']) == sorted(c['case_id'] for c in scored)
    assert len(split['train']) == 80 and not set(split['train']) & set(split['test'])
    assert sorted(c.case_id for c in load_case_folder(tmp_path / 'test')) == sorted(split['test'])
