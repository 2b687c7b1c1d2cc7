"""Every decision layerkv makes, in one pure home: no vLLM, torch, gRPC, Redis, Kopf or
Kubernetes import and no I/O (``tests/unit/test_policy_is_pure.py``), so the engine
plug-in, the admission service, the operator and a simulator all call the same
functions, and each is unit-tested in milliseconds.

KV memory (the engine plug-in applies these; admission predicts with them):

* ``settings``    - the LayerKV knobs and their start-up validation;
* ``sizing``      - block arithmetic: blocks a request holds with some groups resident;
* ``residency``   - ``plan_residency``: with how many KV groups a waiting request starts;
* ``placement``   - which layers form a KV group, which groups stay resident;
* ``host_ranges`` - the contiguous host-buffer allocator for offloaded KV.
* ``linalg``      - the small linear solve the fits use.

Time:

* ``latency``     - the step-time model (prefill ``a + b*P + c*P^2``, decode step
  ``d0 + d1*n + d2*C``) and the one fitter behind every online estimate of it;
* ``slack``       - TPOT slack of running requests and the early-admission gate;
* ``ttft``        - ``predict_ttft``: a worker's queue and KV wait replayed forward.

Admission and scaling:

* ``queue``       - the admission queue (EDF, FIFO);
* ``routing``     - which worker, now or later, or not at all (the TPOT guard);
* ``scaling``     - the operator's replica decision, as named rules.
"""
