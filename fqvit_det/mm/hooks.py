"""``CalibrationHook``: calibrates a quantized model before evaluation (or loads a saved state)."""
import copy
import os
import time
from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import DATA_SAMPLERS, HOOKS

from ..calibration import CalibrationRunner, set_quant_mode
from ..calibration.distributed import shard_indices
from ..state import load_quant_state, save_quant_state

STATE_NAME = 'quant_state.safetensors'


def take_images(loader, num_images: int):
    """Yield batches until ``num_images`` images were produced (the last batch is trimmed)."""
    seen = 0
    for batch in loader:
        size = len(batch['inputs'])
        if seen + size > num_images:
            keep = num_images - seen
            batch = {k: (v[:keep] if hasattr(v, '__getitem__') and not isinstance(v, dict) else
                         {kk: vv[:keep] for kk, vv in v.items()} if isinstance(v, dict) else v)
                     for k, v in batch.items()}
            size = keep
        if size <= 0:
            return
        seen += size
        yield batch
        if seen >= num_images:
            return


def global_batches(num_images: int, batch_size: int):
    """The single-process calibration batches: the first ``num_images`` dataset indices in order,
    in batches of ``batch_size`` (the last one shorter)."""
    return [list(range(i, min(i + batch_size, num_images))) for i in range(0, num_images, batch_size)]


@DATA_SAMPLERS.register_module()
class CalibrationBatchSampler:
    """Rank ``rank`` of ``world_size`` gets global batches r, r + W, … of ``global_batches``.

    Unlike mmengine's ``DefaultSampler`` (which gives rank r the *samples* r, r + W, …), every
    batch holds the same images as in one process, so order-dependent calibration statistics
    (EMA, the last batch of PTF / OMSE) merge exactly (``fqvit_det.calibration.distributed``).
    ``sampler`` (built by mmengine from the config) is used only for its dataset's length.
    """

    def __init__(self, sampler, batch_size: int, num_images: int, rank: int = 0,
                 world_size: int = 1):
        dataset = getattr(sampler, 'dataset', None)
        available = len(dataset) if dataset is not None else len(sampler)
        self.num_images = min(int(num_images), available)
        batches = global_batches(self.num_images, int(batch_size))
        self.batches = [batches[i] for i in shard_indices(len(batches), rank, world_size)]

    @property
    def rank_images(self) -> int:
        return sum(len(b) for b in self.batches)

    def __iter__(self):
        return iter([list(b) for b in self.batches])

    def __len__(self):
        return len(self.batches)


def build_calibration_loader(dl_cfg, num_images: int, rank: int, world: int):
    """This rank's calibration loader (see ``CalibrationBatchSampler``)."""
    from mmengine.runner import Runner
    cfg = copy.deepcopy(dl_cfg.to_dict() if hasattr(dl_cfg, 'to_dict') else dict(dl_cfg))
    cfg.setdefault('sampler', dict(type='DefaultSampler', shuffle=False))
    cfg['batch_sampler'] = dict(type='CalibrationBatchSampler', num_images=num_images, rank=rank,
                                world_size=world)
    cfg.setdefault('batch_size', 1)
    return Runner.build_dataloader(cfg, seed=0)


