"""What ``tools/test.py`` does, importable for tests: validate early, wrap, run, summarise."""
import copy
import os
import os.path as osp
import time

from mmengine.config import Config, ConfigDict

from .quant_model import split_quant_cfg

CLASSIFIERS = ('TimmClassifier',)
WRAPPERS = ('QuantizedDetector',) + CLASSIFIERS


def _check_path(path, what, key):
    if path and not osp.exists(path):
        raise FileNotFoundError(f'{key}: {what} {path!r} does not exist')


def check_dataset(ds_cfg, key):
    """Fail before any heavy work when a dataset's files are missing."""
    if ds_cfg is None:
        return
    ds_cfg = ds_cfg.get('dataset', ds_cfg) if ds_cfg.get('type') in ('RepeatDataset', 'ClassBalancedDataset') else ds_cfg
    root = ds_cfg.get('data_root') or ''
    _check_path(root or None, 'data_root', f'{key}.data_root')
    ann = ds_cfg.get('ann_file')
    if ann:
        _check_path(ann if osp.isabs(ann) else osp.join(root, ann), 'annotation file', f'{key}.ann_file')
    prefix = ds_cfg.get('data_prefix')
    if isinstance(prefix, dict):
        for name, sub in prefix.items():
            if sub and isinstance(sub, str):
                _check_path(sub if osp.isabs(sub) else osp.join(root, sub), 'image folder',
                            f'{key}.data_prefix.{name}')


def _wrapper_checkpoint(cfg: Config, checkpoint):
    """The wrapper loads detector weights itself (safetensors or weights-only .pth, strict, before
    BatchNorm folding), so a config's ``load_from`` becomes its checkpoint (``--checkpoint`` wins)
    and the Runner must not load it again. A plain mmdet config given a checkpoint is wrapped
    without quantization, so ``--float --checkpoint X.safetensors`` works for any detector."""
    if (checkpoint and cfg.model.get('type') not in WRAPPERS
            and cfg.get('default_scope') == 'mmdet'):
        cfg.model = ConfigDict(type='QuantizedDetector', detector=cfg.model)
    if cfg.model.get('type') in WRAPPERS and cfg.get('load_from'):
        checkpoint = checkpoint or cfg.load_from
        cfg.load_from = None
    return checkpoint


def prepare_config(cfg: Config, checkpoint=None, quant_state=None, calib_images=None, out=None,
                   show_dir=None, check_data: bool = True) -> Config:
    """Resolve ``quant_cfg`` into the model, add the calibration hook, validate inputs early.

    ``check_data=False`` skips the dataset-path checks (building a model needs no data).
    """
    cfg = copy.deepcopy(cfg)
    quant_cfg = cfg.get('quant_cfg')
    model_type = cfg.model.get('type')
    if quant_cfg is not None:
        if model_type in CLASSIFIERS or model_type == 'QuantizedDetector':
            cfg.model.quant_cfg = quant_cfg
        else:  # a plain mmdet detector config + quant_cfg
            cfg.model = ConfigDict(type='QuantizedDetector', detector=cfg.model, quant_cfg=quant_cfg)
    checkpoint = _wrapper_checkpoint(cfg, checkpoint)
    qcfg = cfg.model.get('quant_cfg')
    if qcfg is not None:
        qdict = qcfg.to_dict() if hasattr(qcfg, 'to_dict') else dict(qcfg)
        split_quant_cfg(qdict)  # validate now, before any model or data is built
        scope = qdict.get('scope', 'full')
        if cfg.model.get('type') == 'QuantizedDetector' and scope not in ('full', 'backbone'):
            raise ValueError(f"quant_cfg.scope must be 'full' or 'backbone', got {scope!r}")
    if checkpoint:
        _check_path(checkpoint, 'checkpoint', '--checkpoint')
        if cfg.model.get('type') in WRAPPERS:
            cfg.model.checkpoint = checkpoint
        else:
            cfg.load_from = checkpoint
    elif cfg.model.get('checkpoint') and not cfg.model.get('pretrained'):
        _check_path(cfg.model.checkpoint, 'checkpoint', 'model.checkpoint')
    if quant_state:
        _check_path(quant_state, 'quant state', '--quant-state')
    if check_data:
        check_dataset(cfg.get('test_dataloader', {}).get('dataset'), 'test_dataloader.dataset')
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') == 'CalibrationHook']
    if qcfg is not None and not hooks:
        calib_dl = (qcfg.get('calib_dataloader') if qcfg else None) or cfg.get('calib_dataloader')
        cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [
            ConfigDict(type='CalibrationHook', dataloader=calib_dl)]
        hooks = [cfg.custom_hooks[-1]]
    for h in hooks:
        if h.get('dataloader') and check_data:
            check_dataset(h['dataloader'].get('dataset'), 'CalibrationHook.dataloader.dataset')
        if quant_state:
            h['quant_state'] = quant_state
        if calib_images:
            h['num_images'] = calib_images
    if out:
        if cfg.model.get('type') in CLASSIFIERS:
            dump = ConfigDict(type='DumpResults', out_file_path=out)
        else:
            dump = ConfigDict(type='DumpDetResults', out_file_path=out)
        ev = cfg.test_evaluator
        cfg.test_evaluator = list(ev) + [dump] if isinstance(ev, (list, tuple)) else [ev, dump]
    if show_dir:
        if cfg.model.get('type') in CLASSIFIERS:
            raise ValueError('--show-dir draws detections; it is not supported for classifiers')
        vis = cfg.default_hooks.get('visualization')
        if vis is None:
            raise ValueError('--show-dir needs default_hooks.visualization (DetVisualizationHook) in the config')
        vis['draw'] = True
        vis['test_out_dir'] = show_dir
    return cfg


def run_eval(cfg: Config, float_eval: bool = False) -> dict:
    """Build a Runner and test; returns metrics and timings."""
    from mmengine.runner import Runner
    cfg = copy.deepcopy(cfg)
    hooks = [h for h in cfg.get('custom_hooks', []) if h.get('type') == 'CalibrationHook']
    for h in hooks:
        h['float_eval'] = float_eval
        if float_eval:
            h['save_state'] = False
    tag = 'float' if float_eval else 'quant'
    cfg.experiment_name = f'{osp.splitext(osp.basename(cfg.filename or "cfg"))[0]}_{tag}_{time.strftime("%H%M%S")}_{os.getpid()}'
    runner = Runner.from_cfg(cfg)
    calib_hook = next((h for h in runner.hooks if type(h).__name__ == 'CalibrationHook'), None)
    t0 = time.time()
    metrics = runner.test()
    total = time.time() - t0
    calib = calib_hook.result.get('total') if calib_hook is not None and calib_hook.result else None
    return dict(metrics={k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()},
                eval_seconds=total - (calib or 0.0), calib_seconds=calib, work_dir=cfg.work_dir)
