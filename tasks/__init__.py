"""Task families: one folder each with templates.yaml (prompts as data) and task.py (scoring)."""
