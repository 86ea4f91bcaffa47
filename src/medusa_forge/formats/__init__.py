"""Medusa heads on disk, one module per layout (reader and writer together):

- `medusa`: ours = TGI / TensorRT-LLM (config.json + medusa_lm_head.safetensors), the original trainer's
  medusa_lm_head.pt, and "version 2" heads (no projections) materialised from the base lm_head;
- `vllm`: vLLM's names and config keys;
- `full_checkpoint`: full model checkpoints whose head weights carry a `medusa_head.` prefix;
- `tree_file`: the decoding tree stored next to the heads (medusa_choices.json);
- `checks`: "are these tensors valid heads", shared by every reader and by `MedusaHeads.load`;
- `files`: safe reading and writing of JSON, safetensors and tensor pickles;
- `layouts`: the layout names and what reading one gives (`LoadedHeads`);
- `read`: layout detection and `read_heads`, which dispatches to the readers.

Layouts: README, "Export, import and push". This file imports nothing: `heads.py` imports `checks` and `files`, and
the layout modules import `heads.py`, so importing them here would make a cycle.
"""
