"""Training checkpoints in HDF5: everything an exact resume needs, nothing pickled.

One file holds:

    attrs     format, format_version, minisft_version, dtype (the model's compute dtype),
              array_dtype (the stored arrays'), complete (written last)
    config    JSON of the model config (family.config_to_dict)
    model     attrs: rng (JSON of the dropout RNG's bit_generator.state), frozen (JSON list of names)
    params/   one dataset per parameter, by HF name, in the dtype the model holds them
    adam/     attrs: step, lr, beta1, beta2, eps, weight_decay, decay, state; groups m/ and v/ like
              params/, or with lean state (state bf16 / 8bit) the moments as held: flat uint16
              bfloat16 bits, or flat uint8 codes plus groups m_scale/ and v_scale/ (float32 per block)
    train_state  JSON: whatever the training loop needs to continue (step, epoch, loader position,
                 its RNG states, metrics so far); a dataset, not an attribute, as it grows with the run

Parameters and Adam moments are stored bit-for-bit in the model's dtype, so a resumed run continues
exactly where the saved one stopped. The file is written beside its destination under a temp name
and renamed over it only when complete, so a crash mid-save leaves the previous checkpoint intact;
the `complete` marker, set after everything else is written and flushed, catches a file that was
cut short some other way (a copy interrupted, a full disk).
"""
import contextlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .backends import resolve
from .config import check_tensors
from .family import config_from_dict, config_to_dict, family_of, param_shapes
from .errors import MinisftError
from .model import GPT
from .optim import DEFAULT, OPTIM_STATES, AdamW, state_layout

FORMAT = "minisft-checkpoint"
FORMAT_VERSION = 1
# Config fields that decide the parameters' shapes; the others (dropout) are settings of a run.
SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads", "qkv_bias", "tie_embeddings")


def rng_state(rng: np.random.Generator) -> dict:
    """The dropout RNG's state (numpy's default_rng, a PCG64) as a JSON-serialisable dict."""
    return rng.bit_generator.state  # plain ints and strings only


def rng_from_state(state: dict) -> np.random.Generator:
    """The inverse of rng_state: a Generator that continues exactly where the saved one was."""
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise ValueError(f"not a PCG64 state: {str(state)[:80]}")
    bitgen = np.random.PCG64()
    bitgen.state = state
    return np.random.Generator(bitgen)


def json_default(x):
    """json.dumps fallback: numpy scalars and arrays as plain numbers and lists."""
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


# ---- save -----------------------------------------------------------------------------------------
def save_checkpoint(path, model: GPT, optimizer: AdamW | None = None, train_state: dict | None = None) -> Path:
    """Write model (+ optimizer state, + train_state: a JSON-serialisable dict) to path, atomically."""
    path = Path(path)
    try:
        state_json = json.dumps(train_state or {}, default=json_default, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_checkpoint: train_state is not JSON-serialisable: {e}") from None
    if optimizer is not None and optimizer.model is not model:
        raise ValueError("save_checkpoint: the optimizer belongs to a different model")
    with atomic_h5(path) as f:
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, minisft_version=__version__,
                       dtype=model.dtype)
        f["config"] = json.dumps(config_to_dict(model.cfg))
        g = f.create_group("model")
        g.attrs.update(rng=json.dumps(rng_state(model.rng)), frozen=json.dumps(sorted(model.frozen)))
        write_arrays(f.create_group("params"), model.params, model)
        f.attrs["array_dtype"] = f["params"][next(iter(model.params))].dtype.str
        if optimizer is not None:
            g = f.create_group("adam")
            g.attrs.update(step=optimizer.step_count, lr=optimizer.lr, beta1=optimizer.betas[0],
                           beta2=optimizer.betas[1], eps=optimizer.eps,
                           weight_decay=optimizer.weight_decay, decay=optimizer.decay, state=optimizer.state)
            for key, arrays in optimizer.moments.items():  # one array at a time on the host
                group = g.create_group(key)
                for name, a in arrays.items():
                    group.create_dataset(name, data=optimizer.to_host(a))
        f["train_state"] = state_json
    return path


