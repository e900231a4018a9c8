"""The calibration runner shared by classification and detection.

    weights → observe this rank's batches → merge statistics across ranks → finalize →
    fold per-channel input scales into dense-conv weights → RepQ reparameterization → layer
    search (PTQ4ViT Hessian / AdaLog FPCS, on rank 0) → GPTQ weights (Hessian-compensated weight
    roles, a second pass on the calibrated model) → bias correction (on rank 0) →
    broadcast rank 0's parameters → quantized inference.

``forward_fn(model, batch)`` runs one batch and returns the model's output (logits for the
Hessian search); the runner knows nothing else about the task. Distributed runs (torch.distributed
initialised, several ranks) pass each rank its share of the global batch sequence — global batches
r, r + W, … (``distributed.shard_batches``) — and end bit-identical on every rank and equal to one
process on all batches; ``distributed`` says how each step achieves that.
"""
import time
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ..log import get_logger
from ..nn.modules import QuantModule, _WeightQuantMixin, compensates_with_inputs
from ..walk import activation_quantizers, refresh, set_quant_mode
from . import distributed
from .reparam import reparameterize


def batch_images(batch) -> Optional[int]:
    """Images in a calibration batch, when its structure tells (tensor, ``inputs``, list)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    if isinstance(batch, dict):
        inner = batch.get('inputs', batch.get('img'))
        return None if inner is None else batch_images(inner)
    if isinstance(batch, (list, tuple)):
        return len(batch)
    return None


def move_to(obj, device: torch.device):
    """``obj`` with its tensors (also in dicts, lists and data samples) on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, '_fields'):
        return type(obj)(move_to(v, device) for v in obj)
    if hasattr(obj, 'to') and callable(obj.to) and not isinstance(obj, nn.Module):
        try:
            return obj.to(device)
        except TypeError:
            return obj
    return obj


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device('cpu')


