"""HF GPT-NeoX (safetensors + config.json) <-> megacpt checkpoints, through ONE explicit name map.

``name_map(cfg)`` lists every weight as (megacpt name, HF name); both directions iterate over it, so a
tensor cannot be converted one way and forgotten the other. The only value change is the vocab padding
of ``embed_in`` / ``embed_out``: megacpt keeps ``cfg.padded_vocab()`` rows (Megatron: a multiple of
``make_vocab_size_divisible_by * tp``), HF keeps ``cfg.vocab_size`` rows; padding rows are zeros and
are dropped on export, so HF -> megacpt -> HF is bit-exact for every tensor.

Reading is lazy (``safetensors.safe_open``): one tensor at a time is materialised, so converting a
6.9B model needs about one copy of the weights in RAM, not three. Pickle checkpoints
(``pytorch_model.bin``) are refused unless asked for, and then read with ``torch.load(weights_only=True)``.
Config fields (``rotary_pct``/``rope_parameters`` ...) are translated by ``megacpt.model.hf_config``.
"""
from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megacpt.checkpoint import (CheckpointManager, checkpoint_tensors, copy_tokenizer, is_checkpoint,
                                read_model_config, read_tensors, resolve_checkpoint, tokenizer_files)
from megacpt.config import ModelConfig, ParallelConfig, torch_dtype_name
from megacpt.errors import InputError, UserError
from megacpt.io import claim_output, commit_tmp, describe_interrupt, discard_tmp, pause_for_test, tmp_dir_for
from megacpt.model.hf_config import hf_config_from_model_config, model_config_from_hf

SUPPORTED_ARCHITECTURES = ("GPTNeoXForCausalLM",)
# buffers some HF GPT-NeoX checkpoints (transformers < 4.3x) carry: recomputed, never weights
_IGNORED_HF = re.compile(r"^gpt_neox\.(layers\.\d+\.attention\.(rotary_emb\.inv_freq|bias|masked_bias)"
                         r"|rotary_emb\.inv_freq)$")
_VOCAB_ROWS = ("embed_in.weight", "embed_out.weight")


