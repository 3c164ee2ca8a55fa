"""Checkpoint loading: Hugging Face folders (config.json + safetensors) and GGUF files.

Both formats are first brought to Hugging Face tensor names and layouts as numpy arrays
(GGUF: dequantized with the `gguf` package, llama.cpp's q/k row permutation undone), then
one converter renames them into our flax params and checks every name and shape.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import model as model_lib
from specjax.models.config import ModelConfig, from_hf_config

# ----------------------------------------------------------------------------------------
# Hugging Face names -> flax params.

_LLAMA_RULES = [  # (regex on the HF name without the "model." prefix, flax path, transpose)
    (r"embed_tokens\.weight", "embed_tokens/embedding", False),
    (r"norm\.weight", "norm/scale", False),
    (r"lm_head\.weight", "lm_head/kernel", True),
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers_\1/self_attn/\2_proj/kernel", True),
    (r"layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", r"layers_\1/self_attn/\2_proj/bias", False),
    (r"layers\.(\d+)\.self_attn\.([qk])_norm\.weight", r"layers_\1/self_attn/\2_norm/scale", False),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers_\1/mlp/\2_proj/kernel", True),
    (r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"layers_\1/\2/scale",
     False),
]
# Mixture-of-experts layers (Qwen3-MoE: mlp.gate / mlp.experts.M.*_proj; Mixtral:
# block_sparse_moe.gate / experts.M.w1 (gate), w3 (up), w2 (down)): expert M's weight is
# row M of a stacked [E, ...] param.
_MOE_RULES = [
    (r"layers\.(\d+)\.(?:mlp|block_sparse_moe)\.gate\.weight", r"layers_\1/mlp/router", True),
    (r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", r"layers_\1/mlp/\3", True),
    (r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"layers_\1/mlp/gate", True),
    (r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"layers_\1/mlp/up", True),
    (r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"layers_\1/mlp/down", True),
]
_GPT2_RULES = [  # GPT-2 Conv1D weights are already [in, out].
    (r"wte\.weight", "wte/embedding", False),
    (r"wpe\.weight", "wpe/embedding", False),
    (r"ln_f\.weight", "ln_f/scale", False),
    (r"ln_f\.bias", "ln_f/bias", False),
    (r"h\.(\d+)\.(ln_1|ln_2)\.weight", r"h_\1/\2/scale", False),
    (r"h\.(\d+)\.(ln_1|ln_2)\.bias", r"h_\1/\2/bias", False),
    (r"h\.(\d+)\.attn\.(c_attn|c_proj)\.(weight|bias)", r"h_\1/\2/\3", False),
    (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"h_\1/c_fc/\2", False),
    (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"h_\1/mlp_c_proj/\2", False),
]
# Mamba-2 (backbone.embeddings / layers.N.norm / layers.N.mixer / norm_f) and Bamba
# (mamba / self_attn / feed_forward, input_ / pre_ff_layernorm, final_layernorm) onto one
# layout (`models.hybrid`). conv1d.weight [C, 1, K] transposes to our [K, 1, C].
_MIXER = r"(?:mixer|mamba)"
_HYBRID_RULES = [
    (r"embed(?:dings|_tokens)\.weight", "embed_tokens/embedding", False),
    (r"(?:norm_f|final_layernorm)\.weight", "norm/scale", False),
    (r"lm_head\.weight", "lm_head/kernel", True),
    (r"layers\.(\d+)\.(?:norm|input_layernorm)\.weight", r"layers_\1/input_layernorm/scale", False),
    (r"layers\.(\d+)\.pre_ff_layernorm\.weight", r"layers_\1/pre_ff_layernorm/scale", False),
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers_\1/self_attn/\2_proj/kernel",
     True),
    (r"layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight",
     r"layers_\1/feed_forward/\2_proj/kernel", True),
    (rf"layers\.(\d+)\.{_MIXER}\.(in_proj|out_proj)\.weight", r"layers_\1/mamba/\2/kernel", True),
    (rf"layers\.(\d+)\.{_MIXER}\.(in_proj|out_proj)\.bias", r"layers_\1/mamba/\2/bias", False),
    (rf"layers\.(\d+)\.{_MIXER}\.conv1d\.weight", r"layers_\1/mamba/conv_kernel", True),
    (rf"layers\.(\d+)\.{_MIXER}\.conv1d\.bias", r"layers_\1/mamba/conv_bias", False),
    (rf"layers\.(\d+)\.{_MIXER}\.norm\.weight", r"layers_\1/mamba/norm_scale", False),
    (rf"layers\.(\d+)\.{_MIXER}\.(A_log|D|dt_bias)", r"layers_\1/mamba/\2", False),
]
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attn\.(masked_)?bias|lm_head\.weight)$")


def _flax_name(cfg: ModelConfig, hf_name: str) -> tuple[str, bool, int | None] | None:
  """(flax path, transpose, expert row or None), or None for a tensor we skip."""
  name = re.sub(r"^(model|transformer|backbone)\.", "", hf_name)
  rules = {"gpt2": _GPT2_RULES, "hybrid": _HYBRID_RULES}.get(cfg.arch) or _LLAMA_RULES + (
      _MOE_RULES if cfg.num_experts else [])
  for pattern, target, transpose in rules:
    m = re.fullmatch(pattern, name)
    if m:
      path = re.sub(pattern, target, name)
      if cfg.arch == "gpt2":
        path = path.replace("/weight", "/kernel")
      if cfg.tie_embeddings and path == "lm_head/kernel":
        return None
      expert = int(m.group(2)) if "experts" in pattern else None
      return path, transpose, expert
  if _IGNORED.search(name):
    return None
  raise ValueError(f"Unexpected tensor {hf_name!r} in a {cfg.model_type} checkpoint.")


def params_from_hf(cfg: ModelConfig, tensors: Iterable[tuple[str, Any]], dtype=jnp.float32,
                   plan=None) -> Any:
  """Builds the flax params pytree from (HF name, array) pairs; checks names and shapes.

  An array may be lazy (anything with `.shape` and numpy-style slicing, e.g. a safetensors
  slice). With a `sharding.Plan`, each weight goes straight onto its shards: every local
  device reads only its own slice (`jax.make_array_from_callback`), so a target larger
  than one host's memory never materialises whole; without one, on the default device.
  """
  want = jax.eval_shape(lambda: model_lib.init_params(cfg, jax.random.key(0), dtype))
  shardings = None if plan is None else plan.param_shardings(want)
  flat = lambda tree: {"/".join(k.key for k in path): leaf
                       for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  flat_want = flat(want)
  flat_shardings = None if shardings is None else flat(shardings)
  got, experts = {}, {}
  for hf_name, array in tensors:
    mapped = _flax_name(cfg, hf_name)
    if mapped is None:
      continue
    path, transpose, expert = mapped
    shape = tuple(array.shape)[::-1] if transpose else tuple(array.shape)
    if path not in flat_want:
      raise ValueError(f"Tensor {hf_name!r} maps to {path!r}, which the model does not have.")
    if expert is not None:  # one row of a stacked expert param, gathered below
      if shape != flat_want[path].shape[1:] or not 0 <= expert < cfg.num_experts:
        raise ValueError(f"Tensor {hf_name!r} (expert {expert}, shape {shape}) does not fit "
                         f"{path!r} of shape {flat_want[path].shape}.")
      rows = experts.setdefault(path, {})
      rows[expert] = np.asarray(array, np.float32).T
      if len(rows) == cfg.num_experts:  # placed at once: one layer's experts held at a time
        got[path] = _place(np.stack([rows.pop(i) for i in range(cfg.num_experts)]), False,
                           dtype, None if flat_shardings is None else flat_shardings[path])
      continue
    if shape != flat_want[path].shape:
      raise ValueError(f"Tensor {hf_name!r} has shape {shape}; the config implies "
                       f"{flat_want[path].shape}.")
    got[path] = _place(array, transpose, dtype,
                       None if flat_shardings is None else flat_shardings[path])
  for path, rows in experts.items():
    if rows:
      raise ValueError(f"Checkpoint has {len(rows)} of {cfg.num_experts} experts for {path!r}.")
  missing = sorted(set(flat_want) - set(got))
  if missing:
    raise ValueError(f"Checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}.")
  params: dict = {}
  for path, array in got.items():
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = array
  return params


def _place(array, transpose: bool, dtype, sharding) -> jax.Array:
  """One weight as a jax.Array in our layout (transposed when HF stores it [out, in]),
  read whole onto the default device, or slice by slice onto `sharding`'s devices."""
  def read(index=None):
    # Our index (i, j) of a transposed weight is the stored tensor's (j, i).
    src = array if index is None else array[tuple(index[::-1] if transpose else index)]
    src = np.asarray(src, np.float32)
    return src.T if transpose else src
  if sharding is None:
    return jnp.asarray(read(), dtype)
  shape = tuple(array.shape)[::-1] if transpose else tuple(array.shape)
  return jax.make_array_from_callback(shape, sharding,
                                      lambda index: read(index).astype(dtype))


