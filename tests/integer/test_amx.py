"""int8 GEMMs on Intel AMX tiles (``csrc/amx_gemm.cpp``, ``linear.int_mm`` and the compiled
attention cores' QKᵀ and P·V): the tile layout of the packed weights against the layout written
out here, and, on CPUs with AMX-INT8, the products against ``torch._int_mm`` bit for bit (tails in
every dimension, int8 and uint8 activations), the attention cores of every kind on tiles and off
(token counts that fill no tile, head dims 64 and 32), and whole integer ViTs with AMX on and off.
Without AMX the route must report itself off and every product must go through
``torch._int_mm``."""
import pytest
import timm
import torch

from fqvit_det.calibration import CalibrationRunner
from fqvit_det.convert import quantize_model
from fqvit_det.integer import kernels, replay, to_integer
from fqvit_det.integer.attention import IntegerAttention
from fqvit_det.integer.linear import int_mm
from fqvit_det.presets import make_spec

from ..helpers import images
from .test_int_attention import METHODS, calibrated
from .test_kernels import backend  # noqa: F401  (fixture)


def _ops():
    ops = kernels.native()
    assert ops is not None, kernels.info()
    return ops


@pytest.fixture
def amx_setting():
    """Restores the AMX setting a test switches."""
    before = kernels.amx_ops() is not None
    yield kernels.set_amx
    kernels.set_amx(before)


def _reference_tiles(b: torch.Tensor) -> torch.Tensor:
    """The packed layout from its definition: tiles [t][kb][r][n·4 + i] = B[64kb + 4r + i][16t + n],
    t over 2·⌈N/32⌉ column tiles, kb over ⌈K/64⌉ slices of K, zero outside B."""
    K, N = b.shape
    Kb, Nt = -(-K // 64), 2 * -(-N // 32)
    padded = torch.zeros(Kb * 64, Nt * 16, dtype=torch.int8)
    padded[:K, :N] = b
    t = padded.reshape(Kb, 16, 4, Nt, 16)          # (kb, r, i, t, n)
    return t.permute(3, 0, 1, 4, 2).reshape(-1)    # (t, kb, r, n, i)


@pytest.mark.parametrize('K,N', [(192, 576), (768, 192), (100, 30), (197, 65), (5, 1000), (64, 17)])
def test_packed_tiles_follow_the_layout(K, N):
    ops = _ops()
    g = torch.Generator().manual_seed(K * N)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    wide = torch.randint(-128, 128, (K, 2 * N), dtype=torch.int8, generator=g)
    # K-contiguous (weights), N-contiguous (P·V values) and neither
    for b in (w.t(), w.t().contiguous(), wide[:, ::2]):
        assert torch.equal(ops.amx_pack(b), _reference_tiles(b))


def test_without_amx_the_products_go_through_int_mm(amx_setting):
    if kernels.amx_available():
        pytest.skip('this CPU has AMX: the AMX tests below cover the route')
    assert amx_setting(True) is False and kernels.info()['amx'] is False
    assert kernels.amx_ops() is None
    a = torch.randint(-128, 128, (7, 192), dtype=torch.int8)
    b = torch.randint(-128, 128, (192, 40), dtype=torch.int8)
    assert torch.equal(int_mm(a, b), torch._int_mm(a, b))
    assert not hasattr(b, '_fqvit_amx')


def _needs_amx():
    if not kernels.amx_available():
        pytest.skip('CPU without AMX-INT8 (or the OS refused the tile state): the route does not '
                    'exist here; test_without_amx_the_products_go_through_int_mm covers this CPU')


@pytest.mark.parametrize('M,K,N', [(197, 192, 576), (1, 192, 1000), (33, 768, 192), (394, 768, 192),
                                   (40, 100, 30), (16, 64, 16), (197, 197, 65), (600, 192, 64)])
def test_amx_products_equal_int_mm(amx_setting, M, K, N):
    _needs_amx()
    amx_setting(True)
    ops = _ops()
    g = torch.Generator().manual_seed(M + K + N)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    b = w.t()
    packed = ops.amx_pack(b)
    for a in (torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g),
              torch.randint(0, 256, (M, K), dtype=torch.uint8, generator=g),
              torch.randint(-128, 128, (M, K + 9), dtype=torch.int8, generator=g)[:, 3:K + 3]):
        ref = torch._int_mm(a, b)
        assert torch.equal(ops.amx_mm(a, packed, N), ref)
        assert torch.equal(int_mm(a, b), ref)      # the Linear layers' route, packing cached
    # extreme codes: the largest |partial sums| (-128·-128·K) stay exact
    a = torch.full((M, K), -128, dtype=torch.int8)
    b = torch.full((K, N), -128, dtype=torch.int8)
    assert torch.equal(ops.amx_mm(a, ops.amx_pack(b), N), torch._int_mm(a, b))


