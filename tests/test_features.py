"""FeatureRecorder: records the module output, only inside its context, clear errors, hooks removed."""
import pytest
import torch

import krdistill  # noqa: F401
from helpers import cpu_data_parallel
from basicsr.archs.edsr_arch import EDSR
from basicsr.archs.rcan_arch import RCAN
from basicsr.archs.rrdbnet_arch import RRDBNet
from basicsr.archs.srresnet_arch import MSRResNet
from basicsr.archs.swinir_arch import SwinIR

from krdistill.features import FeatureRecorder, resolve_module, unwrap


def _edsr():
    return EDSR(3, 3, num_feat=8, num_block=2, upscale=2)


def test_records_same_tensor_as_module_output():
    net = _edsr()
    rec = FeatureRecorder(net, ['body.1'])
    seen = {}
    net.body[1].register_forward_hook(lambda m, a, o: seen.setdefault('out', o))
    x = torch.rand(1, 3, 8, 8)
    with rec:
        net(x)
    (feat,) = rec.features()
    assert feat is seen['out']
    assert feat.requires_grad  # the student's graph is kept


def test_records_nothing_outside_context_and_clears_on_enter():
    net = _edsr()
    rec = FeatureRecorder(net, ['body.0'])
    net(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match='did not run'):
        rec.features()
    with rec:
        net(torch.rand(1, 3, 8, 8))
    first = rec.features()[0]
    with rec:  # entering clears the previous iteration
        with pytest.raises(RuntimeError):
            rec.features()
        net(torch.rand(1, 3, 8, 8))
    assert rec.features()[0] is not first


def test_unknown_name_lists_nearest_names():
    with pytest.raises(KeyError) as e:
        FeatureRecorder(_edsr(), ['body.9'], key='kd.student_layers')
    msg = str(e.value)
    assert 'kd.student_layers' in msg and "'body.9'" in msg and 'body.0' in msg


def test_hooks_removed():
    net = _edsr()
    rec = FeatureRecorder(net, ['body.0', 'conv_after_body'])
    assert rec.num_handles == 2
    assert len(net.body[0]._forward_hooks) == 1
    rec.remove()
    assert len(net.body[0]._forward_hooks) == 0 and len(net.conv_after_body._forward_hooks) == 0
    with rec:
        net(torch.rand(1, 3, 8, 8))
    with pytest.raises(RuntimeError):
        rec.features()


def test_wrapped_network_is_unwrapped():
    net = _edsr()
    wrapped = cpu_data_parallel(net)
    assert unwrap(wrapped) is net
    rec = FeatureRecorder(wrapped, ['body.0'])
    with rec:
        net(torch.rand(1, 3, 8, 8))
    assert rec.features()[0].shape == (1, 8, 8, 8)


@pytest.mark.parametrize('build,name,channels', [
    (lambda: EDSR(3, 3, num_feat=8, num_block=2, upscale=2), 'conv_after_body', 8),
    (lambda: RCAN(3, 3, num_feat=8, num_group=2, num_block=1, squeeze_factor=4, upscale=2), 'body.1', 8),
    (lambda: RRDBNet(3, 3, scale=2, num_feat=8, num_block=1, num_grow_ch=4), 'body.0', 8),
    (lambda: MSRResNet(3, 3, num_feat=8, num_block=2, upscale=2), 'body.1', 8),
    (lambda: SwinIR(img_size=16, patch_size=1, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                    mlp_ratio=2, upscale=2, img_range=1., upsampler='pixelshuffle', resi_connection='1conv'),
     'layers.0', 12),
])
def test_every_basicsr_sr_arch(build, name, channels):
    net = build()
    rec = FeatureRecorder(net, [name])
    x = torch.rand(2, 3, 16, 16)
    with rec:
        net(x)
    feat = rec.features()[0]
    assert feat.dim() == 4 and feat.shape[0] == 2 and feat.shape[1] == channels
    assert feat.shape[-2:] == (16, 16) or name == 'body.0'


def test_tokens_without_size_are_rejected_clearly():
    net = SwinIR(img_size=16, patch_size=1, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4,
                 mlp_ratio=2, upscale=2, img_range=1., upsampler='pixelshuffle', resi_connection='1conv')
    rec = FeatureRecorder(net, ['layers.0.residual_group.blocks.0.mlp'])
    with pytest.raises(ValueError, match='tokens'):
        with rec:
            net(torch.rand(1, 3, 16, 16))


def test_resolve_module_rejects_root():
    with pytest.raises(KeyError):
        resolve_module(_edsr(), '')
