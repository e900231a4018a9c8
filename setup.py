from setuptools import find_packages, setup

# What imports what (tests/test_packaging.py checks these against a wheel in a fresh venv):
# the core (quantizers, presets, calibration, search, state files) imports torch, numpy and
# safetensors only; fqvit_det.convert's built-in converters subclass timm's ViT and Swin modules;
# fqvit_det.mm (mmengine/mmdet/mmpretrain glue, classifier wrapper) imports mmengine, mmdet,
# mmcv's compiled ops (through mmdet's models, which do not declare mmcv), mmpretrain, timm and
# Pillow; fqvit_det.convert's mmpretrain converters subclass mmpretrain's ViT and Swin modules.
CORE = ['torch>=2.1', 'numpy', 'safetensors']
TIMM = ['timm==1.0.31']
# the integer model's compiled CPU kernels build with ninja (and a C++ compiler, not from PyPI)
KERNELS = ['ninja']
MM = ['mmengine==0.10.7', 'mmdet==3.3.0', 'mmcv==2.1.0', 'mmpretrain==1.2.0', 'pillow'] + TIMM

setup(
    name='fqvit-det',
    version='0.1.0',
    description='Post-training quantization of vision transformers for mmdet 3.x detection and timm '
                'classification: FQ-ViT, PTQ4ViT, RepQ-ViT and AdaLog on one quantizer set.',
    packages=find_packages(include=['fqvit_det', 'fqvit_det.*']),
    # the integer model's CPU kernels, compiled on first use (fqvit_det/integer/kernels.py)
    package_data={'fqvit_det.integer': ['csrc/*.cpp']},
    python_requires='>=3.10',
    install_requires=CORE,
    extras_require={'timm': TIMM, 'mm': MM, 'kernels': KERNELS},
)
