"""The components both trainers (train_sft.py, train_dpo.py) are built from; each script owns its loop.

  loop        the flags they share, precision and autocast, this rank's batch order, resuming, moving a batch to
              the device, clipping
  guard       SIGTERM (finish the step, checkpoint, exit 143) and a non-finite loss or gradient norm (stop unapplied)
  checkpoint  models on devices (FSDP2 / DDP, sharded loading) and atomic sharded checkpoints
  memory      the per-GPU memory of a recipe, from the model's shapes (bench/memory.py prints its table)
"""
