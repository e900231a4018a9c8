"""mmdet glue: the quantized-detector wrapper and a timm ViT/DeiT backbone with a simple pyramid."""
from typing import Optional, Sequence

from mmengine.model import BaseModel, BaseModule
from mmengine.registry import MODELS
from torch import nn

from ..convert.bn_fold import fold_batchnorm
from ..convert.det_heads import (cnn_backbone_rules, det_head_rules, detector_parts,
                                  is_transformer_backbone)
from .checkpoint import load_into, load_weights
from .quant_model import QuantizableMixin

SCOPES = ('full', 'backbone')
# Detection calibration default: a few train2017 images through the test pipeline. RepQ-ViT and
# APHQ-ViT calibrate detectors on a single image; 8 gives observers and searches a little more
# variety while keeping calibration well under the cost of evaluating COCO val on CPU.
DET_CALIB_IMAGES = 8


@MODELS.register_module()
class TimmViTBackbone(BaseModule):
    """A timm ViT/DeiT as an mmdet backbone, with a ViTDet-style simple feature pyramid.

    The stride-16 token map is turned into strides 4/8/16/32 (two / one transposed convs,
    identity, max-pool) with channels C/4, C/2, C, C. Weights: ``checkpoint`` (safetensors or
    .pth, weights-only) or timm ``pretrained=True``; the classifier head is dropped.
    """

    def __init__(self, model_name: str = 'deit_tiny_patch16_224', checkpoint: Optional[str] = None,
                 pretrained: bool = False, out_indices: Sequence[int] = (0, 1, 2, 3), init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        import timm
        self.vit = timm.create_model(model_name, pretrained=pretrained and not checkpoint,
                                     num_classes=0, global_pool='', dynamic_img_size=True,
                                     dynamic_img_pad=True)
        if checkpoint:
            state = {k: v for k, v in load_weights(checkpoint).items() if not k.startswith('head.')}
            load_into(self.vit, state, checkpoint)
        c = self.vit.embed_dim
        self.out_indices = tuple(out_indices)
        self.pyramid = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(c, c // 2, 2, 2), nn.GELU(),
                          nn.ConvTranspose2d(c // 2, c // 4, 2, 2)),
            nn.ConvTranspose2d(c, c // 2, 2, 2),
            nn.Identity(),
            nn.MaxPool2d(2, 2),
        ])
        self.out_channels = [c // 4, c // 2, c, c]

    def forward(self, x):
        h, w = x.shape[-2:]
        p = self.vit.patch_embed.patch_size
        tokens = self.vit.forward_features(x)[:, self.vit.num_prefix_tokens:]
        gh, gw = -(-h // p[0]), -(-w // p[1])
        feat = tokens.transpose(1, 2).reshape(x.shape[0], -1, gh, gw)
        return tuple(self.pyramid[i](feat) for i in self.out_indices)


def backbone_rules(backbone):
    if isinstance(backbone, TimmViTBackbone):
        from ..convert.timm_vit import vit_rules
        return vit_rules(prefix='backbone.vit.')
    from ..convert.mmdet_swin import is_mmdet_swin, mmdet_swin_rules
    if is_mmdet_swin(backbone):
        return mmdet_swin_rules('backbone.')
    if not is_transformer_backbone(backbone):  # a CNN (CSPDarknet, ResNet, ...)
        return cnn_backbone_rules(backbone)
    raise TypeError(f'no quantization rules for backbone {type(backbone).__name__}; supported: '
                    'mmdet SwinTransformer, TimmViTBackbone, CNN backbones (no attention)')


@MODELS.register_module()
class QuantizedDetector(QuantizableMixin, BaseModel):
    """Wraps any mmdet detector config and quantizes it by ``quant_cfg``.

    ``quant_cfg.scope``: ``'full'`` (default: backbone + neck + RPN + RoI heads, RepQ-ViT's
    protocol) or ``'backbone'``. ``checkpoint``: detector weights (safetensors, or .pth loaded
    weights-only; mmdet 2.x Swin-OD checkpoints: convert with tools/convert_checkpoint.py first).
    """
    outputs_logits = False

    def __init__(self, detector: dict, quant_cfg: Optional[dict] = None,
                 checkpoint: Optional[str] = None, data_preprocessor=None, init_cfg=None):
        from mmdet.registry import MODELS as DET_MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        super().__init__(init_cfg=init_cfg)
        detector = dict(detector)
        if data_preprocessor is not None:
            detector['data_preprocessor'] = data_preprocessor
        self.detector = DET_MODELS.build(detector)
        self.data_preprocessor = self.detector.data_preprocessor
        if checkpoint:
            load_into(self.detector, load_weights(checkpoint), checkpoint)
        if quant_cfg:
            quant_cfg = dict(quant_cfg)
            scope = quant_cfg.get('scope', 'full')
            if scope not in SCOPES:
                raise ValueError(f'quant_cfg.scope must be one of {SCOPES}, got {scope!r}')
            quant_cfg.setdefault('calib_images', DET_CALIB_IMAGES)
            if quant_cfg.get('fold_bn', True):
                # Before conversion and calibration; the float baseline is this folded model too.
                self.folded_bn = fold_batchnorm(self.detector)
        self.setup_quantization(quant_cfg)

    @property
    def quant_target(self):
        return self.detector

    def convert_to_integer(self) -> None:
        """Integer twin of the calibrated detector (``fqvit_det.integer.to_integer``): int8 GEMMs
        for the backbone's Linears and patch embedding, the DeiT attention cores and the RoI heads'
        Linears; the other convolutions and Swin's windowed attention stay simulated, computed on
        their codes (integer-exact)."""
        from ..integer import to_integer
        self.detector = to_integer(self.detector)

    def conversion_rules(self, glue):
        rules = backbone_rules(self.detector.backbone)
        if glue.get('scope', 'full') == 'full':
            rules += det_head_rules(detector_parts(self.detector), self.detector)
        return rules

    def calib_forward(self, model, batch):
        data = model.data_preprocessor(batch, False)
        return model(**data, mode='predict')

    def forward(self, inputs, data_samples=None, mode='tensor'):
        return self.detector(inputs, data_samples, mode=mode)

    def val_step(self, data):
        return self.detector.val_step(data)

    def test_step(self, data):
        return self.detector.test_step(data)
