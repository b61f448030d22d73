"""A plug-in patches nothing: a plain BasicSR run is the same with and without krdistill, and
krdistill-train changes BasicSR only for the duration of its own call (CONVENTIONS.md)."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_opt, write_yaml

REPO = Path(__file__).resolve().parents[1]
ITERS = 6

#: the BasicSR functions krdistill used to replace; each must stay BasicSR's own
BASICSR_OWN = '''
def basicsr_own():
    import basicsr.train as bt, basicsr.utils as bu, basicsr.utils.misc as misc, basicsr.utils.dist_util as du
    from basicsr.data.paired_image_dataset import PairedImageDataset
    from basicsr.data.single_image_dataset import SingleImageDataset
    funcs = {'create_train_val_dataloader': bt.create_train_val_dataloader, 'load_resume_state': bt.load_resume_state,
             'check_resume': misc.check_resume, 'utils.check_resume': bu.check_resume,
             'train.check_resume': bt.check_resume, '_init_dist_pytorch': du._init_dist_pytorch,
             'PairedImageDataset.__getitem__': PairedImageDataset.__getitem__,
             'SingleImageDataset.__getitem__': SingleImageDataset.__getitem__}
    return {k: f.__module__ for k, f in funcs.items()}
'''

SCRIPT = BASICSR_OWN + '''
import importlib, json, sys
mode, yml, yml_checked, root = sys.argv[1:5]
if mode == 'with':
    import krdistill  # noqa: F401
else:  # no krdistill at all: the one alias basicsr 1.4.2 needs on this torchvision, by hand
    sys.modules['torchvision.transforms.functional_tensor'] = importlib.import_module(
        'torchvision.transforms._functional_tensor')
import basicsr.train
report = {'before': basicsr_own()}
sys.argv = ['basicsr/train.py', '-opt', yml]
basicsr.train.train_pipeline(root)
report['after_pipeline'] = basicsr_own()
if mode == 'with':
    from krdistill.train import main
    main(['-opt', yml_checked], root_path=root)
    report['after_krdistill_train'] = basicsr_own()
report['krdistill_imported'] = 'krdistill' in sys.modules
print('REPORT ' + json.dumps(report))
'''


def _sr_opt(root: Path, name: str, dataset_type: str) -> dict:
    """A tiny plain BasicSR SRModel run: no teacher, no krdistill class (unless the dataset type is one)."""
    opt = tiny_opt(root, total_iter=ITERS)
    opt.update(name=name, model_type='SRModel')
    for k in ('network_t', 'kd'):
        opt.pop(k, None)
    for k in ('pretrain_network_t', 'param_key_t', 'strict_load_t', 'ignore_resume_networks'):
        opt['path'].pop(k, None)
    for k in [k for k in opt['train'] if k not in ('ema_decay', 'optim_g', 'scheduler', 'total_iter', 'warmup_iter',
                                                   'pixel_opt')]:
        opt['train'].pop(k)
    for d in opt['datasets'].values():
        d['type'] = dataset_type
    opt['val']['val_freq'] = ITERS
    opt['logger'].update(print_freq=1, save_checkpoint_freq=3)
    return opt


def _run(mode: str, root: Path) -> dict:
    root.mkdir()
    yml = write_yaml(_sr_opt(root, 'plain', 'PairedImageDataset'), root / 'plain.yml')
    yml_checked = write_yaml(_sr_opt(root, 'checked', 'CheckedPairedImageDataset'), root / 'checked.yml')
    script = root / 'run.py'
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS='1', KRDISTILL_AUTOLOAD='1' if mode == 'with' else '0')
    out = subprocess.run([sys.executable, str(script), mode, str(yml), str(yml_checked), str(root)], cwd=root,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    line = [ln for ln in out.stdout.splitlines() if ln.startswith('REPORT ')][-1]
    return json.loads(line[len('REPORT '):])


def _losses(root: Path, name: str) -> list[str]:
    text = ''.join(p.read_text() for p in (root / 'experiments' / name).glob('train_*.log'))
    return re.findall(r'l_pix: ([0-9.e+-]+)', text)


def _weights(root: Path, name: str) -> dict:
    models = root / 'experiments' / name / 'models'
    return {p.name: torch.load(p, map_location='cpu', weights_only=True)['params']
            for p in sorted(models.glob('*.pth'))}


def test_plain_basicsr_run_is_identical_with_and_without_krdistill(tmp_path):
    with_k, without = tmp_path / 'with', tmp_path / 'without'
    report_with, report_without = _run('with', with_k), _run('without', without)
    assert report_without['krdistill_imported'] is False and report_with['krdistill_imported'] is True
    for report in (report_with, report_without):
        for when, modules in report.items():
            if when == 'krdistill_imported':
                continue
            for name, module in modules.items():
                assert module.startswith('basicsr'), f'{when}: {name} is {module}.{name}, not BasicSR\'s own'

    losses = _losses(without, 'plain')
    assert len(losses) == ITERS
    ref = _weights(without, 'plain')
    assert set(ref) == {'net_g_3.pth', 'net_g_6.pth', 'net_g_latest.pth'}
    # BasicSR's train_pipeline after `import krdistill`, and krdistill-train with CheckedPairedImageDataset
    for name in ('plain', 'checked'):
        assert _losses(with_k, name) == losses, name
        got = _weights(with_k, name)
        assert got.keys() == ref.keys()
        for f, params in ref.items():
            for k, v in params.items():
                assert torch.equal(v, got[f][k]), f'{name}: {f} {k} differs'


def test_overrides_last_only_for_the_call(tmp_path, monkeypatch):
    """Inside krdistill-train BasicSR's globals are krdistill's; after it (also after an error) BasicSR's own."""
    import basicsr.train as bt
    from basicsr.utils import dist_util
    from basicsr.utils import options as bsr_options
    from krdistill import entry
    from krdistill.io import SafeOrderedLoader
    from krdistill.train import main as train_main
    own = (bt.load_resume_state, bt.create_train_val_dataloader, dist_util._init_dist_pytorch,
           bsr_options.ordered_yaml)
    seen = {}

    def spy(root_path):
        seen['inside'] = (bt.load_resume_state, bt.create_train_val_dataloader, dist_util._init_dist_pytorch,
                          bsr_options.ordered_yaml)
        raise KeyboardInterrupt  # a run interrupted by the user
    monkeypatch.setattr(bt, 'train_pipeline', spy)
    (tmp_path / 'x.yml').write_text('name: x\n')  # read (safely) before the pipeline starts
    with pytest.raises(KeyboardInterrupt):
        train_main(['-opt', str(tmp_path / 'x.yml')], root_path=str(tmp_path))
    inside = seen['inside']
    assert inside[0].__self__.__class__.__name__ == '_TrainRun' and inside[2] is entry.init_dist_pytorch
    assert inside[3]()[0] is SafeOrderedLoader  # BasicSR's parse_options reads the file with the safe loader
    assert all(a is not b for a, b in zip(inside, own))
    assert (bt.load_resume_state, bt.create_train_val_dataloader, dist_util._init_dist_pytorch,
            bsr_options.ordered_yaml) == own


