"""Self-supervised pretraining of the ECHO encoder (spec section 8): teacher-student distillation after EAT /
data2vec 2.0, on packed variable-length batches (nothing padded), from one CPU to many GPUs.

corpus (folder manifest, examples) -> shards (WebDataset) -> sampling (crops, bands, masks, token-budget
batches) -> objective (targets, decoder, losses) -> schedule (lr, EMA) -> checkpoints -> trainer -> command.
"""
