"""Task families: one folder each, holding templates.yaml (its header declares the family, p5rec/prompts/families.py)."""
