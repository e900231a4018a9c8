"""Agreement AP (quantized predictions scored against the float predictions) against values
worked out by hand from COCO's definition: AP averaged over IoU thresholds 0.50:0.05:0.95 and the
101 recall points 0, 0.01, …, 1."""
import numpy as np
import pytest
import torch
from mmengine.config import Config

from fqvit_det.mm.agreement import DetAgreementMetric, agreement_ap, encode_masks
from fqvit_det.mm.launch import add_agreement_metric, prepare_config, split_agreement


def record(img_id, boxes, scores, labels, masks=None, size=(200, 300)):
    r = dict(img_id=img_id, height=size[0], width=size[1],
             bboxes=np.asarray(boxes, np.float64).reshape(-1, 4),
             scores=np.asarray(scores, np.float64), labels=np.asarray(labels, np.int64))
    if masks is not None:
        r['masks'] = encode_masks(np.asarray(masks, bool))
    return r


def float_predictions():
    return [record(0, [[10, 10, 110, 110], [150, 20, 250, 90], [5, 120, 60, 190]], [0.9, 0.8, 0.1], [1, 3, 1]),
            record(1, [[30, 40, 130, 140]], [0.7], [2])]


def test_identical_predictions_agree_fully():
    ref = float_predictions()
    out = agreement_ap(ref, ref, gt_score_thr=0.3)
    assert out['bbox_mAP'] == out['bbox_mAP_50'] == out['bbox_mAP_75'] == 1.0
    assert out['num_pseudo_gt'] == 3 and out['gt_score_thr'] == 0.3  # the 0.1 box is no pseudo-GT


def test_shifted_box_scores_the_iou_thresholds_it_passes():
    ref = [record(0, [[0, 0, 100, 100]], [0.9], [0])]
    # shifted by 23 px: IoU 77/123 = 0.626 passes the thresholds 0.50, 0.55, 0.60 of ten
    quant = [record(0, [[23, 0, 123, 100]], [0.9], [0])]
    out = agreement_ap(ref, quant)
    assert out['bbox_mAP_50'] == 1.0 and out['bbox_mAP_75'] == 0.0
    assert out['bbox_mAP'] == pytest.approx(0.3)
    # a wrong class is no match at all
    out = agreement_ap(ref, [record(0, [[0, 0, 100, 100]], [0.9], [5])])
    assert out['bbox_mAP'] == 0.0


def test_threshold_decides_the_pseudo_ground_truth():
    ref = [record(0, [[0, 0, 50, 50], [100, 100, 180, 150]], [0.9, 0.1], [0, 0])]
    quant = [record(0, [[0, 0, 50, 50]], [0.8], [0])]
    assert agreement_ap(ref, quant, gt_score_thr=0.3)['bbox_mAP'] == 1.0
    # with both float boxes as ground truth, recall stops at 1/2: precision 1 on 51 of 101 points
    assert agreement_ap(ref, quant, gt_score_thr=0.0)['bbox_mAP'] == pytest.approx(51 / 101, abs=1e-4)


def test_untrained_scores_fall_back_to_all_float_predictions():
    ref = [record(0, [[0, 0, 50, 50], [60, 60, 90, 120]], [0.02, 0.01], [0, 4])]
    out = agreement_ap(ref, ref, gt_score_thr=0.3)
    assert out['gt_score_thr'] == 0.0 and out['num_pseudo_gt'] == 2 and out['bbox_mAP'] == 1.0


def test_masks_get_their_own_ap():
    masks = np.zeros((2, 200, 300), bool)
    masks[0, 10:110, 10:110] = True
    masks[1, 20:90, 150:250] = True
    ref = [record(0, [[10, 10, 110, 110], [150, 20, 250, 90]], [0.9, 0.8], [1, 3], masks=masks)]
    assert agreement_ap(ref, ref)['segm_mAP'] == 1.0
    moved = np.roll(masks, 23, axis=2)  # box 0 keeps IoU 0.626 of its mask, box 1 likewise (70x100)
    quant = [record(0, [[10, 10, 110, 110], [150, 20, 250, 90]], [0.9, 0.8], [1, 3], masks=moved)]
    out = agreement_ap(ref, quant)
    assert out['bbox_mAP'] == 1.0 and out['segm_mAP_50'] == 1.0 and out['segm_mAP_75'] == 0.0


def test_more_than_100_predictions_per_image_are_all_scored():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (150, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (150, 2))], axis=1)
    ref = [record(0, boxes, rng.uniform(0.5, 1.0, 150), rng.integers(0, 3, 150))]
    out = agreement_ap(ref, ref)
    assert out['bbox_mAP'] == out['bbox_mAP_50'] == out['bbox_mAP_75'] == 1.0, out


def test_no_quantized_predictions_score_zero_and_image_sets_must_match():
    ref = float_predictions()
    empty = [record(r['img_id'], np.zeros((0, 4)), [], []) for r in ref]
    assert agreement_ap(ref, empty)['bbox_mAP'] == 0.0
    with pytest.raises(ValueError, match='different images'):
        agreement_ap(ref, ref[:1])


def _sample(r):
    return dict(img_id=r['img_id'], ori_shape=(r['height'], r['width']),
                pred_instances=dict(bboxes=torch.tensor(r['bboxes']), scores=torch.tensor(r['scores']),
                                    labels=torch.tensor(r['labels'])))


def test_metric_records_the_float_pass_and_scores_the_quantized_pass(tmp_path):
    ref_file = str(tmp_path / 'float_predictions.json')
    float_metric = DetAgreementMetric(reference_file=ref_file, mode='record')
    float_metric.process({}, [_sample(r) for r in float_predictions()])
    assert float_metric.evaluate(2) == {}
    quant_metric = DetAgreementMetric(reference_file=ref_file, mode='score')
    perturbed = float_predictions()
    perturbed[0]['bboxes'][0, [0, 2]] += 23.0  # one of three pseudo-GT boxes moves: IoU 0.626
    quant_metric.process({}, [_sample(r) for r in perturbed])
    out = quant_metric.evaluate(2)
    # AP per class, averaged: class 1 matches on 3 of 10 IoU thresholds, classes 2 and 3 fully
    assert out['agreement/bbox_mAP_50'] == 1.0
    assert out['agreement/bbox_mAP'] == pytest.approx((0.3 + 1 + 1) / 3, abs=1e-4)
    with pytest.raises(FileNotFoundError, match='reference_file'):
        m = DetAgreementMetric(reference_file=str(tmp_path / 'none.pkl'))
        m.process({}, [_sample(r) for r in perturbed])
        m.evaluate(2)


def test_config_key_is_checked_and_the_metric_added():
    cfg = Config(dict(model=dict(type='QuantizedDetector'), test_evaluator=dict(type='CocoMetric'),
                      agreement_evaluator=dict(gt_score_thr=0.5)))
    add_agreement_metric(cfg, float_eval=True, reference_file='f.pkl')
    added = cfg.test_evaluator[-1]
    assert added.type == 'DetAgreementMetric' and added.mode == 'record' and added.gt_score_thr == 0.5
    for bad, match in ((dict(gt_score_thr=1.5), 'gt_score_thr'), (dict(thr=0.3), 'agreement_evaluator.thr')):
        with pytest.raises(ValueError, match=match):
            prepare_config(Config(dict(model=dict(type='X'), agreement_evaluator=bad)), check_data=False)
    assert split_agreement({'coco/bbox_mAP': 0.3, 'agreement/bbox_mAP': 0.9}) == (
        {'coco/bbox_mAP': 0.3}, {'bbox_mAP': 0.9})
