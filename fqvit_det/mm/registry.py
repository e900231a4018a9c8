"""Mirror of the pure-torch quantizer registry into mmengine, so configs can ``build`` quantizers."""
from mmengine.registry import Registry

from ..quantizers import OBSERVERS as _OBSERVERS, QUANTIZERS as _QUANTIZERS

QUANTIZERS = Registry('quantizer', scope='fqvit_det')
OBSERVERS = Registry('observer', scope='fqvit_det')

for _name, _cls in _QUANTIZERS.items():
    QUANTIZERS.register_module(name=_name, module=_cls, force=True)
for _name, _cls in _OBSERVERS.items():
    OBSERVERS.register_module(name=_name, module=_cls, force=True)
