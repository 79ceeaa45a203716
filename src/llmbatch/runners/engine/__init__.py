"""The inference engine: continuous batching on a static KV cache, with CUDA-graph decode steps.

    cache.py      the preallocated KV cache, in slots, sized from free memory
    attention.py  grouped-query attention over the cache (a Triton decode kernel on CUDA)
    model.py      prefill and decode passes through the Hugging Face model's own modules
    graphs.py     the decode step captured in CUDA graphs, per batch-size bucket
    scheduler.py  which prompt enters which slot, and when
    sampler.py    greedy and seeded sampling on the device
    runner.py     the loop that ties them together (`Engine`), and when to use it (`choose_engine`)

Nothing is imported here: runners/generation.py imports the sampler, and runner.py imports it back.
"""
