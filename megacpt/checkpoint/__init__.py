"""megacpt checkpoints on disk: `torch.distributed.checkpoint` (DCP) save/load with resharding, atomically.

Layout of a checkpoint root::

    ROOT/latest                      text: "iter_0000100" (updated atomically, only after a save is complete)
    ROOT/iter_0000100/               one complete checkpoint
        .metadata, __*_*.distcp      DCP tensors: "model.<fqn>", "optim.<flat key>" (global, layout-free names)
        objects.json                 every non-tensor leaf of the model/optimizer state (lr, betas, ...)
        extra.json                   ``extra`` (rank 0's): scheduler, data position, ... JSON + tensors
        rank_extra/rank_00003.json   ``rank_extra`` of each rank (RNG states): one file per rank
        model_config.json            ModelConfig, so `megacpt.convert.load_model(ROOT)` is self-contained
        tokenizer/                   copy of the tokenizer dir/file, when given
        complete.json                written last: iteration, optimizer (saved|empty|none), world size, time,
                                     and the manifest: {"checksum": "crc32", "files": {path: {size, crc32}}}
    ROOT/iter_0000200.tmp/           a save in progress (or killed): never read, removed by the next save

Why this shape:
- Names are *global and layout-independent*: DTensor (TP) and FSDP2 shards are saved by their global
  shape, and a pipeline stage renames ``layers.{local}.`` to ``layers.{local + layer_offset}.``. So a
  checkpoint saved at tp2*pp2 loads at tp1*pp1 (or dp4, ...) and back: DCP reshards on load.
- Nothing is unpickled when loading. DCP would ``torch.load(weights_only=False)`` any non-tensor value
  it stored, so non-tensors never go to DCP: they are split out into JSON (`objects.json`), and
  ``extra``/``rank_extra`` are JSON with tensors encoded as raw bytes (``{"__tensor__": ...}``).
- Atomic: everything is written into ``iter_X.tmp``; ``complete.json`` is written last, the dir is
  renamed to ``iter_X`` and only then ``latest`` is replaced (temp + rename). A save killed at any
  point leaves ``latest`` and all complete checkpoints untouched.
- Verifiable: every file is counted and CRC-32'd as it is written (``checksum.py``: DCP writes through a
  hashing filesystem), each rank records its own files and rank 0 puts them all in ``complete.json``'s
  manifest. Every loader checks sizes and checksums before reading a tensor (``integrity.py``); a mismatch
  is one line naming the checkpoint, the file, expected and found. ``megacpt checkpoint verify`` does the
  same without loading (``cli.py``). A checkpoint without a manifest (older megacpt) loads with a note.

Use (the same calls on every rank, single process works without a process group)::

    mgr = CheckpointManager(root, keep_last=2, async_save=False)
    mgr.save(step, model, optimizer, extra={"scheduler": sched.state_dict(), "consumed_samples": n},
             rank_extra={"torch_rng": torch.get_rng_state()}, model_config=cfg, tokenizer=tok_dir,
             layer_offset=first_layer_of_this_stage)
    mgr.close()                                     # waits for a pending async save
    ck = load_checkpoint(root, model, optimizer, layer_offset=...)   # root or iter dir
    ck.iteration, ck.extra, ck.rank_extra           # rank_extra is None if this rank did not exist

``model`` may be an ``nn.Module`` (plain, DTensor-TP, FSDP2, or a pipeline stage), a list of pipeline
chunks (interleaved 1F1B) or a ``megacpt.parallel.pipeline.Pipeline`` (its ``.parts``); ``optimizer`` one
optimizer over all of them, or one per chunk. megacpt's pipeline stages keep the full model's names
(``split_stage``), so ``layer_offset`` stays 0; a stage numbering its layers from 0 passes its first global
layer index (a list, one per chunk). Optimizer state is found by parameter name (torch's
``get_optimizer_state_dict``), so it reshards like the weights; the optimizer is initialised (zero state)
before loading. ``load_checkpoint(..., optimizer=None)`` loads weights only (e.g. ``init_from``).
An optimizer that has not stepped yet is recorded as "empty" (torch would otherwise initialise it with a
zero-gradient step, changing the run); a checkpoint saved without optimizer refuses to load one.
``ROOT`` must be on a filesystem every rank can see (as DCP requires); rank 0 writes the JSON files.
A model trained at one vocab padding must be rebuilt from the checkpoint's ``model_config.json``
(``read_model_config``), which records ``padded_vocab_size``.

Modules: ``files`` (names, ``complete.json``/``model_config.json``, ``latest``, shipped tokenizer),
``state`` (DCP training state: ``CheckpointManager``, ``load_checkpoint``), ``weights`` (consolidated
weights: full tensors read in one process), ``names`` (global layout-free names), ``encoding`` (JSON with
tensors), ``unpickler`` (the restricted unpickler of DCP's ``.metadata``), ``distributed`` (collective
helpers), ``checksum`` (sizes and CRC-32s recorded while writing), ``integrity`` (checking them: ``verify``,
``previous_checkpoint``), ``cli`` (``megacpt checkpoint verify``). Used by ``train`` (save/resume),
``convert`` (HF <-> checkpoint, ``load_model``) and, through ``convert``, by ``score``/``eval``/``selection``.
"""
from megacpt.checkpoint.checksum import DamagedCheckpoint
from megacpt.checkpoint.encoding import from_jsonable, to_jsonable
from megacpt.checkpoint.files import (COMPLETE, FORMAT, LATEST, MODEL_CONFIG, TOKENIZER_FILES, copy_tokenizer,
                                      is_checkpoint, iteration_dirname, latest_checkpoint, list_checkpoints,
                                      read_model_config, resolve_checkpoint, tokenizer_files)
from megacpt.checkpoint.integrity import Verified, previous_checkpoint, verify_checkpoint
from megacpt.checkpoint.names import shift_layers
from megacpt.checkpoint.state import CheckpointManager, LoadedCheckpoint, load_checkpoint, save_checkpoint
from megacpt.checkpoint.weights import checkpoint_tensors, read_tensors

__all__ = ["CheckpointManager", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "checkpoint_tensors",
           "read_tensors", "read_model_config", "resolve_checkpoint", "latest_checkpoint", "list_checkpoints",
           "is_checkpoint", "iteration_dirname", "tokenizer_files", "copy_tokenizer", "shift_layers",
           "to_jsonable", "from_jsonable", "FORMAT", "LATEST", "COMPLETE", "MODEL_CONFIG", "TOKENIZER_FILES",
           "DamagedCheckpoint", "Verified", "verify_checkpoint", "previous_checkpoint"]
