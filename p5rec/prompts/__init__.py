"""Prompts: task families, templates, the tokenizer and the training mixture, read from a prepared dataset.

Imports p5rec.data and the top-level utilities only, never p5rec.train, p5rec.eval or p5rec.serve.
"""
