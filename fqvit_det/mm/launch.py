"""What ``tools/test.py`` does, importable for tests: validate early, wrap, run, summarise."""
import copy
import datetime
import os
import os.path as osp
import time

from mmengine.config import Config, ConfigDict

from .quant_model import split_quant_cfg

CLASSIFIERS = ('QuantizedClassifier',)
WRAPPERS = ('QuantizedDetector',) + CLASSIFIERS
# default_scope of a plain config -> the wrapper that quantizes its model
WRAPPER_OF_SCOPE = {'mmdet': 'QuantizedDetector', 'mmpretrain': 'QuantizedClassifier'}
# --compare-float on a detector: the float pass records its predictions here (in the work dir) and
# the quantized pass is scored against them (``DetAgreementMetric``).
AGREEMENT_FILE = 'float_predictions.json'
AGREEMENT_KEYS = ('gt_score_thr',)
AGREEMENT_PREFIX = 'agreement/'


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
    if isinstance(prefix, str) and prefix:  # mmpretrain: one image folder
        _check_path(prefix if osp.isabs(prefix) else osp.join(root, prefix), 'image folder',
                    f'{key}.data_prefix')
    if isinstance(prefix, dict):
        for name, sub in prefix.items():
            if sub and isinstance(sub, str):
                _check_path(sub if osp.isabs(sub) else osp.join(root, sub), 'image folder',
                            f'{key}.data_prefix.{name}')


def _wrap(cfg: Config, quant_cfg=None) -> None:
    """Put a plain mmdet / mmpretrain model config inside its quantizing wrapper."""
    # mmpretrain configs set default_scope='mmpretrain'; anything else is taken as a detector.
    wrapper = WRAPPER_OF_SCOPE.get(cfg.get('default_scope'), 'QuantizedDetector')
    inner = 'detector' if wrapper == 'QuantizedDetector' else 'classifier'
    cfg.model = ConfigDict({'type': wrapper, inner: cfg.model})
    if quant_cfg is not None:
        cfg.model.quant_cfg = quant_cfg


def _wrapper_checkpoint(cfg: Config, checkpoint):
    """The wrapper loads the weights itself (safetensors or weights-only .pth, strict, before
    BatchNorm folding / quantization), so a config's ``load_from`` becomes its checkpoint
    (``--checkpoint`` wins) and the Runner must not load it again. A plain mmdet / mmpretrain config
    given a checkpoint is wrapped without quantization, so ``--float --checkpoint X.safetensors``
    works for any detector or classifier."""
    if (checkpoint and cfg.model.get('type') not in WRAPPERS
            and cfg.get('default_scope') in WRAPPER_OF_SCOPE):
        _wrap(cfg)
    if cfg.model.get('type') in WRAPPERS and cfg.get('load_from'):
        checkpoint = checkpoint or cfg.load_from
        cfg.load_from = None
    return checkpoint


def check_agreement_cfg(cfg: Config) -> dict:
    """The config's optional ``agreement_evaluator`` (options of ``DetAgreementMetric``), checked."""
    from .agreement import check_gt_score_thr
    opts = cfg.get('agreement_evaluator')
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise TypeError(f'agreement_evaluator must be a dict like dict(gt_score_thr=0.3), got {opts!r}')
    unknown = sorted(set(opts) - set(AGREEMENT_KEYS))
    if unknown:
        raise ValueError(f'agreement_evaluator.{unknown[0]}: unknown key; expected one of {list(AGREEMENT_KEYS)}')
    if 'gt_score_thr' in opts:
        check_gt_score_thr(opts['gt_score_thr'], 'agreement_evaluator.gt_score_thr')
    return dict(opts)


def is_detector(cfg: Config) -> bool:
    """An mmdet model (wrapped or not): predictions the agreement metric can score."""
    return cfg.model.get('type') == 'QuantizedDetector' or (
        cfg.model.get('type') not in CLASSIFIERS and cfg.get('default_scope') == 'mmdet')


