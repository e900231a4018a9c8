"""The calibration runner: no silent RepQ skip, batches follow the model's device, batch sharding."""
import pytest
import torch

from fqvit_det.calibration import CalibrationRunner, batch_images, named_quantizers
from fqvit_det.convert import quantize_model
from fqvit_det.presets import make_spec
from fqvit_det.quantizers import UniformQuantizer

from .helpers import images, tiny_vit


def test_reparam_refuses_a_per_tensor_norm_output_before_changing_anything(device):
    model = tiny_vit().to(device)
    spec = make_spec('repq', 4, 4)
    quantize_model(model, spec)
    norm_path = model.fqvit_reparam_pairs[-1][0]
    norm = model.get_submodule(norm_path)
    norm.out_quantizer = UniformQuantizer(bits=4).to(device)  # per tensor: nothing to fold
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith('_quantizer')}
    runner = CalibrationRunner(model, spec, progress=False)
    x = images(model, 4, seed=2)
    with pytest.raises(ValueError) as err:
        runner.run([x[:2], x[2:]])
    msg = str(err.value)
    assert norm_path in msg and 'per-tensor' in msg
    assert 'roles' in msg and 'ln_output' in msg and 'reparam=False' in msg  # the fix
    state = model.state_dict()
    for name, _ in model.fqvit_reparam_pairs:  # no pair was rewritten
        for k in ('weight', 'bias'):
            key = f'{name}.{k}'
            assert torch.equal(state[key], weights[key])


def test_batches_follow_the_model_device(device):
    model = tiny_vit().to(device)
    spec = make_spec('fqvit', 8, 8, attn_bits=4)
    quantize_model(model, spec)
    seen = []

    def forward(m, batch):
        seen.append(batch['img'].device)
        return m(batch['img'])

    x = images(model, 4, seed=2)  # on the CPU
    result = CalibrationRunner(model, spec, forward_fn=forward, progress=False).run(
        [{'img': x[:2]}, {'img': x[2:]}])
    assert all(d.type == torch.device(device).type for d in seen)
    assert result['rank_batches'] == 2 and result['rank_images'] == 4 and result['world_size'] == 1
    assert all(q.mode == 'quant' for _, q in named_quantizers(model))


def test_no_batches_is_an_error():
    model = tiny_vit()
    spec = make_spec('fqvit', 8, 8)
    quantize_model(model, spec)
    with pytest.raises(ValueError, match='no batches'):
        CalibrationRunner(model, spec, progress=False).run([])


def test_batch_images():
    x = torch.zeros(3, 2)
    assert batch_images(x) == 3
    assert batch_images({'inputs': x}) == 3
    assert batch_images({'inputs': [x, x]}) == 2
    assert batch_images(object()) is None


def test_calibration_batch_sampler_shards_global_batches():
    from fqvit_det.mm.hooks import CalibrationBatchSampler, global_batches

    class Sampler:
        dataset = list(range(12))

    assert global_batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    r0 = CalibrationBatchSampler(Sampler(), 4, 10, rank=0, world_size=2)
    r1 = CalibrationBatchSampler(Sampler(), 4, 10, rank=1, world_size=2)
    assert list(r0) == [[0, 1, 2, 3], [8, 9]] and r0.rank_images == 6 and len(r0) == 2
    assert list(r1) == [[4, 5, 6, 7]] and r1.rank_images == 4
    whole = CalibrationBatchSampler(Sampler(), 4, 100)  # clipped to the dataset
    assert whole.num_images == 12 and list(whole)[-1] == [8, 9, 10, 11]