def test_no_import_circle(tmp_path):
    """compat.py imports the standard library only (never _krdistill_autoload); the autoload module
    imports neither krdistill nor basicsr nor torch, and applies the alias before basicsr's code runs."""
    tree = ast.parse((REPO / 'krdistill' / 'compat.py').read_text())
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names) | {'__future__'}, imported
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert '_krdistill_autoload' not in literals  # nor by importlib.import_module('_krdistill_autoload')

    code = '''
import importlib.util, json, sys
report = {}
import _krdistill_autoload
report['after_autoload'] = sorted(m for m in ('krdistill', 'krdistill.compat', 'basicsr', 'torch') if m in sys.modules)
spec = importlib.util.spec_from_file_location('compat_alone', sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
report['after_compat'] = sorted(m for m in ('krdistill', 'basicsr', 'torch') if m in sys.modules)

seen = {}
class Recorder:  # what was loaded when basicsr's own code started importing its submodules
    def find_spec(self, name, path=None, target=None):
        if name == 'basicsr.utils' and not seen:
            seen.update(krdistill='krdistill' in sys.modules,
                        alias='torchvision.transforms.functional_tensor' in sys.modules)
sys.meta_path.insert(0, Recorder())
_krdistill_autoload.install()  # no-op: the .pth of the environment installed it at start-up
import basicsr
report['at_basicsr_utils'] = seen
report['krdistill_after'] = 'krdistill' in sys.modules
print(json.dumps(report))
'''
    env = dict(os.environ, KRDISTILL_AUTOLOAD='1')
    out = subprocess.run([sys.executable, '-c', code, str(REPO / 'krdistill' / 'compat.py')], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report['after_autoload'] == [] and report['after_compat'] == []
    # basicsr's own code runs with the alias applied and before krdistill is imported; krdistill comes after
    assert report['at_basicsr_utils'] == {'krdistill': False, 'alias': True}
    assert report['krdistill_after']

def test_compat_is_the_alias_only():
    from krdistill import compat
    own = [n for n in dir(compat) if not n.startswith('_') and callable(getattr(compat, n))
           and getattr(getattr(compat, n), '__module__', '') == compat.__name__]
    assert own == ['alias_functional_tensor', 'apply']
    compat.apply()
    compat.apply()
    assert 'torchvision.transforms.functional_tensor' in sys.modules
