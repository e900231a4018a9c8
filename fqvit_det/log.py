"""One logger for the whole package.

Inside an OpenMMLab run every line goes to mmengine's current ``MMLogger`` (the runner's log file
and console); without mmengine (the pure-torch core used on its own) to the ``fqvit_det`` logger
of the standard library. Quantizers never log: only the runner, the search and the glue do.
"""
import logging


def get_logger():
    """mmengine's current ``MMLogger`` when mmengine is installed, else ``logging.getLogger('fqvit_det')``."""
    try:
        from mmengine.logging import MMLogger
    except ImportError:
        return logging.getLogger('fqvit_det')
    return MMLogger.get_current_instance()
