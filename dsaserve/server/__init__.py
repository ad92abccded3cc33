"""OpenAI-compatible HTTP serving for dsaserve (``dsaserve serve``).

Modules: ``protocol`` (request models, OpenAI error body), ``engine_loop`` (the engine thread and its
asyncio bridge over an ``EngineClient``: aborts, metrics, fault handling; detokenization and stop strings
are the engine's ``OutputProcessor``), ``metrics`` (Prometheus),
``app`` (FastAPI endpoints), ``cli`` (flags, uvicorn, exit status, no orphaned workers).

FastAPI / uvicorn / prometheus_client are imported only inside this package: the model and kernel
code never depends on them (the GPU machines do not have them installed).
"""
