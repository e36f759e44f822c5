"""Reproducible benchmark workloads, made with QEMU's own tools (qemu-img, qemu-io).

Everything is derived from one seed: the layout of the data, the data itself
(generated here in Python: zeros, incompressible random bytes, and compressible
text- and binary-like bytes) and every write of every layer. qemu-io writes the
data with `write -s FILE OFF LEN` (and `write -z` / `write -P 0` for zeros), so
the qcow2 files are exactly what QEMU makes of those guest writes.

Workloads (sizes for the full run; --quick shrinks them):
  chain/base.qcow2 ... chain/top.qcow2   4 GiB disk, 64 KiB clusters, ~2 GiB of data
                                         in base, then ov1..ov4 and top, each
                                         rewriting ~5% of the clusters. top.qcow2
                                         carries the bitmap "inc", added before its
                                         writes, so it marks exactly top's writes.
  chain/flat.qcow2                       qemu-img convert of top (for compare)
  sparse.qcow2                           64 GiB disk with a little scattered data
  big.qcow2                              1 TiB disk, 20,000 scattered writes, bitmaps
                                         b1 (all writes), b2 (last half), b3 (last quarter)
  replay/ovN.cmds + replay/ovN/          qemu-io command scripts and data files of the
                                         overlays, kept so the benchmark can replay the
                                         same guest writes on a live disk between backups
"""

import json
import os
import random
import shutil
import subprocess
import sys

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
CLUSTER = 64 * 1024

FULL = dict(disk=4 * GiB, data_fraction=0.5, overlays=5, overlay_fraction=0.05,
            sparse=64 * GiB, sparse_writes=256, big=1 * TiB, big_writes=20000)
QUICK = dict(disk=256 * MiB, data_fraction=0.5, overlays=5, overlay_fraction=0.05,
             sparse=64 * GiB, sparse_writes=64, big=1 * TiB, big_writes=2000)

# Share of the data clusters by kind (by cluster count).
KINDS = (("zero", 0.20), ("random", 0.25), ("mixed", 0.55))

GEN_VERSION = 3  # bump when the generator changes, so old workloads are rebuilt


