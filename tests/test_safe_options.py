"""No option file runs code: every entry point reads YAML with krdistill's safe loader, and a Python tag
is refused before anything runs, naming the file and the tag (issue 28, principle 1)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import basicsr
import pytest
import yaml

from helpers import tiny_opt, write_yaml
from krdistill.entry import check_command_line
from krdistill.io import OptionFileError, UnsafeYAMLError, load_options, load_yaml
from krdistill import test as krdistill_test
from krdistill.train import main as train_main

REPO = Path(__file__).resolve().parents[1]


def _tagged(tmp_path: Path, opt: dict, where: str, tag_text: str, name: str = 'evil.yml') -> Path:
    """Write ``opt`` as YAML, then put ``tag_text`` (a YAML node with a Python tag) at ``where``."""
    text = yaml.safe_dump(opt, sort_keys=False)
    if where == 'top':
        text += f'note: {tag_text}\n'
    elif where == 'nested':  # inside train.optim_g
        text = text.replace('  optim_g:\n', f'  optim_g:\n    hook: {tag_text}\n', 1)
    elif where == 'in a list':
        text += f'extra:\n- 1\n- {tag_text}\n'
    elif where == 'model_type':
        text = text.replace('model_type: KDSRModel', f'model_type: {tag_text}', 1)
    path = tmp_path / name
    path.write_text(text)
    return path


def _payloads(marker: Path) -> dict[str, tuple[str, str]]:
    """name -> (YAML node, the tag the message must name). Each would touch ``marker`` under PyYAML's
    unsafe loader (BasicSR's ``ordered_yaml``)."""
    return {
        'object/apply': (f'!!python/object/apply:os.system ["touch {marker}"]', '!!python/object/apply:os.system'),
        'object/new': (f'!!python/object/new:subprocess.check_call [["touch", "{marker}"]]',
                       '!!python/object/new:subprocess.check_call'),
        'name': ('!!python/name:os.system', '!!python/name:os.system'),
    }


def _train_opt(tmp_path: Path) -> dict:
    opt = tiny_opt(tmp_path, total_iter=2)
    for k in ('is_train', 'dist', 'rank', 'world_size', 'auto_resume', 'root_path'):
        opt.pop(k)
    for k in ('experiments_root', 'models', 'training_states', 'log', 'visualization'):
        opt['path'].pop(k)
    for d in opt['datasets'].values():
        d.pop('phase')
        d.pop('scale')
    return opt


def test_the_unsafe_loader_would_run_these_payloads(tmp_path):
    """The payloads of the tests below do run under BasicSR's own loader (so refusing them matters)."""
    from basicsr.utils.options import ordered_yaml
    marker = tmp_path / 'ran'
    node, _ = _payloads(marker)['object/apply']
    (tmp_path / 'p.yml').write_text(f'note: {node}\n')
    with open(tmp_path / 'p.yml') as f:
        yaml.load(f, Loader=ordered_yaml()[0])
    assert marker.exists()


@pytest.mark.parametrize('where', ['top', 'nested', 'in a list', 'model_type'])
@pytest.mark.parametrize('payload', ['object/apply', 'object/new', 'name'])
def test_krdistill_train_refuses_a_python_tag_before_anything_runs(tmp_path, monkeypatch, where, payload):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / 'ran'
    node, tag = _payloads(marker)[payload]
    yml = _tagged(tmp_path, _train_opt(tmp_path), where, node)
    with pytest.raises(UnsafeYAMLError) as e:
        train_main(['-opt', str(yml)], root_path=str(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f'-opt: {yml} ') and tag in msg, msg
    line = next(i + 1 for i, text in enumerate(yml.read_text().splitlines()) if tag.split(':')[0] in text)
    assert f'line {line}' in msg, msg
    assert 'weights_only' not in msg
    assert not marker.exists()
    assert not (tmp_path / 'experiments').exists()  # nothing of the run was made


def test_krdistill_test_refuses_a_python_tag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / 'ran'
    opt = _train_opt(tmp_path)
    opt['name'] = 'tiny_test'
    opt.pop('train')
    opt['path'] = {'pretrain_network_g': str(tmp_path / 'teacher.pth'), 'param_key_g': 'params'}
    opt['network_g'] = opt['network_t']
    yml = _tagged(tmp_path, opt, 'top', _payloads(marker)['object/apply'][0])
    with pytest.raises(UnsafeYAMLError, match=r'!!python/object/apply:os\.system at line \d+ \(note\)'):
        krdistill_test.main(['-opt', str(yml)], root_path=str(tmp_path))
    assert not marker.exists() and not (tmp_path / 'results').exists()


def test_the_safe_loader_reads_every_shipped_option_file_as_basicsr_does():
    """Same values, same key order, same OrderedDict mappings as BasicSR's ``ordered_yaml`` loader."""
    from basicsr.utils.options import ordered_yaml

    def types(x):
        if isinstance(x, dict):
            return (type(x).__name__, [(k, types(v)) for k, v in x.items()])
        if isinstance(x, list):
            return [types(v) for v in x]
        return type(x).__name__

    files = sorted(glob.glob(str(REPO / 'options' / '**' / '*.yml'), recursive=True))
    assert len(files) >= 10
    for f in files:
        with open(f) as fh:
            theirs = yaml.load(fh, Loader=ordered_yaml()[0])
        ours = load_options(f)
        assert isinstance(ours, OrderedDict) and ours == theirs and types(ours) == types(theirs), f


def test_option_file_errors_name_the_file(tmp_path):
    opt = _train_opt(tmp_path)
    cases = {
        'empty.yml': ('', 'is empty'),
        'list.yml': ('- 1\n- 2\n', 'holds a list, not a mapping'),
        'broken.yml': ('name: [unclosed\n', 'is not valid YAML'),
        'duplicate.yml': (yaml.safe_dump(opt, sort_keys=False) + 'name: again\n', "the key 'name' appears twice"),
        'custom_tag.yml': ('name: !include other.yml\n', '!include at line 1 (name)'),
    }
    for name, (text, expected) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(OptionFileError) as e:
            train_main(['-opt', str(path)], root_path=str(tmp_path))
        assert str(e.value).startswith(f'-opt: {path}') and expected in str(e.value), (name, str(e.value))
    with pytest.raises(FileNotFoundError, match=f'-opt: no such file: {tmp_path / "missing.yml"}'):
        train_main(['-opt', str(tmp_path / 'missing.yml')], root_path=str(tmp_path))
    with pytest.raises(IsADirectoryError, match=f'-opt: {tmp_path} is a folder, not a file'):
        train_main(['-opt', str(tmp_path)], root_path=str(tmp_path))
    (tmp_path / 'latin1.yml').write_bytes('name: caf\xe9\n'.encode('latin-1'))
    with pytest.raises(OptionFileError, match='latin1.yml is not UTF-8 text'):
        train_main(['-opt', str(tmp_path / 'latin1.yml')], root_path=str(tmp_path))
    assert not (tmp_path / 'experiments').exists()


def test_aliases_are_walked_once_and_merge_keys_work(tmp_path):
    """A 'billion laughs' document is checked in linear time; ``<<: *anchor`` merges as in YAML 1.1."""
    rows = ['a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]']
    for prev, name in zip('abcdefg', 'bcdefgh'):
        rows.append(f'{name}: &{name} [' + ', '.join([f'*{prev}'] * 9) + ']')
    (tmp_path / 'laughs.yml').write_text('\n'.join(rows) + '\n')
    assert len(load_yaml(tmp_path / 'laughs.yml')['h']) == 9
    (tmp_path / 'merge.yml').write_text('base: &b {lr: 1.0e-3, betas: [0.9, 0.99]}\noptim_g:\n  <<: *b\n  lr: 2.0e-4\n')
    assert load_yaml(tmp_path / 'merge.yml')['optim_g'] == {'lr': 2e-4, 'betas': [0.9, 0.99]}


@pytest.mark.parametrize('entry', [
    'name"]=1;__import__("os").system("touch {m}");opt["name',  # the key path is exec'd
    'name=[__import__("os").system("touch {m}")]',  # a value starting with [ is eval'd
])
def test_force_yml_that_basicsr_would_run_is_refused(tmp_path, monkeypatch, entry):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / 'ran'
    yml = write_yaml(tiny_opt(tmp_path, total_iter=2), tmp_path / 'ok.yml')
    entry = entry.replace('{m}', str(marker))
    with pytest.raises(ValueError, match='--force_yml') as e:
        train_main(['-opt', str(yml), '--force_yml', entry], root_path=str(tmp_path))
    assert 'run it as Python code' in str(e.value)
    assert not marker.exists() and not (tmp_path / 'experiments').exists()
    check_command_line(['-opt', str(yml), '--force_yml', 'train:total_iter=3', 'kd:teacher_layers=["body.1"]'])


def test_tools_read_option_files_safely(tmp_path):
    """evaluate, export, list_modules, kr_picture and the demo refuse a tagged option file."""
    import importlib.util
    from krdistill.evaluation import main as evaluate_main
    marker = tmp_path / 'ran'
    yml = tmp_path / 'net.yml'
    yml.write_text('network_g: {type: EDSR, num_feat: 8, num_block: 1, upscale: 2}\n'
                   f'note: !!python/object/apply:os.system ["touch {marker}"]\n')
    (tmp_path / 'hr').mkdir()

    def tool(name):
        spec = importlib.util.spec_from_file_location(f'_safe_{name}', REPO / 'tools' / f'{name}.py')
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    assert evaluate_main(['--bicubic', '--hr-dir', str(tmp_path / 'hr'), '--scale', '2', '-opt', str(yml)]) == 1
    export = tool('export_student')
    with pytest.raises(export.ExportError, match=r'--opt: .*net\.yml.*!!python/object/apply:os\.system'):
        export.load_network_opt(str(yml))
    assert tool('list_modules').main(['-opt', str(yml)]) == 1
    with pytest.raises(UnsafeYAMLError, match='-opt'):
        tool('kr_picture').main(['-opt', str(yml), '--image', str(tmp_path / 'x.png')])
    sys.path.insert(0, str(REPO / 'tools'))
    try:
        from krbench.demo import load_option
        with pytest.raises(UnsafeYAMLError):
            load_option(yml)
    finally:
        sys.path.remove(str(REPO / 'tools'))
    assert not marker.exists()


# ------------------------------------------------------------------ BasicSR's own train.py / test.py
def _site_with_pth(tmp_path: Path) -> Path:
    site_dir = tmp_path / 'site'
    site_dir.mkdir(exist_ok=True)
    shutil.copy(REPO / 'krdistill-autoload.pth', site_dir)
    return site_dir


def _basicsr(tmp_path: Path, script: str, yml: Path) -> subprocess.CompletedProcess:
    """``python basicsr/<script>.py -opt yml`` of a BasicSR checkout, with krdistill's interpreter-start
    hook installed."""
    site_dir = _site_with_pth(tmp_path)
    prelude = f'import site; site.addsitedir({str(site_dir)!r}); '
    env = dict(os.environ, KRDISTILL_AUTOLOAD='1', OMP_NUM_THREADS='1')
    checkout = tmp_path / 'BasicSR'
    (checkout / 'basicsr').mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(basicsr.__file__).parent / f'{script}.py', checkout / 'basicsr' / f'{script}.py')
    argv = [f'basicsr/{script}.py', '-opt', str(yml)]
    code = prelude + f'import runpy, sys; sys.argv = {argv!r}; ' \
        f'runpy.run_path("basicsr/{script}.py", run_name="__main__")'
    return subprocess.run([sys.executable, '-c', code], cwd=checkout, capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize('script', ['train', 'test'])
def test_basicsr_scripts_refuse_a_krdistill_option_file_with_a_python_tag(tmp_path, script):
    marker = tmp_path / 'ran'
    yml = _tagged(tmp_path, _train_opt(tmp_path), 'nested', _payloads(marker)['object/apply'][0])
    out = _basicsr(tmp_path, script, yml)
    assert out.returncode == 2, out.stderr[-3000:]
    assert str(yml) in out.stderr and '!!python/object/apply:os.system' in out.stderr, out.stderr[-3000:]
    assert 'Traceback' not in out.stderr
    assert not marker.exists()


def test_python_m_basicsr_train_refuses_too(tmp_path):
    """``python -m basicsr.train`` (the hook installed in this environment's site-packages)."""
    marker = tmp_path / 'ran'
    yml = _tagged(tmp_path, _train_opt(tmp_path), 'top', _payloads(marker)['object/apply'][0])
    out = subprocess.run([sys.executable, '-m', 'basicsr.train', '-opt', str(yml)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, KRDISTILL_AUTOLOAD='1'))
    assert out.returncode == 2, out.stderr[-3000:]
    assert '!!python/object/apply:os.system' in out.stderr and str(yml) in out.stderr
    assert not marker.exists()


def test_basicsr_scripts_leave_other_models_to_basicsr_with_a_warning(tmp_path):
    """A run of a BasicSR model (no krdistill class) behaves as without krdistill, plus one warning line."""
    opt = {'name': 'plain', 'model_type': 'SRModel', 'num_gpu': 0, 'note': 'x'}
    text = yaml.safe_dump(opt, sort_keys=False).replace("note: x", "note: !!python/object/apply:os.getcwd []")
    yml = tmp_path / 'plain.yml'
    yml.write_text(text)
    out = _basicsr(tmp_path, 'train', yml)
    assert 'krdistill autoload: warning' in out.stderr and 'not a krdistill run' in out.stderr, out.stderr[-3000:]
    assert 'refusing' not in out.stderr


def test_the_hook_check_names_force_yml_and_tags(tmp_path):
    """What the autoload check finds on a command line of BasicSR's scripts (no subprocess)."""
    from krdistill.entry import basicsr_option_problem
    yml = write_yaml(tiny_opt(tmp_path, total_iter=2), tmp_path / 'ok.yml')
    assert basicsr_option_problem(['-opt', str(yml)]) is None
    assert basicsr_option_problem(['-opt', str(yml), '--force_yml', 'train:total_iter=3']) is None
    bad = basicsr_option_problem(['-opt', str(yml), '--force_yml', 'name=[__import__("os").getcwd()]'])
    assert bad.startswith("--force_yml 'name=[") and 'not a plain list' in bad
    tagged = _tagged(tmp_path, _train_opt(tmp_path), 'top', '!!python/name:os.getcwd')
    assert '!!python/name:os.getcwd at line' in basicsr_option_problem(['-opt', str(tagged)])
    assert basicsr_option_problem(['-opt', str(tmp_path / 'missing.yml')]) is None  # BasicSR reports it
