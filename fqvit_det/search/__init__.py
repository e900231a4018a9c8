"""Layer-wise quantizer search (PTQ4ViT Hessian-guided grid, AdaLog FPCS).

* ``config``     – ``quant_cfg.search_cfg``: keys, defaults, ranges (``resolve_search_cfg``).
* ``capture``    – float-model capture of layer inputs, attention operands and output gradients.
* ``spaces``     – candidate parameters per quantizer type, evaluated with the quantizers' kernels.
* ``fpcs``       – PTQ4ViT's grid and AdaLog's FPCS (one implementation).
* ``select``     – one coordinate step: screen, shortlist, confirm, apply with ``set_params``.
* ``objectives`` – Hessian-guided score, pseudo-label loss, output gradients.
* ``linear`` / ``attention`` – the per-module searches; ``runner`` – ``run_search`` and its report.
"""
from .config import SEARCH_DEFAULTS, SEARCH_KEYS, resolve_search_cfg  # noqa: F401
from .runner import run_search  # noqa: F401