# ----------------------------------------------------------------------------------------
# Hugging Face folders.


def _safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(path, s) for s in shards]
  single = os.path.join(path, "model.safetensors")
  if os.path.exists(single):
    return [single]
  raise FileNotFoundError(f"No model.safetensors or model.safetensors.index.json in {path}.")


def read_hf_config(path: str) -> ModelConfig:
  """The ModelConfig of a Hugging Face folder's config.json; errors name the file and the
  missing or bad key."""
  config_path = os.path.join(path, "config.json")
  try:
    with open(config_path, encoding="utf-8") as f:
      hf = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_path} is not valid JSON (line {e.lineno}: {e.msg}).") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{config_path} holds a JSON {type(hf).__name__}, not an object.")
  try:
    return from_hf_config(hf)
  except KeyError as e:
    raise ValueError(f"{config_path} lacks the key {e.args[0]!r}, which a "
                     f"model_type={hf.get('model_type')!r} config needs.") from None
  except (TypeError, ValueError) as e:
    raise ValueError(f"{config_path}: {e}") from None


def load_hf_dir(path: str, dtype=jnp.float32, plan=None) -> tuple[ModelConfig, Any]:
  """Reads a Hugging Face checkpoint folder (config.json + safetensors, sharded or not).
  Tensors are read lazily: with a `plan`, each device reads only its slice."""
  from safetensors.numpy import safe_open  # pylint: disable=g-import-not-at-top

  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"No config.json in {path}.")
  cfg = read_hf_config(path)

  def tensors():
    for file in _safetensors_files(path):
      with safe_open(file, framework="numpy") as st:
        for name in st.keys():
          yield name, _Slice(st.get_slice(name))

  return cfg, params_from_hf(cfg, tensors(), dtype, plan)