def add_agreement_metric(cfg: Config, float_eval: bool, reference_file: str) -> None:
    """Append ``DetAgreementMetric``: the float pass records, the quantized pass scores."""
    metric = ConfigDict(type='DetAgreementMetric', reference_file=reference_file,
                        mode='record' if float_eval else 'score', **check_agreement_cfg(cfg))
    ev = cfg.test_evaluator
    cfg.test_evaluator = list(ev) + [metric] if isinstance(ev, (list, tuple)) else [ev, metric]


def split_agreement(metrics: dict):
    """(metrics without the agreement keys, the agreement metrics without their prefix)."""
    rest = {k: v for k, v in metrics.items() if not k.startswith(AGREEMENT_PREFIX)}
    agreement = {k[len(AGREEMENT_PREFIX):]: v for k, v in metrics.items() if k.startswith(AGREEMENT_PREFIX)}
    return rest, agreement


def prepare_config(cfg: Config, checkpoint=None, quant_state=None, calib_images=None, out=None,
                   show_dir=None, check_data: bool = True, integer: bool = False,
                   exact_arithmetic: bool = False) -> Config:
    """Resolve ``quant_cfg`` into the model, add the calibration hook, validate inputs early.

    ``check_data=False`` skips the dataset and checkpoint path checks (resolving a config needs
    neither; the wrapper still refuses a missing checkpoint when it is built).
    """
    cfg = copy.deepcopy(cfg)
    check_agreement_cfg(cfg)
    quant_cfg = cfg.get('quant_cfg')
    model_type = cfg.model.get('type')
    if model_type not in WRAPPERS and 'quant_cfg' in cfg.model:  # quant_cfg written into the model
        inner = cfg.model.pop('quant_cfg')
        quant_cfg = inner if quant_cfg is None else quant_cfg
    if quant_cfg is not None:
        if model_type in WRAPPERS:
            cfg.model.quant_cfg = quant_cfg
        else:  # a plain mmdet detector / mmpretrain classifier config + quant_cfg
            _wrap(cfg, quant_cfg)
    checkpoint_key = '--checkpoint' if checkpoint else 'load_from'
    checkpoint = _wrapper_checkpoint(cfg, checkpoint)
    qcfg = cfg.model.get('quant_cfg')
    if qcfg is not None:
        qdict = qcfg.to_dict() if hasattr(qcfg, 'to_dict') else qcfg
        # validate now, before any model or data is built
        split_quant_cfg(qdict, outputs_logits=cfg.model.get('type') != 'QuantizedDetector')
    if checkpoint:
        if check_data:
            _check_path(checkpoint, 'checkpoint', checkpoint_key)
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
    if exact_arithmetic and qcfg is None:
        raise ValueError('--exact-arithmetic needs a config with quant_cfg (it changes how the '
                         'quantized model computes)')
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
        if exact_arithmetic:
            h['exact_arithmetic'] = True
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


def close_distributed() -> None:
    """Destroy the process group ``init_distributed`` (or mmengine) started: left to interpreter
    exit, gloo's threads can be torn down in the wrong order and abort the process after the run
    has finished ("terminate called without an active exception")."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def run_eval(cfg: Config, float_eval: bool = False, agreement_file: str = None) -> dict:
    """Build a Runner and test; returns metrics and timings.

    ``agreement_file`` (detectors): the float pass records its predictions there and the quantized
    pass returns its agreement AP against them under ``agreement`` (see ``DetAgreementMetric``).
    """
    from mmengine.runner import Runner
    cfg = copy.deepcopy(cfg)
    if agreement_file:
        add_agreement_metric(cfg, float_eval, agreement_file)
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
    metrics, agreement = split_agreement(
        {k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()})
    out = dict(metrics=metrics)
    if agreement:
        out['agreement'] = agreement
    return dict(out, eval_seconds=total - (calib or 0.0), calib_seconds=calib, work_dir=cfg.work_dir,
                calibration=jsonable(result))
