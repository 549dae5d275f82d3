"""What every stage shares, at the bottom of the house (it imports no other module of the project):

  cli       argparse with ranges in --help, one-line errors, Ctrl-C and crash handling: every main() runs in cli()
  dist      the process group under torchrun (or one process without it), the device, print0
  manifest  the identity of models and data files, and claim(): an output folder holds one run's outputs
  metrics   the metrics JSONL and loss plot, skipped-sample counts, timers, the GPU's peak FLOP/s
  schedule  the learning-rate schedule
"""
