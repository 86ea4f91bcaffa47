"""Train a draft of any kind (Medusa heads by default) on a frozen base model with the Hugging Face Trainer
(torchrun/DeepSpeed/FSDP ready)."""
