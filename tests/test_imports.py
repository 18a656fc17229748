"""The core of lungseg imports no GUI library.

Training jobs (`torchrun`, a batch server) import `lungseg.models` and `lungseg.train`; they
must not load ipywidgets or matplotlib's pyplot (a GUI backend, slow to import, and
useless there). The interactive parts (`STDExplorer`, the case browser, plots) import them
inside their methods. Each check runs in a fresh interpreter, so modules imported by
other tests in this process cannot hide or fake a GUI import.

Run it: `pytest tests/test_imports.py -q`.
"""
import json, os, subprocess, sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORE = ('data', 'phantoms', 'std', 'blocks', 'models', 'baselines', 'metrics', 'train')
GUI = ('ipywidgets', 'matplotlib.pyplot', 'IPython.display')


def _loaded_after(code: str) -> dict:
    "Run `code` in a fresh Python with the repo first on the path; return which GUI modules ended up in sys.modules."
    probe = code + f"\nimport sys, json; print(json.dumps({{m: m in sys.modules for m in {GUI!r}}}))"
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
           'OMP_NUM_THREADS': '1', 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, '-c', probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_probe_uses_this_checkout():
    out = subprocess.run([sys.executable, '-c', 'import lungseg; print(lungseg.__file__)'], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert Path(out.stdout.strip()).resolve().parent == REPO / 'lungseg', out.stdout + out.stderr


@pytest.mark.parametrize('mod', CORE)
def test_core_module_imports_no_gui(mod):
    loaded = _loaded_after(f'import lungseg.{mod}')
    assert not any(loaded.values()), f'import lungseg.{mod} loads {[m for m, v in loaded.items() if v]}'


def test_whole_core_imports_no_gui():
    loaded = _loaded_after('import ' + ', '.join(f'lungseg.{m}' for m in CORE))
    assert not any(loaded.values()), f'the core loads {[m for m, v in loaded.items() if v]}'


def test_std_explorer_still_importable_from_std():
    "The explorer stays `lungseg.std.STDExplorer`; its GUI imports happen when it is built, not on import."
    loaded = _loaded_after('from lungseg.std import STDExplorer')
    assert not any(loaded.values()), loaded
    loaded = _loaded_after('import numpy as np\nfrom lungseg.std import STDExplorer\n'
                           'ex = STDExplorer(np.zeros((8, 8)), np.ones((8, 8)), draw=False, n_c=3)\n'
                           'assert set(ex.params) == set(STDExplorer.names)')
    assert loaded['ipywidgets'], 'building the explorer should bring its sliders (ipywidgets)'
