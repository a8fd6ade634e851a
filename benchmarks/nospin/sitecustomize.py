"""``PYTHONPATH=benchmarks/nospin``: pdserve's no-busy-wait patch in a plain vLLM server too.

A fairness check for ``compare.py``: pdserve's CPU instances turn vLLM's busy wait off
(``pdserve.kv.shared_cores``); this gives a colocated server the same patch, so the effect of
disaggregation can be told apart from the effect of the patch. Python imports this module at
start-up in every process, the server's engine core and workers included.
"""

import os

if os.environ.get("PDSERVE_SHARED_CORES", "").strip() == "1":
    try:
        from pdserve.kv import shared_cores

        shared_cores.apply()
    except ImportError:  # not a vLLM environment: nothing to patch
        pass