@contextlib.contextmanager
def atomic_h5(path: Path):
    """An HDF5 file for path, written beside it and renamed into place once complete (its "complete"
    attribute set last, the bytes on disk before the rename): no reader ever sees half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            yield f
            f.flush()
            f.attrs["complete"] = True
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_arrays(group, arrays: dict, model: GPT) -> None:
    """Each of the model's arrays as a dataset of the HDF5 group, by name (training checkpoints and LoRA's)."""
    for name, a in arrays.items():  # one array at a time on the host, not a second copy of the model
        group.create_dataset(name, data=model.B.to_numpy(a))


# ---- load -----------------------------------------------------------------------------------------
def load_checkpoint(path, model: GPT | None = None, optimizer: AdamW | None = None, backend="numpy",
                    dtype: str | None = None, device=None, load_optimizer: bool = True):
    """Read a checkpoint -> (model, optimizer, train_state).

    model None: a new GPT of the saved config on backend/device, in dtype (default: the saved one).
    model given: its shape must match the saved config; the parameters, dropout RNG and frozen set
    are loaded into it. optimizer given (it must be model's): its moments and step are restored, its
    hyperparameters stay; otherwise, when the file has optimizer state and load_optimizer is True, a
    new AdamW with the saved hyperparameters and state is returned, else None. The arrays come back
    bit-exact when the model's dtype is the saved one (otherwise they are cast).
    """
    path = Path(path)
    if optimizer is not None and (model is None or optimizer.model is not model):
        raise ValueError("load_checkpoint: pass the optimizer's model as model")
    if not path.is_file():
        raise MinisftError(f"{path}: no such checkpoint file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise MinisftError(f"{path}: cannot be read as an HDF5 checkpoint; it is truncated, corrupt or "
                           f"not a checkpoint ({e})") from None
    try:
        with f:
            return _load(f, path, model, optimizer, backend, dtype, device, load_optimizer)
    except (OSError, KeyError) as e:  # h5py's errors for damaged data inside an opened file
        raise MinisftError(f"{path}: damaged checkpoint: {e}") from None


def _load(f, path, model, optimizer, backend, dtype, device, load_optimizer):
    # Everything but the values is checked before anything is loaded, so a bad file leaves a caller's
    # model untouched; a non-finite value is found as its tensor is read (a second pass over the
    # whole file would double the load time), when a caller's model may already hold some tensors.
    if f.attrs.get("format") != FORMAT:
        raise MinisftError(f"{path}: not a minisft checkpoint (no format={FORMAT!r} attribute)")
    if f.attrs.get("format_version") != FORMAT_VERSION:
        raise MinisftError(f"{path}: checkpoint format version {f.attrs.get('format_version')} is not "
                           f"supported (this minisft reads version {FORMAT_VERSION})")
    if not f.attrs.get("complete", False):
        raise MinisftError(f"{path}: incomplete checkpoint (the completion marker is missing): it was cut "
                           "short while being written or copied")
    try:
        cfg = config_from_dict(read_json(f, path, "config"))
    except (TypeError, ValueError) as e:
        raise MinisftError(f"{path}: dataset 'config' is not a valid model config: {e}") from None
    try:
        rng = rng_from_state(json.loads(f["model"].attrs["rng"]))
        frozen = set(json.loads(f["model"].attrs["frozen"]))
    except (TypeError, ValueError) as e:
        raise MinisftError(f"{path}: attributes rng/frozen of group 'model' are not valid: {e}") from None
    _check_config(f, path, cfg)
    shapes = param_shapes(cfg)
    if not frozen <= set(shapes):
        raise MinisftError(f"{path}: model/frozen names parameters the model does not have: "
                           f"{sorted(frozen - set(shapes))}")
    train_state = read_json(f, path, "train_state")
    array_dtype = np.dtype(f.attrs["array_dtype"])
    check_layout(f, path, "params", {n: (shape, array_dtype) for n, shape in shapes.items()})
    if model is not None:
        differ = [f"{k}: file {getattr(cfg, k)!r}, model {getattr(model.cfg, k)!r}"
                  for k in SHAPE_FIELDS if getattr(cfg, k) != getattr(model.cfg, k)]
        if type(cfg) is not type(model.cfg):
            differ = [f"family: file {family_of(cfg).name}, model {family_of(model.cfg).name}"]
        if differ:
            raise MinisftError(f"{path}: the checkpoint's model does not match this one ({'; '.join(differ)})")
    restore_adam = "adam" in f and (optimizer is not None or load_optimizer)
    if optimizer is not None and not restore_adam:
        raise MinisftError(f"{path}: the checkpoint holds no optimizer state to restore")
    trained = [n for n in shapes if n not in frozen]
    state = str(f["adam"].attrs.get("state", DEFAULT)) if restore_adam else None
    if restore_adam:
        if optimizer is not None and optimizer.state != state:
            raise MinisftError(f"{path}: the checkpoint's AdamW state is {state!r}, this run keeps "
                               f"{optimizer.state!r} (setting optim-state)")
        if state not in OPTIM_STATES:
            raise MinisftError(f"{path}: unknown AdamW state {state!r} (attribute adam/state)")
        for key, layout in state_layout({n: shapes[n] for n in trained}, state, array_dtype).items():
            check_layout(f, path, f"adam/{key}", layout)
        if optimizer is not None and set(optimizer.m) != set(trained):
            raise MinisftError(f"{path}: the optimizer state does not fit this optimizer: the file has moments "
                               f"for {len(trained)} tensors (frozen: {sorted(frozen)}), the optimizer "
                               f"for {len(optimizer.m)}")

    # Load, one tensor at a time where a model already holds memory for it: the peak stays near the
    # final size (model + two moments) rather than twice that.
    if model is None:
        params = {n: read_array(f, path, f"params/{n}") for n in shapes}
        saved = str(f.attrs["dtype"])
        if dtype is None and saved == "bfloat16" and resolve(backend, device)[0] == "numpy":
            saved = "float32"  # a bfloat16 run stores float32 master weights; numpy computes in float32
        model = GPT(cfg, backend=backend, dtype=dtype or saved, device=device, params=params)
        del params
    else:
        for n in shapes:
            model.params[n] = model.B.from_numpy(read_array(f, path, f"params/{n}"))
        model.grads = {}
    model.rng, model.frozen = rng, frozen
    if restore_adam:
        a = f["adam"].attrs
        if optimizer is None:
            optimizer = AdamW(model, lr=float(a["lr"]), betas=(float(a["beta1"]), float(a["beta2"])),
                              eps=float(a["eps"]), weight_decay=float(a["weight_decay"]), decay=str(a["decay"]),
                              state=state)
        for key, arrays in optimizer.moments.items():
            for n in trained:
                arrays[n] = optimizer.from_host(read_array(f, path, f"adam/{key}/{n}"))
        optimizer.step_count = int(a["step"])
    return model, (optimizer if restore_adam else None), train_state


def _check_config(f, path, cfg) -> None:
    """The config against what the file stores, before anything is sized by it: a crafted config
    (n_layers = 1e9) must not make param_shapes or the model allocate for tensors that are not there."""
    if "params" not in f:
        raise MinisftError(f"{path}: group 'params' is missing")
    fam = family_of(cfg)
    prefix = fam.layer.split("{}")[0]  # "h." or "layers."
    layers = {name.split(".")[1] for name in f["params"] if name.startswith(prefix)}  # bounded by the file
    if cfg.n_layers != len(layers):
        raise MinisftError(f"{path}: the config says {cfg.n_layers} layers, params/ holds tensors of {len(layers)}")
    embeddings = [(fam.embed, (cfg.vocab_size, cfg.emb_dim))]
    if fam.positions is not None:
        embeddings.append((fam.positions, (cfg.context_length, cfg.emb_dim)))
    for name, shape in embeddings:
        if name not in f["params"] or f["params"][name].shape != shape:
            got = f["params"][name].shape if name in f["params"] else "missing"
            raise MinisftError(f"{path}: params/{name} is {got}, the config needs {shape}")


def read_json(f, path, name):
    """The JSON text dataset `name` of the open file f (from path), parsed."""
    try:
        return json.loads(f[name].asstr()[()])
    except (TypeError, ValueError) as e:
        raise MinisftError(f"{path}: dataset {name!r} is not valid JSON text: {e}") from None


def check_layout(f, path, group: str, layout: dict) -> None:
    """The datasets of group must be exactly the layout's names, shapes and dtypes (metadata only):
    {name: (shape, dtype)}."""
    if group not in f:
        raise MinisftError(f"{path}: group {group!r} is missing")
    g = f[group]
    check_tensors(f"{path}: group {group}/", {n: g[n].shape for n in g}, {n: s for n, (s, _) in layout.items()})
    for name, (_, dtype) in layout.items():
        if g[name].dtype != dtype:
            raise MinisftError(f"{path}: dataset {group}/{name} is {g[name].dtype}, expected {dtype}")


def read_array(f, path, name: str) -> np.ndarray:
    """Dataset `name` of the open file f (from path) on the host, refused if any value is not finite."""
    try:
        a = f[name][()]
    except OSError as e:  # an I/O error under h5py
        raise MinisftError(f"{path}: dataset {name} cannot be read ({e})") from None
    bad = a.size - np.count_nonzero(np.isfinite(a))
    if bad:  # a run stops before a non-finite update, so such a file was damaged or made by hand
        raise MinisftError(f"{path}: dataset {name} holds {bad} non-finite values (NaN or inf)")
    return a
