#!/usr/bin/env python3
"""Convert an official DINO PyTorch checkpoint (.pth) to safetensors for the dino library.

Accepted inputs (dino-spec section 6):
  * a bare state_dict, e.g. dino_deitsmall16_pretrain.pth (teacher backbone weights:
    "cls_token", "blocks.0.attn.qkv.weight", ...);
  * a full training checkpoint (checkpoint.pth) with "student" and "teacher" state_dicts
    ("module.backbone.*"/"module.head.*" and "backbone.*"/"head.*"), plus optimizer, epoch,
    args, dino_loss;
  * any dict holding a state_dict under a key (e.g. "state_dict", "model"): pick it with
    --checkpoint-key, as DINO's own utils.load_pretrained_weights does.

The names are written unchanged (the C++ loader, dino/io/checkpoint.hpp, understands the
"module."/"backbone." wrappers), except:
  * --checkpoint-key all writes both groups of a full checkpoint, as "teacher.<key>" and
    "student.<key>";
  * --backbone-only keeps the backbone tensors and strips "module." and "backbone.", which
    gives the names of the released backbone files (loadable by timm as well).
The metadata holds "format": "pt", "source" (the input's file name), "checkpoint_key" (when
one group was chosen: the C++ loader uses it to refuse student weights asked for as
teacher) and "epoch" when the checkpoint has one.

Floating tensors are written as F32 (default), BF16 (--dtype bf16) or as stored
(--dtype keep: F32, F16, BF16, F64); integer tensors (BatchNorm's num_batches_tracked) keep
their integer dtype. Uses the `safetensors` package when installed, else writes the format
itself with numpy; either way the output file appears atomically.

Loading a .pth runs Python's pickle. By default the file is loaded with torch's
weights_only=True (a full checkpoint's argparse.Namespace is allowed where torch supports
allow-listing it); --unsafe-pickle loads with full pickle, for files you trust only.

Example:
  python3 tools/convert_pth.py checkpoint.pth teacher.safetensors --checkpoint-key teacher
  python3 tools/convert_pth.py dino_deitsmall16_pretrain.pth vits16.safetensors
"""

import argparse
import json
import os
import struct
import sys
import tempfile

import numpy as np
import torch

# torch dtype -> (safetensors name, numpy little-endian dtype used to serialise the bytes)
_DTYPES = {
    torch.float32: ("F32", "<f4"),
    torch.float16: ("F16", "<f2"),
    torch.bfloat16: ("BF16", "<u2"),  # numpy has no bfloat16: written through its bit pattern
    torch.float64: ("F64", "<f8"),
    torch.int64: ("I64", "<i8"),
    torch.int32: ("I32", "<i4"),
    torch.int16: ("I16", "<i2"),
    torch.int8: ("I8", "i1"),
    torch.uint8: ("U8", "u1"),
    torch.bool: ("BOOL", "u1"),
}


def die(msg):
    sys.exit(f"convert_pth: {msg}")


def load_pth(path, unsafe):
    if unsafe:
        return torch.load(path, map_location="cpu")
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # a torch without weights_only
        die("this torch cannot load with weights_only=True; rerun with --unsafe-pickle if you trust the file")
    except Exception as e:  # pickle.UnpicklingError and kin: something besides tensors
        die(f"{path} holds more than tensors and cannot be loaded with weights_only=True ({e}).\n"
            "If you trust the file, rerun with --unsafe-pickle.")


