"""Agreement AP: the quantized detector scored against the float detector's own predictions.

A fidelity metric that needs neither trained heads nor annotations: with ``--compare-float`` the
float pass records its predictions, and the quantized pass is evaluated by COCO AP (pycocotools,
box and, where the detector predicts masks, mask) with those float predictions as ground truth.
100 means the quantized detector reproduces the float one; it works for random weights too.

Pseudo ground truth: the float predictions with score >= ``gt_score_thr`` (default 0.3, the usual
"shown to a user" threshold of a trained detector: below it most float boxes are background guesses,
and matching them would reward reproducing noise). The quantized predictions are kept whole, up to
the detector's ``max_per_img`` (COCOeval's largest ``maxDets`` is raised to match), since AP needs
the ranked low-score tail. When no float prediction reaches the threshold anywhere (random weights:
scores near the class prior), all float predictions become the pseudo ground truth, with a warning,
and the threshold used is reported as ``agreement/gt_score_thr``.
"""
import contextlib
import io
import os
import os.path as osp
import json
from typing import Dict, List, Optional, Sequence

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

from ..log import get_logger

MODES = ('record', 'score')
DEFAULT_GT_SCORE_THR = 0.3


def prediction_record(data_sample: dict) -> dict:
    """One image's predictions as plain numpy / RLE (what both passes store)."""
    pred = data_sample['pred_instances']
    record = dict(img_id=data_sample['img_id'], height=int(data_sample['ori_shape'][0]),
                  width=int(data_sample['ori_shape'][1]),
                  bboxes=_numpy(pred['bboxes']).astype(np.float64).reshape(-1, 4),
                  scores=_numpy(pred['scores']).astype(np.float64).reshape(-1),
                  labels=_numpy(pred['labels']).astype(np.int64).reshape(-1))
    if 'masks' in pred:
        masks = pred['masks']
        record['masks'] = encode_masks(_numpy(masks)) if hasattr(masks, 'shape') else list(masks)
        if 'mask_scores' in pred:
            record['mask_scores'] = _numpy(pred['mask_scores']).astype(np.float64).reshape(-1)
    return record


_ARRAYS = {'bboxes': (np.float64, (-1, 4)), 'scores': (np.float64, (-1,)),
           'labels': (np.int64, (-1,)), 'mask_scores': (np.float64, (-1,))}


def _to_json(record: dict) -> dict:
    """A prediction record as plain JSON (the float pass's file is data, never unpickled)."""
    out = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in record.items()}
    if 'masks' in record:
        out['masks'] = [dict(size=list(m['size']), counts=m['counts'].decode('ascii')
                             if isinstance(m['counts'], bytes) else m['counts']) for m in record['masks']]
    return out


def _from_json(record: dict) -> dict:
    out = dict(record)
    for key, (dtype, shape) in _ARRAYS.items():
        if key in out:
            out[key] = np.asarray(out[key], dtype=dtype).reshape(shape)
    if 'masks' in out:
        out['masks'] = [dict(size=m['size'], counts=m['counts'].encode('ascii')) for m in out['masks']]
    return out


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, 'detach') else np.asarray(x)


def encode_masks(masks: np.ndarray) -> list:
    """(N, H, W) binary masks -> COCO RLEs."""
    from pycocotools import mask as mask_util
    return [mask_util.encode(np.asfortranarray(m[:, :, None].astype(np.uint8)))[0] for m in masks]


def _coco_entries(record: dict, image_id: int, iou_type: str, keep=None) -> List[dict]:
    from pycocotools import mask as mask_util
    idx = np.arange(len(record['scores'])) if keep is None else np.flatnonzero(keep)
    scores = record['mask_scores'] if iou_type == 'segm' and 'mask_scores' in record else record['scores']
    entries = []
    for i in idx:
        entry = dict(image_id=image_id, category_id=int(record['labels'][i]), score=float(scores[i]))
        if iou_type == 'bbox':
            x1, y1, x2, y2 = (float(v) for v in record['bboxes'][i])
            entry['bbox'] = [x1, y1, x2 - x1, y2 - y1]
            entry['area'] = (x2 - x1) * (y2 - y1)
        else:
            rle = dict(record['masks'][i])
            entry['segmentation'] = rle
            entry['area'] = float(mask_util.area(rle))
            entry['bbox'] = [float(v) for v in mask_util.toBbox(rle)]
        entries.append(entry)
    return entries


