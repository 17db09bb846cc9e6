"""Quantizing a model larger than memory: a transformers `save_pretrained` folder read block by block from its
safetensors shards.

    lb.quantize("path/to/model_dir", "w2-quip", calibration, tokenizer=...)

`open_folder` builds the model's skeleton with its parameters on the meta device (buffers such as rotary
frequencies are made for real: they are computed, not stored), then loads what lies outside the repeated blocks
(embeddings, final norm, head) once. `StreamedModel.loaded(prefix)` loads one block's tensors from the shards that
hold them (the index json says which; `safe_open` reads only those tensors) and, on leaving, puts the block back on
the meta device and hands the freed pages to the OS. lb.quantize opens that context around each block it
calibrates and quantizes (calibrate.calibrate_blocks(loader=...)), so peak memory is one block, the boundary
activations (twice: the float model's own hidden states are carried beside the calibrated ones for the head) and the
resident embeddings and head.

Parameters keep their identity: a block's parameter gets its data (torch.utils.swap_tensors) and gives it back, so tied
weights, hooks and `lin.weight is emb.weight` checks see the same objects as in a model loaded in memory. The
checkpoint is byte-identical to lb.quantize(AutoModel*.from_pretrained(folder), ...) for the same data and seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator

import torch

from .errors import LowbitError

log = logging.getLogger("lowbit_compile")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device, buffers on the CPU (accelerate's
    init_empty_weights(include_buffers=False), in a few lines: a parameter is moved as it is registered, so the
    float tensor its constructor allocated is never written and freed at once)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def weight_map(folder: str) -> dict[str, str]:
    """{tensor name: shard file} of a save_pretrained folder (sharded: its index json; else the one file)."""
    from safetensors import safe_open

    index = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.isfile(single):
        raise LowbitError(f"{folder} holds no safetensors weights ({INDEX_FILE} or {SINGLE_FILE}); streaming reads "
                          f"those: save the model with model.save_pretrained(folder) (safetensors is the default)")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def _swap(t: torch.Tensor, data: torch.Tensor) -> None:
    """Give the parameter or buffer `t` the contents of `data` in place, across devices (meta <-> cpu), keeping the
    Python object: `t.data = ...` refuses a device change, and replacing the object would untie tied weights."""
    if isinstance(t, torch.nn.Parameter):
        data = torch.nn.Parameter(data, requires_grad=t.requires_grad)
    torch.utils.swap_tensors(t, data)


class StreamedModel:
    """A model whose repeated blocks stay on disk until asked for (see the module docstring)."""

    def __init__(self, folder: str, model: torch.nn.Module, files: dict[str, str], causal: bool):
        from .calibrate import find_blocks

        self.folder, self.model, self.files, self.causal = folder, model, files, causal
        self.blocks_name, blocks = find_blocks(model)
        self.blocks = {f"{self.blocks_name}.{i}" if self.blocks_name else str(i): b for i, b in enumerate(blocks)}
        # every name a parameter or persistent buffer goes by (a tied head's weight is also the embedding's)
        self._names: dict[int, list[str]] = {}
        self._by_id: dict[int, torch.Tensor] = {}
        for mod_name, mod in model.named_modules(remove_duplicate=False):
            for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                if t is None or name in mod._non_persistent_buffers_set:
                    continue
                self._names.setdefault(id(t), []).append(f"{mod_name}.{name}" if mod_name else name)
                self._by_id[id(t)] = t
        in_blocks = {id(t) for b in blocks for t in list(b.parameters()) + list(b.buffers())}
        self._load([i for i in self._names if i not in in_blocks and self._by_id[i].device.type == "meta"])

    # -------------------------------------------------------------------------------------------- loading

    def _source_name(self, key) -> str:
        names = self._names[key]
        for n in names:
            if n in self.files:
                return n
        raise LowbitError(f"{self.folder}: no tensor {names[0]!r} in the safetensors files (it holds e.g. "
                          f"{sorted(self.files)[:3]}); the folder does not match its config.json, or was saved by "
                          f"another model class: load it with from_pretrained and pass the model instead")

    def _load(self, keys: list[int]) -> None:
        """Give the tensors `keys` (ids of parameters/buffers) their data from the shards, one file open at a time."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[int, str]]] = {}
        for key in keys:
            name = self._source_name(key)
            by_file.setdefault(self.files[name], []).append((key, name))
        for path in sorted(by_file):
            with safe_open(path, "pt") as f:
                for key, name in by_file[path]:
                    t = self._by_id[key]
                    data = f.get_tensor(name)
                    if tuple(data.shape) != tuple(t.shape):
                        raise LowbitError(f"{path}: tensor {name} has shape {tuple(data.shape)}, the model built "
                                          f"from config.json expects {tuple(t.shape)}")
                    _swap(t, data.to(t.dtype))

    @contextlib.contextmanager
    def loaded(self, prefix: str) -> Iterator[None]:
        """The block `prefix` (e.g. "model.layers.3") with its weights for the duration; any other unit (the linears
        outside the blocks, which stay loaded) as it is."""
        from .memory import release_freed_memory

        block = self.blocks.get(prefix)
        if block is None:
            yield
            return
        tensors = [t for t in list(block.parameters()) + list(block.buffers()) if t.device.type == "meta"]
        try:
            self._load([id(t) for t in tensors if id(t) in self._names])
            yield
        finally:
            for t in tensors:
                _swap(t, torch.empty(t.shape, dtype=t.dtype, device="meta"))
            release_freed_memory()

    # -------------------------------------------------------------------------------------------- identity

    def fingerprint(self) -> str:
        """sha256 over the weight files' names and bytes, in name order: what a resumed run must share (the
        in-memory path hashes the state dict; reading every byte once here costs a few seconds per GB)."""
        h = hashlib.sha256()
        for path in sorted(set(self.files.values())):
            h.update(os.path.basename(path).encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
        return h.hexdigest()

    def tokenizer(self):
        """The folder's tokenizer (for text calibration), as hf.load_pretrained sets it up."""
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise LowbitError(f"cannot load a tokenizer from {self.folder} ({str(e).splitlines()[0]}); pass "
                              f"tokenizer=..., or calibration batches of token ids") from e
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        return tok


def source_of(folder) -> dict:
    """What a checkpoint's meta["source"] says of a folder (as hf.Loaded.source: its path and Auto class)."""
    folder = os.path.abspath(os.fspath(folder))
    try:
        with open(os.path.join(folder, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError) as e:
        raise LowbitError(f"{folder} is not a transformers model folder (no readable config.json: {e})") from e
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    return {"path": folder, "class": "AutoModelForCausalLM" if causal else "AutoModel"}


def open_folder(folder, dtype: torch.dtype | None = None) -> StreamedModel:
    """A save_pretrained folder as a StreamedModel: the class hf.load_pretrained would pick (AutoModelForCausalLM for
    a *ForCausalLM architecture, else AutoModel), in `dtype` (default: the config's, as from_pretrained loads it)."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as e:
        raise LowbitError("quantizing a model folder needs transformers: pip install 'lowbit-compile[hf]'") from e
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise LowbitError(f"{folder} is not a transformers model folder (no config.json); pass a folder written by "
                          f"model.save_pretrained(...) or the model itself")
    files = weight_map(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with params_on_meta():
        model = (AutoModelForCausalLM if causal else AutoModel).from_config(config, dtype=dtype)
    return StreamedModel(folder, model.eval(), files, causal)
