"""A KRNet with a FitNet branch contains the best hand-crafted representation and starts there:
MetaKD frozen at initialisation is FitNet + output KD (same losses, gradients and updates)."""
import copy

import pytest
import torch

from krdistill.build import build_distiller, build_metakd, build_optimizer
from test_api import Tiny, _batch

KR = dict(type='KRNet', width=4, num_kernels=4, hidden=8, fitnet_branch=True)


def _pair(seed=0, meta=None):
    torch.manual_seed(seed)
    teacher, student = Tiny(8, 2), Tiny(4, 1)
    student2 = copy.deepcopy(student)
    mkd = build_metakd(teacher, student, ['body.1'], ['body.0'], network_kr=KR,
                       texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0),
                       output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                       meta=dict(update='frozen') if meta is None else meta)
    ref = build_distiller(teacher, student2, ['body.1'], ['body.0'], kd_opt=dict(type='FitNetLoss', loss_weight=1.0),
                          output_kd_opt=dict(type='OutputKDLoss', loss_weight=1.0),
                          pixel_opt=dict(type='L1Loss', loss_weight=1.0))
    reg = mkd.krnets[0].regressor
    ref.pair_losses[0].regressor.load_state_dict(reg.state_dict())
    return mkd, ref, student, student2


def test_frozen_at_init_equals_fitnet_plus_output_kd():
    mkd, ref, s1, s2 = _pair()
    lq, gt = _batch(0)
    total, terms, _ = mkd.loss(lq, gt)
    total_ref, terms_ref, _ = ref.loss(lq, gt)
    assert torch.allclose(total, total_ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(terms['l_texture'], terms_ref['l_kd_fitnet'], rtol=1e-6, atol=1e-7)
    assert torch.equal(terms['l_pix'], terms_ref['l_pix']) and torch.equal(terms['l_kd_out'], terms_ref['l_kd_out'])
    mkd.backward(total)
    ref.backward(total_ref)
    for a, b in zip(s1.parameters(), s2.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)
    assert torch.allclose(mkd.krnets[0].regressor.weight.grad, ref.pair_losses[0].regressor.weight.grad,
                          rtol=1e-5, atol=1e-8)
    # the texture half gets no gradient at init (its weight is 0): it has to be earned by the meta step
    assert mkd.krnets[0].adapter_s.weight.grad is None


def test_frozen_at_init_trains_like_fitnet_plus_output_kd():
    mkd, ref, s1, s2 = _pair()
    opt = torch.optim.Adam(s1.parameters(), 1e-3)
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-3), mkd.kr_parameters())
    opt_ref = torch.optim.Adam(list(s2.parameters()) + ref.kd_parameters(), 1e-3)
    for i in range(3):
        lq, gt = _batch(i)
        a = mkd.train_step(lq, gt, opt, opt_kr)
        b = ref.train_step(lq, gt, opt_ref)
        assert a.skipped is None and b.skipped is None
        assert torch.allclose(a.logs['l_total'], b.logs['l_total'], rtol=1e-5, atol=1e-7), i
    for x, y in zip(s1.parameters(), s2.parameters()):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7)
    kr = mkd.krnets[0]
    assert float(kr.texture_weight) == 0.0 and float(kr.fitnet_weight) == 1.0  # frozen: branch weights kept


@pytest.mark.parametrize('mode', ['exact', 'finite_difference'])
def test_meta_step_can_turn_the_texture_branch_on_or_off(mode):
    mkd, _, s1, _ = _pair(meta=dict(update='meta', mode=mode))
    opt = torch.optim.Adam(s1.parameters(), 1e-2)
    opt_kr = build_optimizer(dict(type='Adam', lr=1e-2), mkd.kr_parameters())
    kr = mkd.krnets[0]
    for i in range(3):
        mkd.train_step(*_batch(i), opt, opt_kr)
    assert kr.texture_weight.grad is None  # cleared after the step
    assert float(kr.fitnet_weight) != 1.0  # the branch weights are meta-learned
    assert kr.regressor.weight.requires_grad and kr.regressor in [m for m in kr.modules()]
