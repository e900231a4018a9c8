"""The calibration runner shared by classification and detection.

    observe N batches → (distributed reduce) → finalize → RepQ reparameterization → optional
    layer-wise search (PTQ4ViT Hessian / AdaLog FPCS) → quantized inference.

``forward_fn(model, batch)`` runs one batch and returns the model's output (logits for the
Hessian search); the runner knows nothing else about the task.
"""
import logging
import time
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

from .nn.modules import QuantLayerNorm, _WeightQuantMixin
from .quantizers import Quantizer, UniformQuantizer
from .walk import (activation_quantizers, named_quantizers, refresh,  # noqa: F401
                   set_quant_mode, weight_quantizer_ids)

logger = logging.getLogger('fqvit_det')


class Progress:
    def __init__(self, total: Optional[int], desc: str, enabled: bool = True, log_fn=None):
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.log_fn = log_fn or logger.info
        self.start = time.time()

    def step(self, k: int = 1):
        self.n += k
        if self.enabled:
            total = f'/{self.total}' if self.total else ''
            self.log_fn(f'{self.desc} {self.n}{total} ({time.time() - self.start:.1f}s)')


class CalibrationRunner:
    """Calibrates a converted model.

    Args:
        model: a model converted by ``fqvit_det.convert.quantize_model``.
        spec: the ``QuantSpec`` it was converted with.
        forward_fn: ``forward_fn(model, batch) -> output``.
        reduce_fn: optional ``reduce_fn(model)`` called after observation, before finalize
            (distributed calibration reduces observer statistics across ranks here).
        progress: log one line per calibration batch.
        log_fn: where progress lines go (default: the ``fqvit_det`` logger).
    """

    def __init__(self, model: nn.Module, spec, forward_fn: Callable = None,
                 reduce_fn: Callable = None, progress: bool = True, log_fn: Callable = None):
        self.model = model
        self.spec = spec
        self.forward_fn = forward_fn or (lambda m, b: m(b))
        self.reduce_fn = reduce_fn
        self.progress = progress
        self.log_fn = log_fn
        self.timings = {}

    # --- steps ------------------------------------------------------------------------------
    def calibrate_weights(self) -> None:
        for m in self.model.modules():
            if isinstance(m, _WeightQuantMixin):
                m.calibrate_weight()

    def observe(self, batches: Iterable, total: Optional[int] = None) -> int:
        acts = activation_quantizers(self.model)
        for _, q in acts:
            q.reset()
            q.set_mode('observe')
        prog = Progress(total, 'calibration batch', self.progress, self.log_fn)
        n = 0
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for batch in batches:
                self.forward_fn(self.model, batch)
                n += 1
                prog.step()
        self.model.train(was_training)
        if n == 0:
            raise ValueError('calibration received no batches: check the calibration dataset/loader')
        return n

    def finalize(self) -> None:
        acts = activation_quantizers(self.model)
        unseen = [name for name, q in acts if not self._has_data(q)]
        if unseen:
            raise RuntimeError('these quantizers saw no calibration data (their module never ran): '
                               + ', '.join(unseen[:10]) + (' ...' if len(unseen) > 10 else ''))
        for _, q in acts:
            q.finalize()

    @staticmethod
    def _has_data(q: Quantizer) -> bool:
        counts = [m.num_batches for m in q.modules() if hasattr(m, 'num_batches')]
        return not counts or any(int(c) > 0 for c in counts)

    def reparameterize(self) -> List[str]:
        """RepQ-ViT: fold channel-wise LayerNorm-output scales into the norm and the next Linears."""
        from .quantizers.reparam import repq_reparameterize_modules
        done = []
        for norm_path, linear_paths in getattr(self.model, 'fqvit_reparam_pairs', []):
            norm = self.model.get_submodule(norm_path)
            outq = norm.out_quantizer
            if not isinstance(norm, QuantLayerNorm) or not isinstance(outq, UniformQuantizer) \
                    or outq.ch_axis is None:
                continue
            linears = [self.model.get_submodule(p) for p in linear_paths]
            with torch.no_grad():
                tgt_scale, tgt_zp = repq_reparameterize_modules(norm, linears, outq.scale,
                                                                outq.zero_point)
            for lin in linears:
                lin.calibrate_weight()  # weights changed: the only lossy step of RepQ
            outq.ch_axis = None
            outq.observer.ch_axis = None
            outq.set_params(tgt_scale, tgt_zp)
            done.append((norm_path, list(linear_paths)))
        self.model.fqvit_reparam_done = done
        return done

    # --- driver -----------------------------------------------------------------------------
    def run(self, batches: Iterable, total: Optional[int] = None) -> dict:
        """Full calibration. ``batches`` is re-iterated by the search, so pass a list or a loader."""
        t0 = time.time()
        set_quant_mode(self.model, 'float')
        self.calibrate_weights()
        n = self.observe(batches, total)
        if self.reduce_fn is not None:
            self.reduce_fn(self.model)
        self.finalize()
        self.timings['observe'] = time.time() - t0
        if self.spec.reparam:
            t1 = time.time()
            self.reparameterize()
            self.timings['reparam'] = time.time() - t1
        if self.spec.search:
            from .search import run_search
            t1 = time.time()
            set_quant_mode(self.model, 'quant')
            self.search_report = run_search(self.model, self.spec, batches, self.forward_fn,
                                            progress=self.progress)
            self.timings['search'] = time.time() - t1
        set_quant_mode(self.model, 'quant')
        self.timings['total'] = time.time() - t0
        return dict(batches=n, **self.timings)
