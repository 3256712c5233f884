"""Evaluation: the zoo of real base / fine-tuned pairs and the measurements on them.

    metrics.py   exact-match accuracy, KL divergence, perplexity (any causal LM)
    pairs.py     the zoo: tasks, pair specs, training, the shipped copies in assets/pairs
    compare.py   the main job's quality/size table (`python -m deltacome_ao.evaluation.compare`)
    harness.py   the same accuracy through lm-eval's HFLM on a local task

Nothing in the library imports this package (the CLI's `eval --pair` does, when run): it sits
above the library in the dependency order (tests/test_architecture.py).
"""