def test_packed_weights_follow_in_place_edits(amx_setting):
    _needs_amx()
    amx_setting(True)
    w = torch.randint(-128, 128, (64, 192), dtype=torch.int8)
    b = w.t()
    a = torch.randint(-128, 128, (20, 192), dtype=torch.int8)
    assert torch.equal(int_mm(a, b), torch._int_mm(a, b))
    w[3].fill_(7)                                  # bumps the version the cache is keyed on
    assert torch.equal(int_mm(a, b), torch._int_mm(a, b))


def test_bad_arguments_are_named(amx_setting):
    ops = _ops()
    with pytest.raises(RuntimeError, match='amx_pack: b must be a 2-D int8'):
        ops.amx_pack(torch.zeros(4, 4))
    with pytest.raises(RuntimeError, match='amx_mm: a must be a 2-D int8 or uint8'):
        ops.amx_mm(torch.zeros(4, 4), torch.zeros(2048, dtype=torch.int8), 4)
    with pytest.raises(RuntimeError, match="amx_mm: packed must be amx_pack's output"):
        ops.amx_mm(torch.zeros(4, 64, dtype=torch.int8), torch.zeros(10, dtype=torch.int8), 4)


def test_the_setting_is_validated(monkeypatch):
    monkeypatch.setenv('FQVIT_INT_AMX', 'yes')
    with pytest.raises(ValueError, match='FQVIT_INT_AMX'):
        kernels._amx_env()
    monkeypatch.setenv('FQVIT_INT_AMX', '0')
    assert kernels._amx_env() is False


@pytest.mark.parametrize('method', ['fqvit_lis', 'ptq4vit', 'repq_w4a4', 'adalog_6'])
def test_integer_vit_with_amx_on_and_off(backend, amx_setting, method):  # noqa: F811
    _needs_amx()
    backend('cpp')
    model, x = calibrated(method, 'cpu')
    integer = to_integer(model)
    with torch.inference_mode():
        amx_setting(False)
        ref = integer(x)
        amx_setting(True)
        assert torch.equal(integer(x), ref)
        rep = replay(integer)
        for _ in range(3):
            out = rep(x)
        assert torch.equal(out, ref) and rep.stats['replays'] == 1
        amx_setting(False)                         # a recorded program keeps its route
        assert torch.equal(rep(x), ref) and rep.stats['replays'] == 2


_HEAD_DIM_32 = {}


def _calibrated_head_dim_32(method):
    """A calibrated one-block ViT with 32-wide heads (96 channels, 3 heads; cached)."""
    if method not in _HEAD_DIM_32:
        torch.manual_seed(0)
        model = timm.create_model('vit_tiny_patch16_224', pretrained=False, depth=1, img_size=64,
                                  embed_dim=96, num_heads=3, num_classes=10).eval()
        with torch.no_grad():
            model.cls_token.normal_(std=0.5)
            model.pos_embed.normal_(std=0.5)
        name, w, a, kw = METHODS[method]
        spec = make_spec(name, w, a, **kw)
        quantize_model(model, spec)
        x = images(model, 4)
        CalibrationRunner(model, spec, progress=False).run([x])
        _HEAD_DIM_32[method] = model
    return _HEAD_DIM_32[method]


@pytest.mark.parametrize('head_dim', [64, 32])
@pytest.mark.parametrize('method', ['fqvit_lis', 'repq_w4a4', 'ptq4vit', 'adalog_6'])
def test_attention_cores_on_tiles_equal_int_mm(backend, amx_setting, method, head_dim):  # noqa: F811
    """The compiled cores' QKᵀ and P·V on tiles and through torch._int_mm give the same codes,
    for token counts that fill no 32-row block (17, 50, 197: tails in rows, keys and the P·V K
    slices) and one image (the row-block tasks) or several; q, k, v as separate tensors, so the
    last matrix's q rows end at their storage's end (the tiles' copy of them)."""
    _needs_amx()
    backend('cpp')
    model = calibrated(method, 'cpu')[0] if head_dim == 64 else _calibrated_head_dim_32(method)
    attn = next(m for m in to_integer(model).modules() if isinstance(m, IntegerAttention))
    assert attn.head_dim == head_dim
    g = torch.Generator().manual_seed(head_dim)
    with torch.inference_mode():
        for B, N in ((1, 17), (3, 50), (1, 197), (2, 197)):
            codes = []
            for r in ('q', 'k', 'v'):
                lo, hi = attn.cfg[f'{r}_range']
                codes.append(torch.randint(lo, hi + 1, (B, attn.num_heads, N, head_dim),
                                           generator=g).float())
            amx_setting(False)
            ref = attn._compiled_codes(*codes)
            assert ref is not None, 'the compiled core does not apply'
            amx_setting(True)
            assert torch.equal(attn._compiled_codes(*codes), ref), (B, N)


