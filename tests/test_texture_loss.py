"""texture_wise_loss / TextureWiseLoss: kornia's loss checklist."""
import pytest
import torch

from krdistill.archs.krnet_arch import KRNet
from krdistill.losses.texture_loss import TextureWiseLoss, texture_wise_loss

B, N, C, H, W = 2, 3, 4, 5, 6


def inputs(dtype=torch.float32, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, N, C, H, W, generator=g, dtype=dtype, requires_grad=requires_grad)
    t = torch.randn(B, N, C, H, W, generator=g, dtype=dtype)
    a = torch.softmax(torch.randn(B, N, generator=g, dtype=dtype), dim=1).requires_grad_(requires_grad)
    return s, t, a


def reference(s, t, a, criterion='l1', eps=1e-3):
    d = s - t
    rho = d.abs() if criterion == 'l1' else (d**2 + eps**2).sqrt()
    return torch.stack([sum(a[b, n] * rho[b, n].mean() for n in range(N)) for b in range(B)])


def test_smoke():
    s, t, a = inputs()
    loss = texture_wise_loss(s, t, a)
    assert loss.shape == () and loss > 0
    torch.testing.assert_close(loss, reference(s, t, a).mean())


@pytest.mark.parametrize('criterion', ['l1', 'charbonnier'])
@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_reductions(criterion, reduction):
    s, t, a = inputs()
    ref = reference(s, t, a, criterion)
    ref = {'mean': ref.mean(), 'sum': ref.sum(), 'none': ref}[reduction]
    out = texture_wise_loss(s, t, a, criterion=criterion, reduction=reduction)
    assert out.shape == ((B,) if reduction == 'none' else ())
    torch.testing.assert_close(out, ref)


def test_identical_inputs_give_zero():
    s, _, a = inputs()
    assert texture_wise_loss(s, s.clone(), a) == 0
    assert texture_wise_loss(s, s, a, reduction='none').eq(0).all()


def test_charbonnier():
    s, _, a = inputs()
    # identical inputs: rho(0) = eps, weights sum to 1 -> eps
    torch.testing.assert_close(texture_wise_loss(s, s, a, criterion='charbonnier', eps=1e-2),
                               torch.tensor(1e-2))
    # large differences: charbonnier ~ l1
    s2 = s + 1e3
    torch.testing.assert_close(texture_wise_loss(s2, s, a, criterion='charbonnier'),
                               texture_wise_loss(s2, s, a), rtol=1e-6, atol=0)


def test_weights_shared_vector():
    s, t, a = inputs()
    shared = a[0]
    torch.testing.assert_close(texture_wise_loss(s, t, shared), texture_wise_loss(s, t, shared.expand(B, N)))


def test_weights_select_textures():
    s, t, _ = inputs()
    one_hot = torch.zeros(B, N)
    one_hot[:, 1] = 1
    torch.testing.assert_close(texture_wise_loss(s, t, one_hot), (s[:, 1] - t[:, 1]).abs().mean())


@pytest.mark.parametrize('criterion', ['l1', 'charbonnier'])
def test_gradcheck(criterion):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 2, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y, w: texture_wise_loss(x, y, w, criterion=criterion), (s, t, a))
    assert torch.autograd.gradcheck(
        lambda x, y, w: texture_wise_loss(x, y, w, criterion=criterion, reduction='none'), (s, t, a))


def test_gradients_reach_inputs():
    s, t, a = inputs(requires_grad=True)
    texture_wise_loss(s, t, a).backward()
    assert s.grad.abs().sum() > 0 and a.grad.abs().sum() > 0


@pytest.mark.parametrize('reduction', ['mean', 'sum', 'none'])
def test_module_equals_function(reduction):
    s, t, a = inputs()
    mod = TextureWiseLoss(loss_weight=0.5, criterion='charbonnier', eps=1e-2, reduction=reduction)
    torch.testing.assert_close(mod(s, t, a),
                               0.5 * texture_wise_loss(s, t, a, criterion='charbonnier', eps=1e-2, reduction=reduction))
    assert "criterion='charbonnier'" in repr(mod)


def test_module_accepts_krnet_output():
    torch.manual_seed(0)
    kr = KRNet(s_channels=3, t_channels=5, num_kernels=2, hidden=4, fitnet_branch=False)
    out = kr(torch.randn(B, 3, H, W), torch.randn(B, 5, H, W))
    out2 = kr(torch.randn(B, 3, H, W), torch.randn(B, 5, H, W))
    mod = TextureWiseLoss(loss_weight=2.0)
    ref = 2.0 * texture_wise_loss(out['tex_s'], out['tex_t'], out['weights'])
    torch.testing.assert_close(mod(out), ref)
    ref2 = ref + 2.0 * texture_wise_loss(out2['tex_s'], out2['tex_t'], out2['weights'])
    total = mod([out, out2])
    torch.testing.assert_close(total, ref2)
    total.backward()  # the sum over points keeps the graph
    assert kr.adapter_s.weight.grad is not None


def test_shape_errors():
    s, t, a = inputs()
    with pytest.raises(ValueError, match='shapes differ'):
        texture_wise_loss(s, t[:, :, :2], a)
    with pytest.raises(ValueError, match='at least 3-D'):
        texture_wise_loss(s[0, 0, 0], t[0, 0, 0], a)
    with pytest.raises(ValueError, match=r'weights must be B x N = 2 x 3'):
        texture_wise_loss(s, t, a[:, :2])
    with pytest.raises(ValueError, match='weights must be'):
        texture_wise_loss(s, t, torch.ones(3, N))
    with pytest.raises(TypeError, match='must be a Tensor'):
        texture_wise_loss(s, t.numpy(), a)


def test_option_errors():
    s, t, a = inputs()
    with pytest.raises(ValueError, match='criterion'):
        texture_wise_loss(s, t, a, criterion='l2')
    with pytest.raises(ValueError, match='reduction'):
        texture_wise_loss(s, t, a, reduction='avg')
    with pytest.raises(ValueError, match='eps'):
        texture_wise_loss(s, t, a, criterion='charbonnier', eps=0)
    with pytest.raises(ValueError, match='criterion'):  # at build time
        TextureWiseLoss(criterion='mse')


def test_module_call_errors():
    s, t, a = inputs()
    mod = TextureWiseLoss()
    with pytest.raises(TypeError):
        mod(s, t)
    with pytest.raises(KeyError, match='weights'):
        mod({'tex_s': s, 'tex_t': t})
    with pytest.raises(ValueError, match='empty'):
        mod([])
