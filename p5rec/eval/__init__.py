"""Evaluation: decoding, metrics, baselines (SASRec included), the protocols, plots and the model card.

Builds on p5rec.prompts and p5rec.run (the run loader); never imports p5rec.serve.
"""
