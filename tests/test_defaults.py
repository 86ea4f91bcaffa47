"""The embedded model cache: a valid conversion is reused, a partial, corrupt or stale one is not."""

import json
import shutil

from medusa_forge.defaults import _MARKER, _cache_is_valid, _source_stamp, resolve_model, smollm2_gguf_path


def test_cache_validation(tmp_path, smollm2_dir):
    stamp = _source_stamp(smollm2_gguf_path())
    assert _cache_is_valid(smollm2_dir, stamp)
    assert resolve_model("smollm2") == str(smollm2_dir)
    assert resolve_model("some/hub-id") == "some/hub-id"

    copy = tmp_path / "copy"
    shutil.copytree(smollm2_dir, copy)
    assert _cache_is_valid(copy, stamp)
    assert not _cache_is_valid(copy, {**stamp, "size": stamp["size"] + 1})  # the package was upgraded

    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:1000])  # torn write
    assert not _cache_is_valid(copy, stamp)

    partial = tmp_path / "partial"
    shutil.copytree(smollm2_dir, partial, ignore=shutil.ignore_patterns(_MARKER))  # conversion never finished
    assert not _cache_is_valid(partial, stamp)
    assert json.loads((smollm2_dir / _MARKER).read_text()) == stamp

    older = tmp_path / "older"  # converted by a version whose tokenizer files transformers 4.x could not read
    shutil.copytree(smollm2_dir, older)
    (older / _MARKER).write_text(json.dumps({k: v for k, v in stamp.items() if k != "format"}))
    assert _cache_is_valid(smollm2_dir, stamp) and not _cache_is_valid(older, stamp)
