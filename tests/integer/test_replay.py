"""``fqvit_det.integer.replay`` (``recording.py``): the recorded forward replayed from C++ gives the eager forward's
bits, keeps Python decisions on tensor values as guards, and declines what it cannot repeat."""
import pytest
import torch
import torch.nn as nn

from fqvit_det.integer import kernels, replay, to_integer

from .test_int_attention import calibrated
from .test_kernels import backend  # noqa: F401  (fixture)


def _calls(model, x, n):
    return [model(x) for _ in range(n)]


@pytest.mark.parametrize('method', ['fqvit_lis', 'repq_w4a4', 'adalog_6', 'ptq4vit'])
def test_replayed_integer_vit_equals_eager(backend, method):  # noqa: F811
    backend('cpp')
    model, x = calibrated(method, 'cpu')
    integer = to_integer(model)
    rep = replay(integer)
    with torch.inference_mode():
        for batch in (x[:1], x[:3]):                       # one program per input shape
            _calls(rep, batch, 2)                          # eager (fills caches), then recorded
            for xb in (batch, batch.flip(0) * 0.7, batch + 0.05 * torch.randn_like(batch)):
                assert torch.equal(rep(xb), integer(xb))
    assert rep.stats['recorded'] == 2 and rep.stats['declined'] == {}
    assert rep.stats['replays'] == 6 and rep.stats['fallbacks'] == 0
    with torch.no_grad():                                  # no_grad is a separate key: recorded too
        _calls(rep, x[:2], 3)
        assert torch.equal(rep(x[:2]), integer(x[:2]))
    assert rep.stats["replays"] == 8, rep.stats


