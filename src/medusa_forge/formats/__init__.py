"""Files on disk that every kind of draft shares, read and written safely:

- `files`: JSON, safetensors and tensor pickles (sizes checked, no pickled code);
- `tree_file`: the decoding tree stored next to a draft (medusa_choices.json, its name since Medusa heads).

Medusa's layouts (ours = TGI's, the original .pt, vLLM's, full checkpoints) live with the kind:
`drafts/medusa_heads.py` (the module), `medusa_checks.py`, `medusa_layouts.py`, `medusa_format.py`, `medusa_vllm.py`,
`medusa_full_checkpoint.py`, `medusa_read.py`. This file imports nothing.
"""
