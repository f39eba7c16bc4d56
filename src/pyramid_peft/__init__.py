"""pyramid-peft: Expert Pyramid Tuning and its multi-task MoE-LoRA peers on stock PEFT."""