class _Branchy(nn.Module):
    """Python decides on a tensor's value: replay must follow the recorded branch only where the
    value is the same."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4), requires_grad=False)

    def forward(self, x):
        y = x @ self.w
        if bool(y.sum() > 0):
            return y * 2
        return y - 1


def test_a_different_tensor_value_falls_back_to_eager(backend):  # noqa: F811
    backend('cpp')
    m = _Branchy()
    rep = replay(m)
    x = torch.randn(3, 4)
    if float((x @ m.w).sum()) <= 0:
        x = -x
    with torch.inference_mode():
        _calls(rep, x, 2)
        assert torch.equal(rep(x), x @ m.w * 2) and rep.stats['replays'] == 1
        assert torch.equal(rep(-x), -x @ m.w - 1)           # the other branch: eager
        assert rep.stats['fallbacks'] == 1 and rep.stats['replays'] == 1
        assert torch.equal(rep(x * 0.5), x * 0.5 @ m.w * 2) and rep.stats['replays'] == 2


class _FlaggedRows(nn.Module):
    """The integer LayerNorm kernel returns how many rows failed its exactness bounds (an int):
    the forward branches on it as ``CompiledIntLayerNorm`` does."""

    def __init__(self, C):
        super().__init__()
        f64 = dict(dtype=torch.float64)
        gamma = torch.ones(C, **f64)
        gamma[3] = 2.0 ** -20          # |a| = Δ_1/σ·|γ_3|: below the 8-bit multiplier's range when σ is large
        self.args = (torch.ones(C), torch.ones(C, **f64), 0.0, 255.0, gamma, gamma.abs(),
                     torch.zeros(C, **f64), torch.zeros(C, **f64), torch.empty(0, **f64), 1.0,
                     1.0, 1e-5, 8, True, -128.0, 127.0, 1.0)

    def forward(self, x):
        out, ok, nbad = kernels.native().int_layernorm(x, *self.args)
        return out - 1000.0 * (~ok)[:, None] if nbad else out


def test_an_integer_count_returned_by_a_kernel_is_a_guard(backend):  # noqa: F811
    backend('cpp')
    m = _FlaggedRows(16)
    rep = replay(m)
    narrow = 100.0 + torch.arange(16.0).remainder(2).repeat(5, 1)      # σ ≈ 0.5: every row fits
    wide = narrow.clone()
    wide[2] = torch.linspace(0, 255, 16)                               # σ ≈ 78: this row does not
    with torch.inference_mode():
        assert kernels.native().int_layernorm(wide, *m.args)[2] == 1
        _calls(rep, narrow, 2)
        assert torch.equal(rep(narrow), m(narrow)) and rep.stats['replays'] == 1
        assert torch.equal(rep(wide), m(wide))                          # another count: eager
        assert rep.stats['fallbacks'] == 1 and rep.stats['replays'] == 1


class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer('count', torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return x + self.count


class _Dict(nn.Module):
    def forward(self, x):
        return dict(y=x * 2, n=int(x.shape[0]))


class _Composite(nn.Module):
    """Constant-only work (folded once), tensor lists, views and in-place ops on fresh tensors."""

    def __init__(self):
        super().__init__()
        self.register_buffer('table', torch.arange(12.).reshape(4, 3))

    def forward(self, x):
        t = self.table.t().contiguous() * 0.5                 # constants only: computed once
        y = torch.cat([x, x * 2], 0) @ t
        y.add_(1).clamp_(max=20)
        a, b = y.unbind(0)[:2]
        return torch.stack([a, b]).reshape(-1), y[:, :2].sum(1)


def test_declines_writes_into_constants_random_ops_and_non_tensor_outputs(backend):  # noqa: F811
    backend('cpp')
    x = torch.randn(2, 3)
    with torch.inference_mode():
        c = _Counter()
        rep = replay(c)
        outs = _calls(rep, x, 4)
        assert float(c.count) == 4 and torch.equal(outs[-1], x + 4)   # every call ran eagerly
        assert 'writes into a constant' in next(iter(rep.stats['declined'].values()))
        d = nn.Dropout(0.5).train()
        rep = replay(d)
        _calls(rep, x, 3)
        assert 'random op' in next(iter(rep.stats['declined'].values()))
        rep = replay(_Dict())
        assert rep(x)['n'] == 2 and rep(x)['n'] == 2 and rep(x)['n'] == 2
        assert 'other than tensors' in next(iter(rep.stats['declined'].values()))
        assert rep.stats['replays'] == 0
    m = _Composite()
    rep = replay(m)
    with torch.inference_mode():
        _calls(rep, torch.randn(2, 3), 2)
        for _ in range(3):
            x = torch.randn(2, 3)
            got, want = rep(x), m(x)
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert rep.stats['replays'] == 3
    names = next(v for v in rep._programs.values() if isinstance(v, tuple)).names
    assert 'aten::t.default' not in names and 'aten::mul.Tensor' in names     # x * 2 only
    assert {'aten::cat.default', 'aten::clamp_.default', 'aten::unbind.int'} <= set(names)


def test_replay_runs_eager_with_gradients_or_without_the_compiled_kernels(backend):  # noqa: F811
    m = _Branchy()
    rep = replay(m)
    x = torch.randn(3, 4)
    _calls(rep, x, 3)                                      # gradients on: always eager
    assert rep.stats['eager'] == 3 and rep.stats['recorded'] == 0
    backend('torch')
    with torch.inference_mode():
        assert kernels.native() is None
        _calls(rep, x, 3)
    assert rep.stats['eager'] == 6 and rep.stats['replays'] == 0
    backend('cpp')
    with torch.inference_mode():
        _calls(rep, x, 3)
    assert rep.stats['recorded'] == 1 and rep.stats['replays'] == 1
    rep.reset()
    with torch.inference_mode():
        _calls(rep, x, 3)
    assert rep.stats['recorded'] == 2


def test_recording_does_not_keep_intermediates_alive():
    """The recorder refers to computed tensors weakly: recording a forward costs the memory of
    that forward, not of all its intermediates at once."""
    import gc

    from fqvit_det.integer.recording import _Recorder
    m = _Composite()
    x = torch.randn(2, 3)
    with torch.inference_mode():
        rec = _Recorder([x])
        with rec:
            out = m(x)
        computed = [s for s in range(len(rec.tensors)) if not rec.const[s]]
        assert len(computed) > 5 and rec.error is None
        del out
        gc.collect()
        assert [s for s in computed if rec.tensor(s) is not None] == [0]     # the input only


def test_a_reloaded_integer_model_replays_bit_identically(tmp_path, backend):  # noqa: F811
    """The README's deployment path: save_integer → load_integer (torch + safetensors only) →
    replay, equal to the integer model it was saved from."""
    from fqvit_det.integer import load_integer, save_integer

    from .test_model import ARCH, _calibrated
    backend('cpp')
    model, spec, x = _calibrated('fqvit_884', 'cpu')
    integer = to_integer(model)
    path = str(tmp_path / 'int.safetensors')
    save_integer(integer, path, ARCH, spec)
    fast = replay(load_integer(path))
    with torch.inference_mode():
        outs = _calls(fast, x[:2], 4)
        want = integer(x[:2])
    assert all(torch.equal(o, want) for o in outs)
    assert fast.stats['replays'] == 2 and fast.stats['fallbacks'] == 0
