"""``CalibrationHook``: calibrates a quantized model before evaluation (or loads a saved state)."""
import itertools
import os
import time
from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..calibration import CalibrationRunner, set_quant_mode
from ..state import load_quant_state, save_quant_state
from .distributed import reduce_observers

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


@HOOKS.register_module()
class CalibrationHook(Hook):
    """Calibrate ``runner.model`` (a quantizable wrapper) on ``dataloader`` before testing.

    Args:
        dataloader: calibration dataloader config; default: ``quant_cfg.calib_dataloader`` of the
            model, else the test dataloader.
        num_images: images to calibrate on; default: the method's ``calib_images``.
        quant_state: a saved state to load instead of calibrating.
        save_state: write ``<work_dir>/quant_state.safetensors`` after calibrating.
        float_eval: leave the model in float mode (a float baseline run of the same config).
    """
    priority = 'VERY_HIGH'

    def __init__(self, dataloader: Optional[dict] = None, num_images: Optional[int] = None,
                 quant_state: Optional[str] = None, save_state: bool = True,
                 float_eval: bool = False):
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
            load_quant_state(target, self.quant_state, spec)
            runner.logger.info(f'CalibrationHook: loaded calibrated state {self.quant_state}')
            return
        from mmengine.runner import Runner
        dl_cfg = self.dataloader or model.quant_glue.get('calib_dataloader') or runner.cfg.test_dataloader
        loader = Runner.build_dataloader(dl_cfg, seed=0)
        num = self.num_images or spec.calib_images
        # DefaultSampler (shuffle=False) gives rank r the images r, r + W, ...: taking this rank's
        # share of the first `num` makes the union over ranks the single-process calibration set.
        world, rank = runner.world_size, runner.rank
        batches = take_images(loader, len(range(rank, num, world)))
        if spec.search:  # the layer search re-reads the calibration batches
            batches = list(batches)
        total = -(-num // max(getattr(loader, 'batch_size', None) or 1, 1))
        runner.logger.info(f'CalibrationHook: {spec.method} W{spec.w_bits}A{spec.a_bits}'
                           f'(attn {spec.attn_bits}) on {num} images')
        t0 = time.time()
        calib = CalibrationRunner(target, spec, forward_fn=model.calib_forward,
                                  reduce_fn=reduce_observers, progress=True,
                                  log_fn=runner.logger.info)
        self.result = calib.run(batches, total=total)
        runner.logger.info(f'CalibrationHook: calibrated in {time.time() - t0:.1f}s ({self.result})')
        if self.save_state and runner.rank == 0:
            path = save_quant_state(target, os.path.join(runner.work_dir, STATE_NAME), spec)
            runner.logger.info(f'CalibrationHook: saved calibrated state to {path}')

    def before_test(self, runner) -> None:
        self._calibrate(runner)

    def before_val(self, runner) -> None:
        self._calibrate(runner)