class _Progress:
    """tqdm bar over this rank's calibration images (a log line at the end either way)."""

    def __init__(self, enabled: bool, rank_images: Optional[int], total_images: Optional[int]):
        rank, world = distributed.world_info()
        share = '' if rank_images is None else f'{rank_images} of {total_images or rank_images} images'
        self.desc = (f'calibration rank {rank}/{world}: {share}' if world > 1
                     else f'calibration: {share}').rstrip(': ')
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=rank_images, desc=self.desc, unit='img', leave=False,
                                position=rank, dynamic_ncols=True)

    def update(self, images: Optional[int]):
        if self.bar is not None:
            self.bar.update(images or 1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class CalibrationRunner:
    """Calibrates a converted model.

    Args:
        model: a model converted by ``fqvit_det.convert.quantize_model``.
        spec: the ``QuantSpec`` it was converted with.
        forward_fn: ``forward_fn(model, batch) -> output``; batches are moved to the model's
            device first.
        progress: a progress bar over the calibration images and log lines per step.
    """

    def __init__(self, model: nn.Module, spec, forward_fn: Callable = None, progress: bool = True):
        self.model = model
        self.spec = spec
        self.forward_fn = forward_fn or (lambda m, b: m(b))
        self.progress = progress
        self.logger = get_logger()
        self.timings = {}
        self.search_report = None  # the layer search's report (rank 0; None elsewhere)

    def _forward(self, batch):
        return self.forward_fn(self.model, move_to(batch, model_device(self.model)))

    # --- steps ------------------------------------------------------------------------------
    def calibrate_weights(self) -> None:
        for m in self.model.modules():
            if isinstance(m, QuantModule):
                m.calibrate_weight()

    def observe(self, batches: Iterable, rank_images: Optional[int] = None,
                total_images: Optional[int] = None) -> dict:
        """Observe this rank's batches; returns ``dict(batches=, images=)`` seen here."""
        acts = activation_quantizers(self.model)
        for _, q in acts:
            q.reset()
            q.set_mode('observe')
        bar = _Progress(self.progress, rank_images, total_images)
        n_batches, n_images = 0, 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    self._forward(batch)
                    size = batch_images(batch)
                    n_batches += 1
                    n_images += size or 0
                    bar.update(size)
        finally:
            bar.close()
            self.model.train(was_training)
        if self.progress:
            self.logger.info(f'{bar.desc}: observed {n_batches} calibration batches ({n_images} images)')
        return dict(batches=n_batches, images=n_images)

    def finalize(self) -> None:
        acts = activation_quantizers(self.model)
        unseen = [name for name, q in acts if q.num_observed == 0]
        if len(unseen) == len(acts) and acts:
            raise ValueError('calibration received no batches: check the calibration dataset / loader')
        if unseen:
            raise RuntimeError('these quantizers saw no calibration data (their module never ran): '
                               + ', '.join(unseen[:10]) + (' ...' if len(unseen) > 10 else ''))
        for _, q in acts:
            q.finalize()

    def fold_input_scales(self) -> int:
        """Quantize again, now with the calibrated input scales folded in, the weights of modules
        whose per-channel input scales fold into their weights (``input_channel_scale``)."""
        folded = [m for m in self.model.modules()
                  if isinstance(m, QuantModule) and m.input_channel_scale() is not None]
        for m in folded:
            m.calibrate_weight()
        return len(folded)

    def bias_correct(self, batches) -> Optional[int]:
        """Empirical bias correction on the first ``spec.bias_correction`` calibration images, as
        one batch (on rank 0, over all ranks' batches in global order; broadcast afterwards)."""
        from .bias_correction import correct_biases, merge_batches
        all_batches = distributed.gather_batches(batches)
        if all_batches is None:
            return None
        chosen, images = [], 0
        for b in all_batches:
            if images >= self.spec.bias_correction:
                break
            chosen.append(b)
            images += batch_images(b) or 1
        device = model_device(self.model)
        batch = move_to(merge_batches(chosen), device)
        return len(correct_biases(self.model, batch, self.forward_fn))

    def reparameterize(self):
        """RepQ-ViT: fold channel-wise LayerNorm-output scales into the norm and the next Linears."""
        return reparameterize(self.model)

    def search(self, batches) -> Optional[dict]:
        """The layer search on rank 0 over all ranks' batches (gathered in global order)."""
        all_batches = distributed.gather_batches(batches)
        if all_batches is None:  # not rank 0: rank 0's result arrives by broadcast
            return None
        set_quant_mode(self.model, 'quant')
        device = model_device(self.model)
        from ..search import run_search  # imported only when a recipe searches
        return run_search(self.model, self.spec, [move_to(b, device) for b in all_batches],
                          self.forward_fn, progress=self.progress)

    def compensated_weight_modules(self):
        """(path, module) of every Linear / Conv whose weight quantizer is GPTQ-style."""
        return [(n, m) for n, m in self.model.named_modules()
                if isinstance(m, _WeightQuantMixin) and compensates_with_inputs(m.w_quantizer)]

    def compensate_weights(self, batches) -> int:
        """GPTQ step. Returns the number of layers compensated.

        One pass over this rank's batches per input source the GPTQ quantizers ask for
        (``inputs``): ``'quant'`` runs the calibrated model (activation quantizers and the other
        weight quantizers on, GPTQ layers with float weights), ``'float'`` the float model. Each
        GPTQ layer collects the Hessian of its input; merged across ranks; finalized."""
        targets = self.compensated_weight_modules()
        for source in ('float', 'quant'):
            group = [(n, m) for n, m in targets if getattr(m.w_quantizer, 'inputs', 'quant') == source]
            if group:
                self._compensate(group, batches, source)
        set_quant_mode(self.model, 'quant')
        return len(targets)

    def _compensate(self, targets, batches, source: str) -> None:
        set_quant_mode(self.model, source)
        for _, m in targets:
            m.calibrate_weight()        # bind the current weight (after any reparameterization)
            m.w_quantizer.reset_stats()
            m.w_quantizer.set_mode('observe')
            m.refresh()
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in batches:
                    self._forward(batch)
        finally:
            self.model.train(was_training)
        quantizers = [m.w_quantizer for _, m in targets]
        distributed.merge_quantizer_stats(quantizers)
        unseen = [n for n, m in targets if m.w_quantizer.num_observed == 0]
        if unseen:
            raise RuntimeError('these GPTQ weight quantizers saw no layer input during the GPTQ '
                               'pass (their module never ran): ' + ', '.join(unseen[:10])
                               + (' ...' if len(unseen) > 10 else ''))
        for q in quantizers:
            q.finalize()                # GPTQ; releases the Hessians
            q.set_mode(source)
        refresh(self.model)

    # --- driver -----------------------------------------------------------------------------
    def run(self, batches: Iterable, rank_images: Optional[int] = None,
            total_images: Optional[int] = None) -> dict:
        """Full calibration on this rank's ``batches`` (all batches with one process).

        ``rank_images`` / ``total_images`` (this rank's share and the whole calibration set) only
        label the progress. Returns ``dict(rank_batches, rank_images, world_size,
        seconds={step: s, 'total': s}, search_report)`` (the report on rank 0 only)."""
        t0 = time.time()
        bias_images = getattr(self.spec, 'bias_correction', 0)
        gptq = bool(self.compensated_weight_modules())
        if self.spec.search or bias_images or gptq:  # they re-read the batches
            batches = list(batches)
        set_quant_mode(self.model, 'float')
        self.calibrate_weights()
        seen = self.observe(batches, rank_images, total_images)
        t1 = time.time()
        distributed.merge_observations(self.model)
        self.timings['merge'] = time.time() - t1
        self.finalize()
        self.timings['observe'] = time.time() - t0
        result = dict(rank_batches=seen['batches'], rank_images=seen['images'])
        folded = self.fold_input_scales()
        if folded:
            result['folded_input_scales'] = folded
        if self.spec.reparam:
            t1 = time.time()
            self.reparameterize()
            self.timings['reparam'] = time.time() - t1
        if self.spec.search:
            t1 = time.time()
            self.search_report = self.search(batches)
            if self.search_report is not None:
                result['search_report'] = self.search_report
            self.timings['search'] = time.time() - t1
        if gptq:
            t1 = time.time()
            if self.spec.search:   # every rank's GPTQ inputs must see rank 0's searched parameters
                distributed.broadcast_calibration(self.model)
            result['gptq_layers'] = self.compensate_weights(batches)
            self.timings['gptq'] = time.time() - t1
        if bias_images:
            t1 = time.time()
            corrected = self.bias_correct(batches)
            if corrected is not None:
                result['bias_corrected_modules'] = corrected
            self.timings['bias_correction'] = time.time() - t1
        t1 = time.time()
        distributed.broadcast_calibration(self.model)
        self.timings['broadcast'] = time.time() - t1
        set_quant_mode(self.model, 'quant')
        self.timings['total'] = time.time() - t0
        rank, world = distributed.world_info()
        result.update(world_size=world, seconds=dict(self.timings))
        if self.progress:
            self.logger.info(f'calibration done in {self.timings["total"]:.1f}s '
                             f'(rank {rank}/{world}: {seen["batches"]} batches, {seen["images"]} images)')
        return result
