"""Train one T5 on every recommendation task, then score each task family on the test split.

    python train.py                      # the main job: embedded Musical Instruments data, CPU, < 15 min
    python train.py --preset compact --max_steps 20000 --bf16 true   # bigger, e.g. on a GPU
    python train.py configs/beauty.yaml  # everything from one config file
    python train.py --report_to tensorboard                          # TensorBoard: loss and each family's metric
    accelerate launch --config_file configs/accelerate/cpu.yaml train.py ...   # 2 CPU processes (also multi-gpu,
                                                                     # deepspeed-zero2, fsdp configs there)

All flags: `python train.py --help` (model, data and Seq2SeqTrainingArguments groups).
"""

import sys

from p5rec.train.training import main

if __name__ == "__main__":
    sys.exit(main())
