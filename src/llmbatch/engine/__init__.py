"""The inference engine: continuous batching on a static KV cache, with CUDA-graph decode steps.

    families.py   the model families it runs (torch-free: the checks before queueing read it too)
    params.py     what it is asked to do (`EngineParams`); the runner translates the spec into it
    cache.py      the preallocated KV cache, in slots, sized from free memory
    attention.py  grouped-query attention over the cache (a Triton decode kernel on CUDA)
    model.py      prefill and decode passes through the Hugging Face model's own modules
    graphs.py     the decode step captured in CUDA graphs, per batch-size bucket
    scheduler.py  which prompt enters which slot, and when
    sampler.py    greedy and seeded sampling on the device
    runner.py     the loop that ties them together (`Engine`)

The engine imports nothing of the app (no spec, no runner): runners/infer.py decides when it runs,
gives it `EngineParams` and turns its tokens into results. Nothing is imported here.
"""