class _Slice:
  """A safetensors tensor read on demand: `.shape`, and numpy slicing that reads only the
  requested part of the file."""

  def __init__(self, handle):
    self._handle = handle
    self.shape = tuple(handle.get_shape())

  def __getitem__(self, index):
    return self._handle[index]

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self._handle[tuple(slice(None) for _ in self.shape)], dtype)


# ----------------------------------------------------------------------------------------
# GGUF files.

_GGUF_NAMES = [  # llama.cpp tensor names -> Hugging Face names (Llama family)
    (r"token_embd\.(weight)", r"model.embed_tokens.\1"),
    (r"output_norm\.(weight)", r"model.norm.\1"),
    (r"output\.(weight)", r"lm_head.\1"),
    (r"blk\.(\d+)\.attn_norm\.(weight)", r"model.layers.\1.input_layernorm.\2"),
    (r"blk\.(\d+)\.ffn_norm\.(weight)", r"model.layers.\1.post_attention_layernorm.\2"),
    (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", r"model.layers.\1.self_attn.\2_proj.\3"),
    (r"blk\.(\d+)\.attn_output\.(weight)", r"model.layers.\1.self_attn.o_proj.\2"),
    (r"blk\.(\d+)\.attn_([qk])_norm\.(weight)", r"model.layers.\1.self_attn.\2_norm.\3"),
    (r"blk\.(\d+)\.ffn_(gate|up|down)\.(weight)", r"model.layers.\1.mlp.\2_proj.\3"),
]
_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def _gguf_field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def gguf_hf_config(reader) -> dict:
  """The Hugging Face config.json equivalent of a GGUF file's metadata."""
  arch = _gguf_field(reader, "general.architecture")
  if arch not in _GGUF_ARCHS:
    raise ValueError(f"Unsupported GGUF architecture {arch!r}; supported: "
                     f"{sorted(_GGUF_ARCHS)}.")
  g = lambda key, default=None: _gguf_field(reader, f"{arch}.{key}", default)
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ValueError("GGUF files with a rope_freqs tensor (Llama-3.1 RoPE scaling) are not "
                     "supported yet; load the Hugging Face folder instead.")
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
  return {
      "model_type": _GGUF_ARCHS[arch],
      "vocab_size": int(vocab),
      "hidden_size": hidden,
      "intermediate_size": int(g("feed_forward_length")),
      "num_hidden_layers": int(g("block_count")),
      "num_attention_heads": heads,
      "num_key_value_heads": int(g("attention.head_count_kv", heads)),
      "head_dim": int(g("attention.key_length", hidden // heads)),
      "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
      "rope_theta": float(g("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(g("context_length", 4096)),
      "tie_word_embeddings": "output.weight" not in names,
      "sliding_window": g("attention.sliding_window"),
  }


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE layout)."""
  d = w.shape[0] // n_head // 2
  return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_hf_tensors(reader, hf: Mapping[str, Any]):
  """Yields (Hugging Face name, float32 array) for every tensor of a GGUF file."""
  from gguf import quants  # pylint: disable=g-import-not-at-top

  permuted = hf["model_type"] in ("llama", "mistral")
  for t in reader.tensors:
    for pattern, target in _GGUF_NAMES:
      if re.fullmatch(pattern, t.name):
        name = re.sub(pattern, target, t.name)
        break
    else:
      raise ValueError(f"Unexpected tensor {t.name!r} in GGUF file.")
    w = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32)
    if permuted and name.endswith("q_proj.weight"):
      w = _unpermute(w, hf["num_attention_heads"])
    elif permuted and name.endswith("k_proj.weight"):
      w = _unpermute(w, hf["num_key_value_heads"])
    yield name, w


def open_gguf(path: str):
  """A `gguf.GGUFReader` on `path`; a file that is not valid GGUF gives a ValueError naming it
  (the gguf library's own message, e.g. a bogus version number, does not)."""
  import gguf  # pylint: disable=g-import-not-at-top
  try:
    return gguf.GGUFReader(path)
  except (ValueError, KeyError, IndexError, OSError) as e:
    raise ValueError(f"{path} is not a readable GGUF file (corrupt or truncated?): {e}") from e


def load_gguf(path: str, dtype=jnp.float32, plan=None):
  """Reads a GGUF file: (ModelConfig, params, the GGUFReader for the tokenizer). Quantized
  blocks dequantize a tensor at a time (one tensor on the host, not the model); with a
  `plan`, each device then takes its slice."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  reader = open_gguf(path)
  hf = gguf_hf_config(reader)
  cfg = from_hf_config(hf)
  return cfg, params_from_hf(cfg, gguf_hf_tensors(reader, hf), dtype, plan), reader
