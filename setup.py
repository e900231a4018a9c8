from setuptools import find_packages, setup

setup(
    name='fqvit-det',
    version='0.1.0',
    description='Post-training quantization of vision transformers for mmdet 3.x detection and timm '
                'classification: FQ-ViT, PTQ4ViT, RepQ-ViT and AdaLog on one quantizer set.',
    packages=find_packages(include=['fqvit_det', 'fqvit_det.*']),
    python_requires='>=3.10',
    install_requires=['torch>=2.1', 'safetensors', 'numpy'],
    extras_require={'mm': ['mmengine==0.10.7', 'mmdet==3.3.0', 'mmcv==2.1.0', 'timm==1.0.31', 'pycocotools']},
)
