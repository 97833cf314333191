"""The paper as pure functions of tensors: the losses (eq. 4, ME-MAX, SuNCEt, RoPAWS), the
batches as functions of ``(seed, step)``, LARS (eq. 2), the ME-MAX prior, the monitor-only
metrics, soft nearest-neighbour classification and the known score. Nothing here imports a
part of paws above it: data, models, runs and commands are built on these."""
