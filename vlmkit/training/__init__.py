"""Training: a run of stages through one loop, on one process or many (accelerate, DeepSpeed, FSDP).

Read in this order:
    run.py         run(cfg): every stage in order, continuing a stopped run where it stopped
    loop.py        train_stage: the one loop every stage and recipe uses (prepare / step / log + checkpoint)
    batches.py     dataset, loader, the resumable micro-batch stream and the accumulation window
    stages.py      which parts train in a stage (frozen, full, partial, lora) and their optimizer groups
    engine.py      accelerate / DeepSpeed / FSDP specifics
    checkpoint.py  what a checkpoint holds, how it is written atomically, where a run resumes
    precision.py   where the weights live (bf16-master, autocast, ...); flops.py, progress.py: what is logged
    preempt.py     SIGTERM / SIGINT: a checkpoint, then stop; distributed.py: process-group teardown at exit

This file imports nothing, so that importing one of these modules loads only what it needs.
"""