def log(msg):
    print(f"[gen] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def qemu_io(image, commands, fmt="qcow2"):
    """Feeds commands to one qemu-io process on stdin (no argv length limit)."""
    text = "\n".join(commands) + "\nquit\n"
    p = subprocess.run(["qemu-io", "-t", "writeback", "-f", fmt, image], input=text.encode(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if p.returncode != 0 or b"error" in p.stderr.lower() or b"failed" in p.stderr.lower():
        raise SystemExit(f"qemu-io on {image} failed: {p.stderr.decode(errors='replace')[:2000]}")


class DataSource:
    """Seeded generator of cluster contents."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self._build_pools()

    def _build_pools(self):
        rng = self.rng
        # Word list: common English words plus seeded pseudo-words, Zipf-weighted.
        common = ("the of and to in is that for it as with was on be by this are or from at "
                  "which an not have has but were their its all can also more one other been "
                  "system file data disk image block cluster table error value return void int "
                  "static const struct if else while for case break default include define "
                  "error warning info debug kernel user root var log usr lib bin etc home "
                  "function module config server client request response status open close "
                  "read write size offset length count buffer memory cache page").split()
        syll = ["ka", "to", "ri", "ne", "sa", "lo", "mi", "tu", "be", "da", "fo", "gu",
                "ja", "ke", "li", "mo", "nu", "pe", "qu", "ra", "si", "ta", "vu", "xe", "zo"]
        pseudo = {"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)}
        words = common + sorted(pseudo)
        weights = [1.0 / (i + 1) ** 1.05 for i in range(len(words))]
        cum = []
        s = 0.0
        for w in weights:
            s += w
            cum.append(s)
        punct = [" ", " ", " ", " ", " ", " ", ", ", ". ", "\n", " = ", "(", ") ", "; ", ": ", "\t"]

        def text_piece():
            ws = rng.choices(words, cum_weights=cum, k=900)
            ps = rng.choices(punct, k=900)
            out = "".join(w + p for w, p in zip(ws, ps)).encode()
            return out[:4096].ljust(4096, b"\n")

        # Byte translation tables for low-entropy "machine code" and "tables".
        opcodes = [0x00] * 40 + [0xFF] * 10 + [0x48, 0x89, 0x8B, 0xE8, 0xC3, 0x83, 0x0F, 0x85,
                                                 0x74, 0x75, 0xEB, 0x31, 0xC0, 0x5D, 0x55, 0x41] * 6
        opcodes += rng.sample(range(256), 256)  # every byte value occurs sometimes
        code_table = bytes(opcodes[b % len(opcodes)] for b in range(256))
        small = bytes((b % 24) if b < 200 else b for b in range(256))

        def binary_piece():
            out = bytearray()
            while len(out) < 4096:
                kind = rng.random()
                n = rng.choice((128, 256, 512, 1024))
                if kind < 0.45:
                    out += rng.randbytes(n).translate(code_table)
                elif kind < 0.70:  # array of little-endian 64-bit small ints / pointers
                    hi = rng.randbytes(3)
                    for _ in range(n // 8):
                        if rng.random() < 0.5:
                            out += rng.randbytes(2) + b"\0" * 6
                        else:
                            out += rng.randbytes(3) + hi + b"\x7f\0"
                elif kind < 0.82:
                    out += b"\0" * n
                elif kind < 0.92:
                    out += rng.randbytes(n).translate(small)
                else:
                    out += rng.randbytes(n)  # embedded compressed/encrypted bits
            return bytes(out[:4096])

        log("building data pools")
        self.text = [text_piece() for _ in range(2048)]
        self.binary = [binary_piece() for _ in range(2048)]

    def cluster(self, kind):
        rng = self.rng
        if kind == "zero":
            return bytes(CLUSTER)
        if kind == "random":
            return rng.randbytes(CLUSTER)
        # mixed: a text cluster, a binary cluster, or a mix of both, from 4 KiB pieces
        flavor = rng.random()
        pieces = []
        for _ in range(CLUSTER // 4096):
            use_text = flavor < 0.4 or (flavor < 0.7 and rng.random() < 0.5)
            pool = self.text if use_text else self.binary
            pieces.append(pool[rng.randrange(len(pool))])
        data = bytearray(b"".join(pieces))
        data[0:8] = rng.randbytes(8)  # no two clusters are byte-identical
        return bytes(data)

    def kind(self):
        r = self.rng.random()
        acc = 0.0
        for k, share in KINDS:
            acc += share
            if r < acc:
                return k
        return KINDS[-1][0]


def write_runs(image, runs, src, datadir, cmds_out=None):
    """Writes runs [(offset, length, kind)] into image through qemu-io.

    Data runs are generated into files in datadir and written with `write -s`;
    zero runs alternate between `write -z` (zero clusters) and `write -P 0`
    (allocated clusters full of zero bytes, as a guest that wrote zeros leaves them).
    Returns the qemu-io command list (also written to cmds_out if given).
    """
    os.makedirs(datadir, exist_ok=True)
    cmds = []
    zero_toggle = False
    for i, (off, length, kind) in enumerate(runs):
        if kind == "zero":
            zero_toggle = not zero_toggle
            cmds.append(f"write -q -z {off} {length}" if zero_toggle else f"write -q -P 0 {off} {length}")
            continue
        path = os.path.join(datadir, f"{i:06d}.bin")
        with open(path, "wb") as f:
            left = length
            while left > 0:
                chunk = src.cluster(kind)
                f.write(chunk[:left])
                left -= len(chunk)
        cmds.append(f"write -q -s {path} {off} {length}")
    if cmds_out:
        with open(cmds_out, "w") as f:
            f.write("\n".join(cmds) + "\n")
    qemu_io(image, cmds)
    return cmds


def base_runs(p, src):
    """Allocated runs of the base image: about data_fraction of the disk."""
    n = p["disk"] // CLUSTER
    mean = 32 if n >= 16384 else 8
    runs = []
    pos = 0
    rng = src.rng
    gap_mean = mean * (1 - p["data_fraction"]) / p["data_fraction"]
    while pos < n:
        pos += int(rng.expovariate(1 / gap_mean)) if gap_mean > 0 else 0
        length = max(1, int(rng.expovariate(1 / mean)))
        length = min(length, n - pos)
        if length <= 0:
            break
        runs.append((pos * CLUSTER, length * CLUSTER, src.kind()))
        pos += length
    return runs


def overlay_runs(p, src):
    """About overlay_fraction of the clusters, in runs of 1-16 clusters, plus a few
    sub-cluster writes (which make QEMU copy the rest of the cluster from below)."""
    n = p["disk"] // CLUSTER
    rng = src.rng
    target = int(n * p["overlay_fraction"])
    taken = set()
    runs = []
    count = 0
    while count < target:
        if rng.random() < 0.1:
            c = rng.randrange(n)
            sub = rng.randrange(16)
            ln = rng.choice((4096, 8192, 16384, 32768))
            ln = min(ln, CLUSTER - sub * 4096)
            runs.append((c * CLUSTER + sub * 4096, ln, "mixed"))
            taken.add(c)
            count += 1
            continue
        length = rng.randint(1, 16)
        c = rng.randrange(0, n - length)
        runs.append((c * CLUSTER, length * CLUSTER, src.kind()))
        count += length
    runs.sort()
    return runs


def data_bytes(image, depth0_only=False):
    """Bytes of non-zero guest data in image (whole chain, or only its top layer)."""
    out = subprocess.run(["qemu-img", "map", "--output=json", image], check=True,
                         capture_output=True).stdout
    total = 0
    for e in json.loads(out):
        if e.get("data") and not e.get("zero") and (not depth0_only or e.get("depth") == 0):
            total += e["length"]
    return total


def generate(root, seed, quick):
    p = dict(QUICK if quick else FULL)
    params = dict(p, seed=seed, quick=quick, version=GEN_VERSION)
    stamp = os.path.join(root, "workload.json")
    if os.path.exists(stamp):
        with open(stamp) as f:
            old = json.load(f)
        if old.get("params") == params:
            log(f"reusing workloads in {root}")
            return old
        log("parameters changed; regenerating")
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    chain = os.path.join(root, "chain")
    replay = os.path.join(root, "replay")
    os.makedirs(chain)
    os.makedirs(replay)
    src = DataSource(seed)

    # --- the chain
    base = os.path.join(chain, "base.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", base, str(p["disk"])])
    runs = base_runs(p, src)
    log(f"base: {len(runs)} runs, {sum(r[1] for r in runs) / MiB:.0f} MiB")
    tmpdata = os.path.join(root, "tmp-base-data")
    write_runs(base, runs, src, tmpdata)
    shutil.rmtree(tmpdata)
    names = [f"ov{i}" for i in range(1, p["overlays"])] + ["top"]
    below = "base.qcow2"
    for name in names:
        img = os.path.join(chain, f"{name}.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}",
             "-b", below, "-F", "qcow2", img, str(p["disk"])])
        if name == "top":
            run(["qemu-img", "bitmap", "--add", img, "inc"])
        runs = overlay_runs(p, src)
        log(f"{name}: {len(runs)} writes, {sum(r[1] for r in runs) / MiB:.0f} MiB")
        write_runs(img, runs, src, os.path.join(replay, name), os.path.join(replay, f"{name}.cmds"))
        below = f"{name}.qcow2"
    top = os.path.join(chain, "top.qcow2")
    run(["qemu-img", "convert", "-O", "qcow2", top, os.path.join(chain, "flat.qcow2")])

    # --- 64 GiB sparse disk
    rng = random.Random(seed + 1)
    sparse = os.path.join(root, "sparse.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", sparse, str(p["sparse"])])
    cmds = []
    for _ in range(p["sparse_writes"]):
        ln = rng.choice((64, 128, 256, 512, 1024)) * 1024
        off = rng.randrange(0, (p["sparse"] - ln) // 4096) * 4096
        cmds.append(f"write -q -P {rng.randrange(1, 256)} {off} {ln}")
    qemu_io(sparse, cmds)
    log("sparse: done")

    # --- 1 TiB disk with scattered writes and three bitmaps
    big = os.path.join(root, "big.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", big, str(p["big"])])
    writes = []
    for _ in range(p["big_writes"]):
        ln = rng.choice((4, 8, 16, 32, 64)) * 1024
        off = rng.randrange(0, (p["big"] - ln) // 4096) * 4096
        writes.append(f"write -q -P {rng.randrange(1, 256)} {off} {ln}")
    half, quarter = len(writes) // 2, len(writes) * 3 // 4
    run(["qemu-img", "bitmap", "--add", big, "b1"])
    qemu_io(big, writes[:half])
    run(["qemu-img", "bitmap", "--add", big, "b2"])
    qemu_io(big, writes[half:quarter])
    run(["qemu-img", "bitmap", "--add", big, "b3"])
    qemu_io(big, writes[quarter:])
    log("big: done")

    info = dict(
        params=params,
        chain=[os.path.join(chain, f"{n}.qcow2") for n in ["base"] + names],
        data_bytes_chain=data_bytes(top),
        data_bytes_top=data_bytes(top, depth0_only=True),
        data_bytes_base=data_bytes(base),
        data_bytes_ov1=data_bytes(os.path.join(chain, "ov1.qcow2"), depth0_only=True),
        data_bytes_sparse=data_bytes(sparse),
        data_bytes_big=data_bytes(big),
    )
    with open(stamp, "w") as f:
        json.dump(info, f, indent=1)
    return info


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--seed", type=int, default=20240607)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(json.dumps(generate(a.root, a.seed, a.quick), indent=1))