@HOOKS.register_module()
class CalibrationHook(Hook):
    """Calibrate ``runner.model`` (a quantizable wrapper) on ``dataloader`` before testing.

    Args:
        dataloader: calibration dataloader config; default: ``quant_cfg.calib_dataloader`` of the
            model, else the test dataloader. Its first ``num_images`` images are used, in dataset
            order, in batches of its ``batch_size``; with W processes rank r takes batches
            r, r + W, … (the result is the single-process one on every rank).
        num_images: images to calibrate on; default: the method's ``calib_images``.
        quant_state: a saved state to load instead of calibrating.
        save_state: write ``<work_dir>/quant_state.safetensors`` after calibrating.
        float_eval: leave the model in float mode (a float baseline run of the same config).
        integer: after calibrating (or loading the state), evaluate the integer model
            (``fqvit_det.integer.to_integer`` through the wrapper's ``convert_to_integer``).
        exact_arithmetic: after calibrating (or loading the state), switch the quantized model to
            integer-exact arithmetic (``fqvit_det.nn.exact.set_exact_arithmetic``).
    """
    priority = 'VERY_HIGH'

    def __init__(self, dataloader: Optional[dict] = None, num_images: Optional[int] = None,
                 quant_state: Optional[str] = None, save_state: bool = True,
                 float_eval: bool = False, integer: bool = False, exact_arithmetic: bool = False):
        self.integer = integer
        self.exact_arithmetic = exact_arithmetic
        self.dataloader = dataloader
        self.num_images = num_images
        self.quant_state = quant_state
        self.save_state = save_state
        self.float_eval = float_eval
        self.result = None

    def _calibrate(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        spec = getattr(model, 'quant_spec', None)
        if spec is None:
            runner.logger.warning('CalibrationHook: the model has no quant_cfg; evaluating in float')
            return
        target = model.quant_target
        if self.float_eval:
            set_quant_mode(target, 'float')
            runner.logger.info('CalibrationHook: float evaluation (quantizers disabled)')
            return
        self.result = None
        if self.quant_state:
            load_quant_state(target, self.quant_state, spec, origin='--quant-state')
            runner.logger.info(f'CalibrationHook: loaded calibrated state {self.quant_state}')
            self.result = dict(quant_state=self.quant_state)
            return
        dl_cfg = self.dataloader or model.quant_glue.get('calib_dataloader') or runner.cfg.test_dataloader
        num = self.num_images or spec.calib_images
        world, rank = runner.world_size, runner.rank
        loader = build_calibration_loader(dl_cfg, num, rank, world)
        sampler = loader.batch_sampler
        runner.logger.info(f'CalibrationHook: {spec.method} W{spec.w_bits}A{spec.a_bits}'
                           f'(attn {spec.attn_bits}) on {sampler.num_images} images'
                           + (f' (rank {rank}/{world}: {sampler.rank_images})' if world > 1 else ''))
        if sampler.num_images < num:
            runner.logger.warning(f'CalibrationHook: asked for {num} calibration images, the '
                                  f'dataset has {sampler.num_images}')
        t0 = time.time()
        calib = CalibrationRunner(target, spec, forward_fn=model.calib_forward, progress=True)
        self.result = calib.run(loader, rank_images=sampler.rank_images,
                                total_images=sampler.num_images)
        self.result['images'] = sampler.num_images
        runner.logger.info(f'CalibrationHook: calibrated in {time.time() - t0:.1f}s')
        if self.save_state and runner.rank == 0:
            path = save_quant_state(target, os.path.join(runner.work_dir, STATE_NAME), spec)
            self.result['state_file'] = path
            runner.logger.info(f'CalibrationHook: saved calibrated state to {path}')

    def before_test(self, runner) -> None:
        self._calibrate(runner)
        self._maybe_exact(runner)
        self._maybe_integer(runner)

    def _maybe_exact(self, runner) -> None:
        if not self.exact_arithmetic or self.float_eval:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if getattr(model, 'quant_spec', None) is None:
            raise ValueError('--exact-arithmetic needs a quantized model (the config has no quant_cfg)')
        from ..nn.exact import set_exact_arithmetic
        n = set_exact_arithmetic(model.quant_target)
        runner.logger.info(f'CalibrationHook: integer-exact arithmetic in {n} quantized layers / '
                           'attentions')

    def _maybe_integer(self, runner) -> None:
        if not self.integer or self.float_eval:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        if getattr(model, 'quant_spec', None) is None:
            raise ValueError('--integer needs a quantized model (the config has no quant_cfg)')
        t0 = time.time()
        model.convert_to_integer()
        runner.logger.info(f'CalibrationHook: evaluating the integer model (converted in '
                           f'{time.time() - t0:.1f}s)')

    def before_val(self, runner) -> None:
        self._calibrate(runner)
        self._maybe_exact(runner)
