"""Train Medusa heads on a frozen base model with the Hugging Face Trainer (torchrun/DeepSpeed/FSDP ready)."""
