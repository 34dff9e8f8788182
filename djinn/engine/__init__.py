"""The engine: sessions, their KV caches, and the batched step that serves them all.

The life of a step (one model's, `worker.ModelWorker.step`):

1. **Schedule** (`scheduler.py`): the runnable sessions, in order of arrival under the token budget, each
   made resident in the KV pool (`kv_pool.py`: swapped in, blocks allocated, shared blocks copied before a
   write; others swapped out for room). Each becomes a `Row`: fresh tokens, the token the step still in
   flight samples, or a resumed row's saved state at its site.
2. **Plan** (`step_plan.py`): what each row computes (from the embedding or after its pause site, to the
   final norm or the site it pauses at now), its edits and captures per site, where the step is cut for the
   host, and where residual adds may be deferred into the next norm. Interventions were compiled into the
   rows' plans (`plan.py`) when their calls came in.
3. **Run** the plan: replayed from CUDA graphs segment by segment where it fits (`cuda_graphs.py`), else
   eagerly site by site (`runner.py`), over the model's stack (`djinn/models/`) on a flat varlen batch
   (`batch.py`). Pausing rows leave with their state, captures are staged to the host (`staging.py`).
4. **Update** (`worker.py`): sampling is queued on the device (`sampling.py`) and the host reads the step
   before it meanwhile: tokens to their sessions and callers, rows whose own values went NaN/Inf failed
   alone, pauses announced once their activation is on the host, finished calls completed.

`engine.py` holds the commands between steps (sessions, generate, resume, checkpoints, forks, sharing
between owners); `service.py` is the one thread that runs both.
"""