def name_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(megacpt name, HF name) of every weight, in HF's order. megacpt = HF minus ``gpt_neox.``."""
    names = ["embed_in.weight"]
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        names += [p + "input_layernorm.weight", p + "input_layernorm.bias",
                  p + "post_attention_layernorm.weight", p + "post_attention_layernorm.bias",
                  p + "attention.query_key_value.weight"]
        names += [p + "attention.query_key_value.bias"] if cfg.attention_bias else []
        names += [p + "attention.dense.weight"] + ([p + "attention.dense.bias"] if cfg.attention_bias else [])
        names += [p + "mlp.dense_h_to_4h.weight", p + "mlp.dense_h_to_4h.bias",
                  p + "mlp.dense_4h_to_h.weight", p + "mlp.dense_4h_to_h.bias"]
    names += ["final_layer_norm.weight", "final_layer_norm.bias"]
    pairs = [(n, "gpt_neox." + n) for n in names]
    if not cfg.tie_word_embeddings:  # tied: HF stores only embed_in (from_pretrained re-ties embed_out)
        pairs.append(("embed_out.weight", "embed_out.weight"))
    return pairs


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of megacpt weight ``name`` in an HF dir (vocab rows = ``cfg.vocab_size``)."""
    H, F = cfg.hidden_size, cfg.intermediate_size
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    shapes = {
        "embed_in.weight": (cfg.vocab_size, H), "embed_out.weight": (cfg.vocab_size, H),
        "attention.query_key_value.weight": (3 * H, H), "attention.query_key_value.bias": (3 * H,),
        "attention.dense.weight": (H, H), "attention.dense.bias": (H,),
        "mlp.dense_h_to_4h.weight": (F, H), "mlp.dense_h_to_4h.bias": (F,),
        "mlp.dense_4h_to_h.weight": (H, F), "mlp.dense_4h_to_h.bias": (H,),
    }
    return shapes.get(leaf, (H,))  # LayerNorm weight/bias


def megacpt_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    shape = hf_shape(name, cfg)
    return (cfg.padded_vocab(), shape[1]) if name in _VOCAB_ROWS else shape


def pad_vocab(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    """[V, H] -> [rows, H] with zero rows appended (padding ids never win: consumers mask them)."""
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise UserError(f"{name}: {t.shape[0]} vocab rows do not fit the padded vocab of {rows}")
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def unpad_vocab(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if t.shape[0] < rows:
        raise UserError(f"{name}: has {t.shape[0]} rows, fewer than vocab_size {rows}")
    return t[:rows]


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "auto"):
        return None
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, torch_dtype_name(name))  # one dtype vocabulary (megacpt.config), aliases included


# ----------------------------------------------------------------------------------------------------
# reading an HF dir

def read_hf_config(hf_dir: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """config.json -> (raw dict, ModelConfig with vocab_size = padded_vocab_size = HF's vocab_size)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{hf_dir}: not an HF model dir (no config.json)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, None, f"not valid JSON ({e})") from None
    archs = d.get("architectures") or []
    if d.get("model_type") != "gpt_neox" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise InputError(path, None, f"unsupported architecture {', '.join(archs) or '?'} (model_type "
                                     f"{d.get('model_type')!r}); only GPT-NeoX ({', '.join(SUPPORTED_ARCHITECTURES)}, "
                                     "model_type 'gpt_neox') is supported")
    return d, model_config_from_hf(d, path=str(path))


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_header(f: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def _read_safetensor(f: Path, name: str, handle, start: int, header: dict) -> torch.Tensor:
    """One tensor of a safetensors file read with plain file I/O into a fresh tensor: unlike the mmap that
    ``safe_open.get_tensor`` copies from, the file's pages never enter this process's RSS, so loading a
    model peaks at the model plus one tensor instead of the model plus the whole file (2.2x -> ~1.1x the
    weights for ``load_model``; the pages stay in the kernel's page cache). Falls back to ``get_tensor`` for
    dtypes not listed here (fp8 ...)."""
    e = header.get(name)
    dtype = _ST_DTYPES.get(e.get("dtype")) if isinstance(e, dict) else None
    if dtype is None:
        return handle.get_tensor(name)
    t = torch.empty(e["shape"], dtype=dtype)
    a, b = e["data_offsets"]
    buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
    if b - a != t.numel() * t.element_size():
        raise InputError(f, None, f"tensor {name!r}: {b - a} bytes for shape {e['shape']} {e['dtype']}")
    if buf is not None:
        with open(f, "rb", buffering=0) as fh:
            fh.seek(start + a)
            view, got = memoryview(buf), 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise InputError(f, None, f"truncated: tensor {name!r} needs bytes {start + a}..{start + b}")
                got += n
    return t


class HFWeights:
    """Lazy access to the tensors of an HF dir: ``model.safetensors``, sharded with an index, or (only with
    ``allow_pickle``) ``pytorch_model*.bin`` read with ``torch.load(weights_only=True, mmap=True)``."""

    def __init__(self, hf_dir: str | os.PathLike, allow_pickle: bool = False):
        self.dir = Path(hf_dir)
        self.files: dict[str, Path] = {}  # HF tensor name -> file
        self._handles: dict[Path, object] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}  # safetensors file -> (data offset, header)
        st = sorted(self.dir.glob("*.safetensors"))
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self._read_index(index)
        elif st:
            for f in st:
                self._scan_safetensors(f)
        else:
            bins = sorted(self.dir.glob("pytorch_model*.bin")) + sorted(self.dir.glob("*.pt"))
            if not bins:
                raise UserError(f"{self.dir}: no weights (expected model.safetensors or "
                                "model.safetensors.index.json)")
            if not allow_pickle:
                raise InputError(bins[0], None, "is a pickle checkpoint; refusing to unpickle it. Convert it to "
                                 "safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)")
            for f in bins:
                try:
                    # mmap (lazy) works for torch.save's zip format only; legacy pickles load eagerly
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
                except Exception as e:  # weights_only rejects anything but tensors/containers
                    raise InputError(f, None, f"cannot be read with torch.load(weights_only=True) "
                                     f"(it holds more than tensors): {str(e).splitlines()[0][:200]}") from None
                self._handles[f] = sd
                for k in sd:
                    self.files[k] = f

    def _read_index(self, index: Path) -> None:
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(index, None, f"not a safetensors index (weight_map): {e}") from None
        for name, fname in wm.items():
            f = self.dir / fname
            if not f.is_file():
                raise InputError(index, None, f"tensor {name!r} is in {fname}, which does not exist")
            self.files[name] = f

    def _scan_safetensors(self, f: Path) -> None:
        for k in self._open(f).keys():
            self.files[k] = f

    def _open(self, f: Path):
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # corrupt header, truncated file
                raise InputError(f, None, f"not a readable safetensors file: {e}") from None
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        h = self._open_for(name)
        if isinstance(h, dict):
            return tuple(h[name].shape)
        return tuple(h.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        h = self._open_for(name)
        if isinstance(h, dict):
            return h[name]
        f = self.files[name]
        if f not in self._headers:  # validated by safe_open already (``_open``)
            self._headers[f] = _safetensors_header(f)
        return _read_safetensor(f, name, h, *self._headers[f])

    def _open_for(self, name: str):
        f = self.files[name]
        return self._handles[f] if f.suffix != ".safetensors" else self._open(f)

    def check(self, cfg: ModelConfig) -> None:
        """Every weight of ``cfg`` present with its shape, and nothing unexpected (names the tensor/file)."""
        pairs = name_map(cfg)
        expected = {hf for _, hf in pairs}
        missing = [hf for _, hf in pairs if hf not in self.files]
        if missing:
            where = ", ".join(sorted({f.name for f in self.files.values()})) or "no file"
            raise UserError(f"{self.dir}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                            f"(searched {where})")
        for mc, hf in pairs:
            want, got = hf_shape(mc, cfg), self.shape(hf)
            if got != want:
                raise InputError(self.files[hf], None,
                                 f"tensor {hf!r} has shape {list(got)}, config.json implies {list(want)}")
        extra = [n for n in self.files if n not in expected and not _IGNORED_HF.match(n)
                 and not (cfg.tie_word_embeddings and n == "embed_out.weight")]
        if extra:
            raise InputError(self.files[extra[0]], None,
                             f"unexpected tensor(s) {extra[:5]} for a GPTNeoXForCausalLM with this config.json")

    def close(self) -> None:
        self._handles.clear()
        self._headers.clear()


# ----------------------------------------------------------------------------------------------------
# HF -> megacpt

def hf_state_dict(hf_dir: str | os.PathLike, cfg: ModelConfig | None = None, allow_pickle: bool = False,
                  names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (megacpt name, tensor padded to ``cfg.padded_vocab()`` rows) one at a time, validated first."""
    if cfg is None:
        cfg = read_hf_config(hf_dir)[1]
    w = HFWeights(hf_dir, allow_pickle=allow_pickle)
    w.check(cfg)
    for mc, hf in name_map(cfg):
        if names is not None and mc not in names:
            continue
        t = w.get(hf)
        yield mc, (pad_vocab(t, cfg.padded_vocab(), mc) if mc in _VOCAB_ROWS else t)
    w.close()


def find_hf_tokenizer(hf_dir: str | os.PathLike) -> str | None:
    d = Path(hf_dir)
    files = {p.name for p in tokenizer_files(d)} if d.is_dir() else set()
    return str(d) if files & {"tokenizer.json", "tokenizer.model", "vocab.json"} else None


def hf_to_megacpt(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1,
                  tokenizer: str | os.PathLike | None = None, allow_pickle: bool = False) -> Path:
    """Convert an HF GPT-NeoX dir into a megacpt checkpoint root (``OUT/latest`` -> ``iter_0000000``).

    The checkpoint is layout-free (DCP reshards on load); ``tp``/``pp`` validate that the model splits
    that way and pad the vocab to a multiple of ``make_vocab_size_divisible_by * tp``.
    """
    raw, cfg = read_hf_config(hf_dir)
    m = cfg.make_vocab_size_divisible_by * tp
    cfg.padded_vocab_size = max(-(-cfg.vocab_size // m) * m, cfg.padded_vocab_size or 0)
    ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp).resolve(tp * pp).validate_model(cfg)
    out = Path(out)
    # a killed conversion's temp dir (.iter_0000000.*.tmp, hidden) is no checkpoint: the save below removes it
    if is_checkpoint(out) or (out.is_dir() and any(not p.name.endswith(".tmp") for p in out.glob("iter_*"))):
        raise UserError(f"--out {out}: already holds a checkpoint; choose a new directory")
    tokenizer = tokenizer if tokenizer is not None else find_hf_tokenizer(hf_dir)
    sd = dict(hf_state_dict(hf_dir, cfg, allow_pickle=allow_pickle))
    if cfg.tie_word_embeddings:  # the model's state dict (what training saves) names both
        sd["embed_out.weight"] = sd["embed_in.weight"]
    with CheckpointManager(out, keep_last=0) as mgr, describe_interrupt(
            lambda: f"; no checkpoint was written to {out}: re-run the same command"):
        mgr.save(0, sd, extra={"converted_from": {"hf_dir": str(Path(hf_dir).resolve()), "tp": tp, "pp": pp,
                                                  "architectures": raw.get("architectures")}},
                 model_config=cfg, tokenizer=tokenizer)
    return out


# ----------------------------------------------------------------------------------------------------
# megacpt -> HF

def megacpt_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
                  max_shard_bytes: int = 5 * 2**30) -> Path:
    """Export a megacpt checkpoint (root or iteration dir) as an HF GPT-NeoX dir, written atomically.

    Streams: one safetensors shard (<= ``max_shard_bytes``) of tensors is in memory at a time.
    """
    ck = resolve_checkpoint(ckpt)
    cfg = read_model_config(ck)
    want_dtype = parse_dtype(dtype)
    stored = checkpoint_tensors(ck)
    pairs = name_map(cfg)
    for mc, _ in pairs:
        if mc not in stored:
            raise UserError(f"checkpoint {ck}: missing tensor {mc!r}")
        if stored[mc][0] != megacpt_shape(mc, cfg):
            raise UserError(f"checkpoint {ck}: tensor {mc!r} has shape {list(stored[mc][0])}, "
                            f"{ck / 'model_config.json'} implies {list(megacpt_shape(mc, cfg))}")
    out_dtype = want_dtype or stored[pairs[0][0]][1]

    # group into shards by their exported size
    shards: list[list[tuple[str, str]]] = [[]]
    size = 0
    for mc, hf in pairs:
        n = torch.Size(hf_shape(mc, cfg)).numel() * out_dtype.itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((mc, hf))
        size += n

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim_output(out), describe_interrupt(lambda: f"; nothing was written to {out}: re-run the same command"):
        _write_hf_dir(ck, cfg, out, shards, out_dtype)
    return out


def _write_hf_dir(ck: Path, cfg: ModelConfig, out: Path, shards: list[list[tuple[str, str]]],
                  out_dtype: torch.dtype) -> None:
    """Write the HF dir into a temp dir beside ``out`` and rename it into place."""
    tmp = tmp_dir_for(out)
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = read_tensors(ck, [mc for mc, _ in shard])
            block = {}
            for mc, hf in shard:
                t = tensors.pop(mc)
                t = unpad_vocab(t, cfg.vocab_size, mc) if mc in _VOCAB_ROWS else t
                block[hf] = t.to(out_dtype).contiguous()
                weight_map[hf] = fname
                total += block[hf].numel() * out_dtype.itemsize
            save_file(block, str(tmp / fname), metadata={"format": "pt"})
            del block, tensors
            pause_for_test("convert-write")
        if len(shards) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        hf_cfg = hf_config_from_model_config(cfg)
        hf_cfg["vocab_size"] = cfg.vocab_size  # HF rows: the unpadded vocab (what the HF dir came with)
        hf_cfg["dtype"] = hf_cfg["torch_dtype"] = str(out_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if (ck / "tokenizer").is_dir():
            copy_tokenizer(ck / "tokenizer", tmp)
        if out.exists():
            out.rmdir()
        commit_tmp(tmp, out)
    except BaseException:
        discard_tmp(tmp)
        raise
