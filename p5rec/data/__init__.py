"""Data: raw files to a prepared dataset (readers, hub, preprocess, splits, indexing, explain, prepare).

The first layer of the flow data -> prompts -> train / eval -> serve: nothing here imports those layers.
"""
