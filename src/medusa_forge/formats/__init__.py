"""Files on disk that every kind of draft shares, read and written safely:

- `files`: JSON, safetensors and tensor pickles (sizes checked, no pickled code);
- `tree_file`: the decoding tree stored next to a draft (medusa_choices.json, its name since Medusa heads);
- `checks`: "are these tensors valid Medusa heads", here (not in drafts/) because `heads.py`, the Medusa module
  that the foundations export, loads with it; it names no layout.

Medusa's layouts (ours = TGI's, the original .pt, vLLM's, full checkpoints) live with the kind:
`drafts/medusa_layouts.py`, `medusa_format.py`, `medusa_vllm.py`, `medusa_full_checkpoint.py`, `medusa_read.py`.
This file imports nothing: `heads.py` imports `checks` and `files`.
"""