def agreement_ap(reference: Sequence[dict], predictions: Sequence[dict],
                 gt_score_thr: float = DEFAULT_GT_SCORE_THR) -> Dict[str, float]:
    """COCO AP of ``predictions`` with ``reference`` (the float predictions) as ground truth.

    Both are lists of ``prediction_record`` dicts over the same images. Returns, in [0, 1] like
    mmdet's CocoMetric, ``bbox_mAP``, ``bbox_mAP_50``, ``bbox_mAP_75`` (``segm_*`` too when both
    sides carry masks), ``num_pseudo_gt`` and the ``gt_score_thr`` actually used.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    logger = get_logger()
    ref = {r['img_id']: r for r in reference}
    pred = {r['img_id']: r for r in predictions}
    if len(ref) != len(reference) or len(pred) != len(predictions):
        raise ValueError('agreement AP: an image id occurs twice in the float or quantized predictions')
    if set(ref) != set(pred):
        only_float = sorted(set(ref) - set(pred), key=str)[:5]
        only_quant = sorted(set(pred) - set(ref), key=str)[:5]
        raise ValueError('agreement AP: the float and the quantized pass evaluated different images '
                         f'(only float: {only_float}, only quantized: {only_quant}); run both on the '
                         'same test set')
    thr = float(gt_score_thr)
    if not any((r['scores'] >= thr).any() for r in reference):
        logger.warning(f'agreement AP: no float prediction scores >= {thr} (untrained weights?); '
                       'using all float predictions as the pseudo ground truth '
                       '(agreement_evaluator.gt_score_thr sets the threshold)')
        thr = 0.0
    image_ids = {img_id: n + 1 for n, img_id in enumerate(sorted(ref, key=str))}
    iou_types = ['bbox']
    if all('masks' in r for r in reference) and all('masks' in r for r in predictions):
        iou_types.append('segm')
    labels = set()
    for r in list(reference) + list(predictions):
        labels.update(int(v) for v in r['labels'])
    max_dets = max([100] + [len(r['scores']) for r in predictions])
    out, num_pseudo_gt = {}, 0
    for iou_type in iou_types:
        gts = []
        for img_id, r in ref.items():
            gts += _coco_entries(r, image_ids[img_id], iou_type, keep=r['scores'] >= thr)
        for n, g in enumerate(gts):
            g.update(id=n + 1, iscrowd=0)
            g.pop('score')
        num_pseudo_gt = len(gts)
        names = [f'{iou_type}_mAP', f'{iou_type}_mAP_50', f'{iou_type}_mAP_75']
        dets = []
        for img_id, r in pred.items():
            dets += _coco_entries(r, image_ids[img_id], iou_type)
        if not gts:
            logger.warning('agreement AP: the float detector predicted nothing; no pseudo ground truth')
            out.update({k: -1.0 for k in names})
            continue
        if not dets:
            out.update({k: 0.0 for k in names})
            continue
        coco_gt = COCO()
        coco_gt.dataset = dict(
            images=[dict(id=image_ids[i], height=r['height'], width=r['width']) for i, r in ref.items()],
            annotations=gts, categories=[dict(id=c, name=str(c)) for c in sorted(labels)])
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt.createIndex()
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            ev.params.maxDets = [1, 10, max_dets]
            ev.evaluate()
            ev.accumulate()
        # COCOeval.summarize() reads its AP@[.5:.95] at maxDets=100 only; read the precision table
        # (IoU thresholds x recall points x classes x areas x maxDets) at area 'all', all detections.
        precision = ev.eval['precision'][:, :, :, 0, -1]
        iou_thrs = list(np.round(ev.params.iouThrs, 2))
        values = [_mean_valid(precision), _mean_valid(precision[iou_thrs.index(0.5)]),
                  _mean_valid(precision[iou_thrs.index(0.75)])]
        out.update({k: round(v, 4) for k, v in zip(names, values)})
        logger.info(f'agreement ({iou_type}, quantized vs float predictions scoring >= {thr}, '
                    f'{len(gts)} pseudo-GT): ' + ', '.join(f'{k}={v:.4f}' for k, v in zip(names, values)))
    return dict(out, num_pseudo_gt=num_pseudo_gt, gt_score_thr=thr)


def _mean_valid(precision: np.ndarray) -> float:
    valid = precision[precision > -1]  # -1: a class without pseudo-GT
    return float(valid.mean()) if valid.size else -1.0


@METRICS.register_module()
class DetAgreementMetric(BaseMetric):
    """Records the float pass's predictions (``mode='record'``) or scores the quantized pass
    against them (``mode='score'``) through ``reference_file``; see the module docstring.

    ``tools/test.py --compare-float`` adds it to detection evaluators by itself; a config's
    ``agreement_evaluator = dict(gt_score_thr=0.5)`` changes the pseudo-ground-truth threshold.
    """
    default_prefix = 'agreement'

    def __init__(self, reference_file: str, mode: str = 'score',
                 gt_score_thr: float = DEFAULT_GT_SCORE_THR, collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        if mode not in MODES:
            raise ValueError(f'DetAgreementMetric.mode must be one of {MODES}, got {mode!r}')
        check_gt_score_thr(gt_score_thr, 'DetAgreementMetric.gt_score_thr')
        self.reference_file = reference_file
        self.mode = mode
        self.gt_score_thr = float(gt_score_thr)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            self.results.append(prediction_record(sample))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        if self.mode == 'record':
            os.makedirs(osp.dirname(osp.abspath(self.reference_file)), exist_ok=True)
            with open(self.reference_file + '.tmp', 'w') as f:
                json.dump([_to_json(r) for r in results], f)
            os.replace(self.reference_file + '.tmp', self.reference_file)
            return {}
        if not osp.isfile(self.reference_file):
            raise FileNotFoundError(f'DetAgreementMetric.reference_file: the float predictions '
                                    f'{self.reference_file!r} do not exist (the float pass records them)')
        with open(self.reference_file) as f:
            reference = [_from_json(r) for r in json.load(f)]
        return agreement_ap(reference, results, self.gt_score_thr)


def check_gt_score_thr(value, key: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f'{key} must be a score in [0, 1], got {value!r}')
