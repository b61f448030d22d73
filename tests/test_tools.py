"""tools/export_student.py and tools/list_modules.py on tiny CPU networks."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

import krdistill  # noqa: F401  (shims before basicsr)
from basicsr.archs import build_network
from krdistill.features import FeatureRecorder

REPO = Path(__file__).resolve().parents[1]
EDSR_OPT = dict(type='EDSR', num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=2)
SWINIR_OPT = dict(type='SwinIR', img_size=16, window_size=4, embed_dim=12, depths=[2], num_heads=[2], upscale=2,
                  upsampler='pixelshuffle', in_chans=3, mlp_ratio=2.)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f'_tool_{name}', REPO / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope='module')
def export_tool():
    return _load_tool('export_student')


@pytest.fixture(scope='module')
def list_tool():
    return _load_tool('list_modules')


def _edsr(seed: int = 0):
    torch.manual_seed(seed)
    return build_network(EDSR_OPT).eval()


def _run_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """experiments/run/models with net_g_{5,10}.pth (module.-prefixed params + params_ema) and net_kr_10.pth."""
    net, ema = _edsr(0), _edsr(1)
    models = tmp_path / 'experiments' / 'run' / 'models'
    models.mkdir(parents=True)
    for it in (5, 10):
        torch.save({'params': {f'module.{k}': v for k, v in net.state_dict().items()},
                    'params_ema': ema.state_dict()}, models / f'net_g_{it}.pth')
    torch.save({'params': {'conv.weight': torch.zeros(4, 8, 1, 1)}}, models / 'net_kr_10.pth')
    return models.parent, net, ema


def _same_output(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


# ---------------------------------------------------------------------------- export_student
def test_export_strips_to_params_and_loads_strictly(tmp_path, export_tool):
    run, net, ema = _run_folder(tmp_path)
    out = tmp_path / 'student.pth'
    assert export_tool.main([str(run), '-o', str(out)]) == 0
    ckpt = torch.load(out, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'params', 'params_ema'}
    assert not any(k.startswith('module.') for k in ckpt['params'])
    assert all(v.device.type == 'cpu' for v in ckpt['params'].values())
    fresh = build_network(EDSR_OPT)
    fresh.load_state_dict(ckpt['params'], strict=True)
    assert _same_output(fresh, net)
    fresh.load_state_dict(ckpt['params_ema'], strict=True)
    assert _same_output(fresh, ema)


def test_export_picks_latest_iteration_and_param_key(tmp_path, export_tool):
    run, _, ema = _run_folder(tmp_path)
    assert export_tool.find_checkpoint(str(run)).endswith('net_g_10.pth')
    assert export_tool.find_checkpoint(str(run / 'models'), iteration=5).endswith('net_g_5.pth')
    out = tmp_path / 'ema.pth'
    assert export_tool.main([str(run), '-o', str(out), '--param-key', 'params_ema', '--iter', '5']) == 0
    ckpt = torch.load(out, map_location='cpu', weights_only=True)
    assert set(ckpt) == {'params'}  # EMA weights under the key BasicSR loads by default
    fresh = build_network(EDSR_OPT)
    fresh.load_state_dict(ckpt['params'], strict=True)
    assert _same_output(fresh, ema)


def test_export_loads_in_vanilla_srmodel(tmp_path, export_tool):
    from basicsr.models.sr_model import SRModel
    run, net, _ = _run_folder(tmp_path)
    out = tmp_path / 'student.pth'
    export_tool.export_student(str(run), str(out))
    opt = dict(is_train=False, dist=False, num_gpu=0, scale=2, network_g=dict(EDSR_OPT),
               path=dict(pretrain_network_g=str(out), strict_load_g=True, param_key_g='params'))
    model = SRModel(opt)
    assert _same_output(model.net_g, net)


def test_export_verifies_against_option_file(tmp_path, export_tool, capsys):
    run, _, _ = _run_folder(tmp_path)
    good = tmp_path / 'good.yml'
    good.write_text(yaml.safe_dump({'network_g': EDSR_OPT}))
    assert export_tool.main([str(run), '-o', str(tmp_path / 's.pth'), '--opt', str(good)]) == 0
    n = sum(p.numel() for p in build_network(EDSR_OPT).parameters())
    assert f'{n:,} parameters' in capsys.readouterr().out
    bad = tmp_path / 'bad.yml'
    bad.write_text(yaml.safe_dump({'network_g': dict(EDSR_OPT, num_feat=16)}))
    assert export_tool.main([str(run), '-o', str(tmp_path / 's2.pth'), '--opt', str(bad)]) == 1
    assert 'does not load strictly' in capsys.readouterr().err


def test_export_refuses_files_without_student_params(tmp_path, export_tool, capsys):
    run, _, _ = _run_folder(tmp_path)
    kr = run / 'models' / 'net_kr_10.pth'
    with pytest.raises(export_tool.ExportError, match='not the student'):
        export_tool.export_student(str(kr), str(tmp_path / 'x.pth'))
    assert export_tool.main([str(kr), '-o', str(tmp_path / 'x.pth')]) == 1
    assert 'net_kr' in capsys.readouterr().err
    other = tmp_path / 'weights.pth'
    torch.save({'regressor': {'w': torch.zeros(2)}}, other)
    with pytest.raises(export_tool.ExportError, match='no student params'):
        export_tool.export_student(str(other), str(tmp_path / 'y.pth'))
    bare = tmp_path / 'bare.pth'
    torch.save(_edsr().state_dict(), bare)
    with pytest.raises(export_tool.ExportError, match='bare state dict'):
        export_tool.export_student(str(bare), str(tmp_path / 'z.pth'))
    with pytest.raises(export_tool.ExportError, match="no 'params_ema'"):
        torch.save({'params': _edsr().state_dict()}, tmp_path / 'p.pth')
        export_tool.export_student(str(tmp_path / 'p.pth'), str(tmp_path / 'q.pth'), param_key='params_ema')
    assert not any((tmp_path / n).exists() for n in ('x.pth', 'y.pth', 'z.pth', 'q.pth'))


# ---------------------------------------------------------------------------- list_modules
def test_list_modules_edsr_rows(list_tool):
    rows = {r['name']: r for r in list_tool.module_rows(build_network(EDSR_OPT), (32, 32), 3)}
    assert rows['body.0']['cls'] == 'ResidualBlockNoBN'
    assert rows['body.0']['shape'] == '1 x 8 x 32 x 32'
    assert rows['body.0']['kind'] == 'map' and rows['body.0']['valid'] and rows['body.0']['channels'] == 8
    assert rows['conv_last']['shape'] == '1 x 3 x 64 x 64'
    assert '' not in rows
    shallow = list_tool.module_rows(build_network(EDSR_OPT), depth=1)
    assert all('.' not in r['name'] for r in shallow)
    filtered = list_tool.module_rows(build_network(EDSR_OPT), pattern=r'^body\.\d+$')
    assert [r['name'] for r in filtered] == ['body.0', 'body.1']


def test_list_modules_swinir_tokens_reshapeable(list_tool):
    net = build_network(SWINIR_OPT)
    rows = {r['name']: r for r in list_tool.module_rows(net, (16, 16), 3)}
    layer = rows['layers.0']
    assert layer['kind'] == 'tokens' and layer['valid'] and layer['channels'] == 12
    assert layer['shape'].startswith('tokens 1 x 256 x 12')
    assert not rows['patch_embed']['valid']  # tokens without an (H, W) argument
    assert rows['patch_embed']['shape'].startswith('tokens')
    assert not rows['layers']['valid'] and rows['layers']['calls'] == 0  # ModuleList never called
    # every point marked valid is accepted by FeatureRecorder, every 3-D one not marked is refused
    valid = [n for n, r in rows.items() if r['valid']]
    rec = FeatureRecorder(net, valid)
    with rec, torch.no_grad():
        net(torch.rand(1, 3, 16, 16))
    assert all(f.dim() == 4 for f in rec.features())
    rec.remove()
    with FeatureRecorder(net, ['patch_embed']) as bad, pytest.raises(ValueError, match='tokens'):
        net(torch.rand(1, 3, 16, 16))
    bad.remove()


def test_list_modules_cli(tmp_path, list_tool, capsys):
    opt = tmp_path / 'opt.yml'
    opt.write_text(yaml.safe_dump({'network_g': SWINIR_OPT, 'network_t': EDSR_OPT}))
    assert list_tool.main(['-opt', str(opt), '--filter', r'^(layers\.0|body\.0)$']) == 0
    out = capsys.readouterr().out
    assert 'network_g: SwinIR' in out and 'network_t: EDSR' in out
    assert 'layers.0' in out and 'yes (tokens)' in out and 'body.0' in out
    assert list_tool.main(['-opt', str(opt), '--net', 'network_t', '--depth', '1', '--size', '16', '20']) == 0
    out = capsys.readouterr().out
    assert 'network_g' not in out and '1 x 8 x 16 x 20' in out and 'body.0' not in out


def test_list_modules_pairs_shows_what_kd_auto_chooses(tmp_path, list_tool, capsys):
    opt = tmp_path / 'opt.yml'
    opt.write_text(yaml.safe_dump({'network_g': SWINIR_OPT, 'network_t': EDSR_OPT, 'kd': {'auto': True, 'points': 1}}))
    assert list_tool.main(['-opt', str(opt), '--pairs', '--size', '16']) == 0
    out = capsys.readouterr().out
    last_t = f'body.{EDSR_OPT["num_block"] - 1}'
    last_s = f'layers.{len(SWINIR_OPT["depths"]) - 1}'
    assert 'kd: auto, 1 point(s)' in out and f'{last_t} (' in out and f'-> {last_s} (' in out
    assert list_tool.main(['-opt', str(opt), '--pairs', '99']) == 1
    assert 'kd.points: 99 points asked' in capsys.readouterr().err


def test_make_val_images_writes_scale_multiples(tmp_path):
    import cv2
    tool = _load_tool('make_val_images')
    paths = tool.main([str(tmp_path / 'skval' / 'HR'), '--scale', '4'])
    assert [p.stem for p in paths] == list(tool.VAL_IMAGES)
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] % 4 == 0 and img.shape[1] % 4 == 0, p


def test_export_to_a_folder_names_output(tmp_path, export_tool):
    run, _, _ = _run_folder(tmp_path)
    with pytest.raises(export_tool.ExportError, match=r'^--output: .* is a folder; give a file name'):
        export_tool.export_student(str(run), str(tmp_path))
