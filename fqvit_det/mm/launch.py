"""What ``tools/test.py`` does, importable for tests: validate early, wrap, run, summarise."""
import copy
import datetime
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
                   show_dir=None, check_data: bool = True, integer: bool = False) -> Config:
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
        qdict = qcfg.to_dict() if hasattr(qcfg, 'to_dict') else qcfg
        # validate now, before any model or data is built
        split_quant_cfg(qdict, outputs_logits=cfg.model.get('type') != 'QuantizedDetector')
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
    if integer and qcfg is None:
        raise ValueError('--integer needs a config with quant_cfg (it runs the calibrated model with '
                         'integer GEMMs)')
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
        if integer:
            h['integer'] = True
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


def init_distributed(cfg: Config, launcher: str) -> None:
    """Start torch.distributed for ``--launcher pytorch`` before mmengine's Runner does.

    mmengine 0.10.7's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally, which fails
    on a machine without a GPU. Here: nccl on GPUs (one per ``LOCAL_RANK``), gloo on CPUs, the
    timeout from ``env_cfg.dist_cfg.timeout`` (seconds; default 2 h, as the layer search runs on
    rank 0 while the other ranks wait). The Runner then finds the process group initialised.
    On CPUs the model wrapper is a DDP without ``device_ids`` (mmengine passes ``LOCAL_RANK``).
    """
    if launcher != 'pytorch':
        return
    import torch
    import torch.distributed as dist
    from ..log import get_logger
    dist_cfg = dict((cfg.get('env_cfg') or {}).get('dist_cfg') or {})
    use_cuda = torch.cuda.is_available()
    backend = 'nccl' if use_cuda else 'gloo'
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        timeout = datetime.timedelta(seconds=float(dist_cfg.get('timeout', 7200)))
        dist.init_process_group(backend, timeout=timeout)
        if dist_cfg.get('backend', backend) != backend:
            get_logger().info(f'--launcher pytorch: using the {backend} backend on this '
                              f'{"GPU" if use_cuda else "CPU-only"} machine (env_cfg.dist_cfg.backend '
                              f'asks for {dist_cfg["backend"]})')
    if not use_cuda and cfg.get('model_wrapper_cfg') is None:
        cfg.model_wrapper_cfg = ConfigDict(type='MMDistributedDataParallel', device_ids=None)


def jsonable(obj):
    """``obj`` with tensors as numbers / lists (large ones summarised) for summary.json."""
    import torch
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 1:
            return obj.item()
        return obj.tolist() if obj.numel() <= 64 else dict(shape=list(obj.shape), mean=float(obj.float().mean()))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


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
    result = calib_hook.result if calib_hook is not None and calib_hook.result else None
    calib = result.get('seconds', {}).get('total') if result else None
    return dict(metrics={k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()},
                eval_seconds=total - (calib or 0.0), calib_seconds=calib, work_dir=cfg.work_dir,
                calibration=jsonable(result))
