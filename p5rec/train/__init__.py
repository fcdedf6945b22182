"""Training: the model (P5T5), its Trainer and callbacks, the training job and id-row warm starts.

Builds on p5rec.data, p5rec.prompts and p5rec.eval (the job scores its run); never imports p5rec.serve.
"""