def is_state_dict(obj):
    return isinstance(obj, dict) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def strip_wrappers(name):
    changed = True
    while changed:
        changed = False
        for p in ("module.", "backbone."):
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def select(obj, key, backbone_only):
    """Returns ({name: tensor}, checkpoint_key written to the metadata or None)."""
    if not isinstance(obj, dict):
        die(f"expected a dict (state_dict or checkpoint), found {type(obj).__name__}")
    groups = {}
    if key == "all":
        for g in ("teacher", "student"):
            if not isinstance(obj.get(g), dict):
                die(f"--checkpoint-key all needs 'teacher' and 'student' entries; the file has: {sorted(map(str, obj))}")
            groups[g + "."] = obj[g]
        chosen = None
    elif key is not None:
        if key not in obj:
            die(f"no entry '{key}' in the checkpoint; it has: {sorted(map(str, obj))}")
        groups[""] = obj[key]
        chosen = key if key in ("teacher", "student") else None
    elif is_state_dict(obj):
        groups[""] = obj
        chosen = None
    elif isinstance(obj.get("teacher"), dict):
        groups[""] = obj["teacher"]  # the paper's results use the teacher (dino#44)
        chosen = "teacher"
    else:
        die(f"not a state_dict and no 'teacher' entry; choose one with --checkpoint-key from: {sorted(map(str, obj))}")

    out = {}
    for prefix, sd in groups.items():
        if not isinstance(sd, dict):
            die(f"the selected entry is a {type(sd).__name__}, not a state_dict")
        for name, t in sd.items():
            if not torch.is_tensor(t):
                print(f"convert_pth: skipping non-tensor entry '{name}'", file=sys.stderr)
                continue
            if backbone_only:
                if name.startswith("head.") or name.startswith("module.head."):
                    continue
                name = strip_wrappers(name)
            full = prefix + name
            if full in out:
                die(f"two tensors map to the name '{full}'")
            out[full] = t
    if not out:
        die("no tensors selected")
    return out, chosen


def convert_dtype(t, mode):
    if t.is_floating_point():
        if mode == "f32":
            return t.float()
        if mode == "bf16":
            return t.bfloat16()
        if t.dtype not in _DTYPES:
            die(f"unsupported floating dtype {t.dtype}")
        return t
    if t.dtype not in _DTYPES:
        die(f"unsupported dtype {t.dtype}")
    return t


def tensor_bytes(t):
    t = t.detach().cpu().contiguous()
    _, np_dtype = _DTYPES[t.dtype]
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy().view(np.uint16)
    elif t.dtype == torch.bool:
        arr = t.numpy().astype(np.uint8)
    else:
        arr = t.numpy()
    return arr.astype(np_dtype, copy=False).tobytes()


def write_atomic(path, write):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=os.path.basename(path) + ".tmp.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_by_hand(tensors, path, metadata):
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, t in tensors.items():
        b = tensor_bytes(t)
        header[name] = {"dtype": _DTYPES[t.dtype][0], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-(8 + len(h)) % 8)  # align the data to 8 bytes

    def write(f):
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)

    write_atomic(path, write)


def save(tensors, path, metadata):
    try:
        from safetensors.torch import save as st_save
    except ImportError:
        return save_by_hand(tensors, path, metadata)
    data = st_save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, metadata=metadata)
    write_atomic(path, lambda f: f.write(data))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("input", help="a .pth file (state_dict or DINO training checkpoint)")
    ap.add_argument("output", help="the .safetensors file to write")
    ap.add_argument("--checkpoint-key", default=None,
                    help="entry to convert: teacher (default for training checkpoints), student, all "
                         "(both, as teacher.*/student.*), or any top-level key holding a state_dict")
    ap.add_argument("--backbone-only", action="store_true",
                    help="drop head.* and strip module./backbone. (the names of the released backbone files)")
    ap.add_argument("--dtype", choices=["f32", "bf16", "keep"], default="f32", help="dtype of floating tensors")
    ap.add_argument("--unsafe-pickle", action="store_true", help="load with full pickle (trusted files only)")
    args = ap.parse_args(argv)

    obj = load_pth(args.input, args.unsafe_pickle)
    tensors, chosen = select(obj, args.checkpoint_key, args.backbone_only)
    tensors = {k: convert_dtype(v, args.dtype) for k, v in tensors.items()}
    metadata = {"format": "pt", "source": os.path.basename(args.input)}
    if chosen:
        metadata["checkpoint_key"] = chosen
    if isinstance(obj, dict) and "epoch" in obj and not torch.is_tensor(obj["epoch"]):
        metadata["epoch"] = str(obj["epoch"])
    save(tensors, args.output, metadata)
    n = sum(t.numel() for t in tensors.values())
    print(f"convert_pth: wrote {len(tensors)} tensors ({n} values) to {args.output}"
          + (f" [checkpoint_key {chosen}]" if chosen else ""))


if __name__ == "__main__":
    main()
