"""LayerKV policy: pure Python (no vLLM, no torch), unit-tested in milliseconds.

* ``settings``   - the knobs of the plug-in and their start-up validation;
* ``placement``  - which layers form a KV group, which groups stay resident;
* ``sizing``     - how many groups can stay resident given the free blocks;
* ``slack``      - TPOT SLO slack of running requests and the early-admission gate;
* ``prefill_model`` - the online step-time model ``a + b*P + c*P^2``;
* ``host_ranges``   - the contiguous host-buffer allocator.
"""
