#!/usr/bin/env python3
"""Extract the ELF vmlinux from an x86 bzImage (like the kernel's scripts/extract-vmlinux).

    linux-extract-vmlinux.py BZIMAGE OUT

First tries the exact payload the boot protocol describes (setup header fields
payload_offset/payload_length, boot protocol >= 2.08); then, like
scripts/extract-vmlinux, scans the whole image for every known compression magic.
A candidate is accepted only if it decompresses to an ELF file. Exit status 0 on
success, 1 when nothing in the image decompresses to an ELF.
"""
import lzma
import os
import shutil
import struct
import subprocess
import sys
import zlib
import bz2

ELF_MAGIC = b"\x7fELF"

# (name, magic) in the order scripts/extract-vmlinux tries them.
MAGICS = [
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
]


def _external(cmd, data):
    """Decompress with an external tool; keeps whatever it wrote even if it
    complains about trailing garbage (the kernel appends the size)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        p = subprocess.run(cmd, input=data, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout or None


def decompress(kind, data):
    try:
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(data)
        if kind == "zstd":
            return _external(["zstd", "-dcq"], data)
        if kind == "lz4":
            return _external(["lz4", "-dcq"], data)
        if kind == "lzo":
            return _external(["lzop", "-dcq"], data)
    except (lzma.LZMAError, zlib.error, OSError, EOFError, ValueError):
        return None
    return None


def kind_of(data):
    for name, magic in MAGICS:
        if data.startswith(magic):
            return name
    return None


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    src, dst = sys.argv[1], sys.argv[2]
    img = open(src, "rb").read()
    if img.startswith(ELF_MAGIC):
        out = img
        how = "input is already an ELF"
    else:
        out, how = None, None
        # 1) The exact payload from the setup header.
        if len(img) > 0x250 and img[0x202:0x206] == b"HdrS":
            version = struct.unpack_from("<H", img, 0x206)[0]
            setup_sects = img[0x1F1] or 4
            if version >= 0x208:
                off, length = struct.unpack_from("<II", img, 0x248)
                start = (setup_sects + 1) * 512 + off
                payload = img[start:start + length]
                kind = kind_of(payload)
                if kind:
                    d = decompress(kind, payload)
                    if d and d.startswith(ELF_MAGIC):
                        out, how = d, f"{kind} payload at {start:#x} (setup header, boot protocol {version >> 8}.{version & 0xff:02})"
        # 2) Scan for every magic, like scripts/extract-vmlinux.
        if out is None:
            for name, magic in MAGICS:
                pos = img.find(magic)
                while pos >= 0 and out is None:
                    d = decompress(name, img[pos:])
                    if d and d.startswith(ELF_MAGIC):
                        out, how = d, f"{name} stream found by scanning at {pos:#x}"
                    pos = img.find(magic, pos + 1)
                if out is not None:
                    break
    if out is None:
        print(f"extract-vmlinux: no compressed ELF found in {src}", file=sys.stderr)
        return 1
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, dst)
    print(f"extract-vmlinux: {how}: {len(out)} bytes -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
