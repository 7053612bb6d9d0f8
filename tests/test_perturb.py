import pytest
import torch

from causalscan.bindings import ops
from causalscan.errors import InputError
from causalscan.model import interventions as iv

from naive import run
from tolerance import assert_close


def _x():
    return torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) - 10.0


def _mask():  # row 0: position 1, component 0; row 1: positions 0 and 2, component 1
    m = torch.zeros(2, 3, 2, dtype=torch.bool)
    m[0, 1, 0] = True
    m[1, [0, 2], 1] = True
    return m


def _expect(x, fn):
    """Apply ``fn(row, value [D]) -> [D]`` at the masked places, loop by loop."""
    out = x.clone()
    for b, t, c in _mask().nonzero().tolist():
        out[b, t, c] = fn(b, x[b, t, c])
    return out


def test_patch_zero_add_scale():
    x, m = _x(), _mask()
    src = -_x()
    torch.testing.assert_close(ops.perturb(x, "patch", m, source=src), _expect(x, lambda b, v: -v))
    torch.testing.assert_close(ops.perturb(x, "zero", m), _expect(x, lambda b, v: v * 0))
    vec = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])  # [B, C, D]
    alpha = torch.tensor([2.0, -1.0])
    want = x.clone()
    want[0, 1, 0] += 2.0 * torch.tensor([1.0, 2.0])
    want[1, [0, 2], 1] += -1.0 * torch.tensor([7.0, 8.0])
    torch.testing.assert_close(ops.perturb(x, "add", m, vector=vec, alpha=alpha), want)
    torch.testing.assert_close(ops.perturb(x, "scale", m, alpha=alpha), _expect(x, lambda b, v: v * alpha[b]))


def test_directional_ops():
    x, m = _x(), _mask()
    u = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]]) / torch.tensor([5.0, 1.0])[:, None]  # unit, [1, C, D]
    alpha = torch.tensor([0.5, 3.0])

    def comp(b, v, c):
        return (v * u[0, c]).sum()

    # component index of each masked place is 0 for row 0 and 1 for row 1 (see _mask)
    torch.testing.assert_close(
        ops.perturb(x, "project_out", m, direction=u), _expect(x, lambda b, v: v - comp(b, v, b) * u[0, b])
    )
    torch.testing.assert_close(
        ops.perturb(x, "scale", m, alpha=alpha, direction=u),
        _expect(x, lambda b, v: v + (alpha[b] - 1) * comp(b, v, b) * u[0, b]),
    )
    torch.testing.assert_close(
        ops.perturb(x, "clamp", m, alpha=alpha, direction=u),
        _expect(x, lambda b, v: v + (alpha[b] - comp(b, v, b)) * u[0, b]),
    )
    torch.testing.assert_close(ops.perturb(x, "clamp", m, alpha=alpha), _expect(x, lambda b, v: v * 0 + alpha[b]))


def test_gradients_flow_through_add_scale_project_out():
    x, m = _x(), _mask()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    vec = torch.randn(1, 2, 2, requires_grad=True)
    (ops.perturb(x, "add", m, vector=vec, alpha=torch.tensor([3.0])) * w).sum().backward()
    want = torch.zeros(2, 2)
    for b, t, c in m.nonzero().tolist():
        want[c] += 3.0 * w[b, t, c]
    torch.testing.assert_close(vec.grad[0], want)
    alpha = torch.tensor([2.0, 0.5], requires_grad=True)
    (ops.perturb(x, "scale", m, alpha=alpha) * w).sum().backward()
    want = torch.zeros(2)
    for b, t, c in m.nonzero().tolist():
        want[b] += (x[b, t, c] * w[b, t, c]).sum()
    torch.testing.assert_close(alpha.grad, want)
    u = torch.tensor([[[0.6, 0.8], [1.0, 0.0]]], requires_grad=True)
    (ops.perturb(x, "project_out", m, direction=u) * w).sum().backward()
    want = torch.zeros(2, 2)  # d/du of -(x.u)(u.w) = -(x (u.w) + w (x.u))
    for b, t, c in m.nonzero().tolist():
        xv, wv, uv = x[b, t, c], w[b, t, c], u.detach()[0, c]
        want[c] -= xv * (uv @ wv) + wv * (xv @ uv)
    torch.testing.assert_close(u.grad[0], want)


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown perturb op"):
        ops.perturb(_x(), "rotate", _mask())
    with pytest.raises(InputError, match="unknown op"):
        iv.Intervention("rotate", "head")
    with pytest.raises(InputError, match="needs vector"):
        iv.Intervention("add", "resid_pre")


@torch.no_grad()
def test_perturb_context_matches_plain_hook(tiny):
    model = tiny("llama")
    ids = torch.randint(4, 300, (2, 7), generator=torch.Generator().manual_seed(0))

    def zero_head(view, pre):
        view[:, 3:, 2] = 0

    want = run(model, ids, "head", 1, zero_head)
    with iv.perturb(model, iv.zero("head", layers=1, index=2, positions=[3, 4, 5, 6])):
        got = model.hf(input_ids=ids).logits
    assert_close(got, want)
    assert not torch.allclose(got, model.hf(input_ids=ids).logits)  # hooks are gone afterwards


@torch.no_grad()
def test_per_row_steering_in_one_forward(tiny):
    """Row b gets vector b: one forward equals two forwards with one vector each."""
    model = tiny("gpt2")
    ids = torch.randint(4, 300, (1, 6), generator=torch.Generator().manual_seed(0)).repeat(2, 1)
    vecs = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    both = iv.perturb(model, iv.add("resid_post", vecs, alpha=torch.tensor([1.0, 2.0]), layers=0), input_ids=ids)
    for b, a in ((0, 1.0), (1, 2.0)):
        one = iv.perturb(model, iv.add("resid_post", vecs[b], alpha=a, layers=0), input_ids=ids[:1])
        assert_close(both[b : b + 1], one)  # a batch of 2 and of 1 may take other BLAS paths


@torch.no_grad()
def test_mean_ablation_and_neuron_clamp(tiny):
    model = tiny("gpt_neox")
    ids = torch.randint(4, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    mu = torch.randn(model.adapter.d_model)

    def to_mu(view, pre):
        view[:] = mu

    want = run(model, ids, "attn_out", 0, to_mu)
    assert_close(iv.perturb(model, iv.mean("attn_out", mu, layers=0), input_ids=ids), want)

    def clamp5(view, pre):
        view[:, :, 7] = 5.0

    want = run(model, ids, "neuron", 1, clamp5)
    assert_close(iv.perturb(model, iv.clamp("neuron", 5.0, layers=1, index=7), input_ids=ids), want)


def test_bad_intervention_inputs(tiny):
    model = tiny("llama")
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(InputError, match="out of range"):
        iv.perturb(model, iv.zero("head", layers=1, index=9), input_ids=ids)
    with pytest.raises(InputError, match="layer 5 out of range"):
        iv.perturb(model, iv.zero("head", layers=5), input_ids=ids)
    with pytest.raises(InputError, match="does not fit"):
        iv.perturb(model, iv.add("resid_pre", torch.ones(7), layers=0), input_ids=ids)