def _rescale_params(N, g):
    return (torch.randint(-5000, 5000, (N,), dtype=torch.int32, generator=g),
            (torch.rand(N, generator=g) + 0.5) * 1e-4, torch.randn(N, generator=g) * 0.1)


@pytest.mark.parametrize('M,K,N', [(197, 192, 576), (5, 64, 10), (70, 100, 1000), (130, 768, 33)])
def test_epilogues_on_tiles_equal_the_stored_products(amx_setting, M, K, N):
    """Every ``tiles_*`` epilogue (the int32 product computed block by block inside it) gives
    the bits of the same epilogue on the stored ``torch._int_mm`` product: row, column and K
    tails, uint8 and int8 activations, strided rows."""
    _needs_amx()
    ops = _ops()
    g = torch.Generator().manual_seed(M + K + N)
    w = torch.randint(-128, 128, (K, N), dtype=torch.int8, generator=g)
    packed = ops.amx_pack(w)
    params = _rescale_params(N, g)
    for dtype in (torch.uint8, torch.int8):
        lo, hi = (0, 256) if dtype == torch.uint8 else (-128, 128)
        wide = torch.randint(lo, hi, (M, K + 3), dtype=dtype, generator=g)
        for a in (wide[:, :K].contiguous(), wide[:, 3:]):       # contiguous and strided rows
            acc = torch._int_mm(a.contiguous(), w)
            for mode in (0, 1, 2):
                ref = ops.rescale(acc, *params, mode, 0.05, 3, -7, 9)
                assert torch.equal(ops.tiles_rescale(a, packed, N, *params, mode, 0.05, 3, -7, 9),
                                   ref), (dtype, mode)
            for codes in (torch.uint8, torch.int8):
                args = (0.02, 7, 0, 15, codes) if codes == torch.uint8 else (0.02, 0, -8, 7, codes)
                assert torch.equal(ops.tiles_rescale_gelu_quantize(a, packed, N, *params, *args),
                                   ops.rescale_gelu_quantize(acc, *params, *args))
            assert torch.equal(ops.tiles_rescale_gelu_twin(a, packed, N, *params, 0.01, 0.08, 8),
                               ops.rescale_gelu_twin(acc, *params, 0.01, 0.08, 8))
    a2 = torch.randint(-128, 128, (2 * M, K), dtype=torch.int8, generator=g)
    for m in (3, -2):
        ref = torch.empty(M, N)
        ops.twin_rescale(torch._int_mm(a2, w), m, *params, ref)
        out = torch.full((M, N), float('nan'))
        ops.tiles_twin_rescale(a2, packed, N, m, *params, out)
        assert torch.equal(out, ref), m


def test_qkv_coding_on_tiles_equals_the_stored_product(amx_setting):
    _needs_amx()
    ops = _ops()
    g = torch.Generator().manual_seed(3)
    B, T, K, H, d = 2, 50, 64, 3, 32
    C3 = 3 * H * d
    w = torch.randint(-128, 128, (K, C3), dtype=torch.int8, generator=g)
    a = torch.randint(0, 256, (B * T, K), dtype=torch.uint8, generator=g)
    scale = (torch.rand(C3, generator=g) + 0.5) * 0.05
    zero = torch.zeros(C3)
    lo, hi, off = torch.full((C3,), -8.), torch.full((C3,), 7.), torch.zeros(C3)
    params = _rescale_params(C3, g)
    acc = torch._int_mm(a, w).view(B, T, C3)
    ref = ops.qkv_int8(acc, scale, zero, lo, hi, off, H, *params)
    out = ops.tiles_qkv_int8(a, ops.amx_pack(w), C3, B, scale, zero, lo, hi, off, H, *params)
    assert torch.equal(out, ref)
    with pytest.raises(RuntimeError, match='tiles_qkv_int8: 100 rows are not 3 images'):
        ops.tiles_qkv_int8(a, ops.amx_pack(w), C3, 3, scale, zero, lo, hi, off, H, *params)
    with pytest.raises(RuntimeError, match="tiles_rescale: packed must be amx_pack's output"):
        ops.tiles_rescale(a, ops.amx_pack(w[:, :10]), C3, *params, 0, 1.0, 0, 0, 0)
