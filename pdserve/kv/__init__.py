"""pdserve's vLLM KV connector: prefill KV is pulled by the decode instance.

Load it in vLLM with::

    --kv-transfer-config '{"kv_connector": "PdserveConnector",
                           "kv_connector_module_path": "pdserve.kv.connector",
                           "kv_role": "kv_producer", "kv_connector_extra_config": {...}}'

Modules: ``config`` (extra-config settings), ``messages`` (side-channel wire format), ``layout``
(gather/scatter of blocks in vLLM's paged KV tensors), ``leases`` (prefill-side block leases),
``transports`` (tcp / shm / torch_dist), ``side_channel`` (prefill-side server), ``puller``
(decode-side client), ``scheduler_side`` / ``worker_side`` (the two halves of the connector),
``connector`` (the class vLLM loads), ``shared_cores`` (no busy wait in vLLM's engine and
workers on shared CPU cores).
"""
