#!/usr/bin/env python3
"""Adds the model record (model_type, embedding sizes and fingerprint; make_calibration.py's
model_record) to an mbq-calib bundle written before bundles recorded their model, so that
`mbq quantize` can check it against the model it feeds. Rewrites only the safetensors
header (tensor bytes are copied unchanged), through a temporary file renamed into place.
Plain Python: no torch.

  python3 Scripts/stamp_bundle.py --model MODEL_DIR BUNDLE [BUNDLE ...]
"""
import argparse
import json
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_calibration import model_record  # noqa: E402


def stamp(bundle, record):
    with open(bundle, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        meta = header.get("__metadata__", {})
        if meta.get("format") != "mbq-calib":
            raise SystemExit(f"{bundle}: not an mbq-calib bundle (__metadata__.format is {meta.get('format')!r})")
        header["__metadata__"] = {**meta, **record}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned
        tmp = bundle + ".tmp"
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            while chunk := f.read(1 << 24):
                out.write(chunk)
    os.replace(tmp, bundle)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("bundles", nargs="+")
    a = ap.parse_args()
    record = model_record(a.model)
    for b in a.bundles:
        stamp(b, record)
        print(f"{b}: records {record['model_type']}, embeddings {record['vocab_size']} x {record['hidden_size']}, "
              f"fingerprint {record['embed_fingerprint'][:12]}")


if __name__ == "__main__":
    main()
