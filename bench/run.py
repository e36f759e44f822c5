#!/usr/bin/env python3
"""qbackup against QEMU's own tools, in the same run, on the same workloads.

Usage:  python3 bench/run.py [--quick] [--only PATTERN] [--runs N] [--cache warm,cold] ...
        (bash bench/run.sh does the same after making sure QEMU's tools are installed)

See bench/README.md for what is measured and how.
"""

import argparse
import datetime
import fnmatch
import glob
import json
import mmap
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.dont_write_bytecode = True  # nothing written inside the repository
sys.path.insert(0, HERE)
import gen  # noqa: E402

MiB = 1 << 20
RSS_LIMIT_MIB = 64
RUN_TIMEOUT = 3600


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class NotAvailable(Exception):
    """The pair cannot run (yet): the reason goes into the table."""


# ---------------------------------------------------------------- measuring

RUNNER = None  # path of the compiled bench/runner.c


def build_runner(work):
    """Compiles the timing helper with the C compiler at hand (cc, gcc, or the clang
    that ships with the Swift toolchain)."""
    global RUNNER
    out = os.path.join(work, "bin", "runner")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    src = os.path.join(HERE, "runner.c")
    swift = shutil.which("swift")
    candidates = ["cc", "gcc", "clang"] + ([os.path.join(os.path.dirname(os.path.realpath(swift)), "clang")] if swift else [])
    for c in candidates:
        # Built under a name of its own and renamed: another bench run may be executing the old one.
        if shutil.which(c) and subprocess.run([c, "-O2", "-o", f"{out}.{os.getpid()}", src], capture_output=True).returncode == 0:
            os.replace(f"{out}.{os.getpid()}", out)
            RUNNER = out
            return
    raise SystemExit("bench: no C compiler (cc, gcc or the Swift toolchain's clang) to build bench/runner.c")


def measure(argv, stdout_path, stderr_path, timeout=RUN_TIMEOUT):
    """Runs argv through the runner; returns (exit status or None on timeout, wall
    seconds, peak RSS in KiB of the largest process of the run)."""
    result = stdout_path + ".result"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        subprocess.run([RUNNER, result, str(timeout), *argv], stdin=subprocess.DEVNULL,
                       stdout=out, stderr=err, check=True)
    with open(result) as f:
        rc, secs, rss = f.read().split()
    rc = int(rc)
    return (None if rc < 0 else rc), float(secs), int(rss)


def sh(cmd, check=True, **kw):
    """Untimed helper command."""
    return subprocess.run(cmd, check=check, **kw)


def can_drop_caches():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def message(rundir):
    """What a failed run said: its first stderr line, else the stdout line that
    reports the problem (check prints its findings to stdout)."""
    msg = first_line(os.path.join(rundir, "stderr"))
    if msg != "(no message)":
        return msg
    try:
        with open(os.path.join(rundir, "stdout"), errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        return msg
    for l in lines:
        if any(w in l.lower() for w in ("were found", "error", "corrupt", "differ")):
            return l[:200]
    return lines[-1][:200] if lines else msg


def first_line(path, limit=200):
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = line.strip()
                if line:
                    return line[:limit]
    except OSError:
        pass
    return "(no message)"


# ---------------------------------------------------------------- disk speed

def disk_speed(directory, size):
    """Raw sequential write (page cache, then fdatasync) and read (O_DIRECT, cold)
    speed of the file system holding the workloads, in MiB/s."""
    path = os.path.join(directory, f"disk-speed.{os.getpid()}.tmp")
    rng = random.Random(1)
    chunk = 4 * MiB
    bufs = [rng.randbytes(chunk) for _ in range(8)]
    os.sync()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    for i in range(size // chunk):
        os.write(fd, bufs[i % len(bufs)])
    os.fdatasync(fd)
    t_write = time.perf_counter() - t0
    os.close(fd)
    read = None
    if can_drop_caches():
        drop_caches()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, chunk)
        t0 = time.perf_counter()
        off = 0
        while True:
            n = os.preadv(fd, [buf], off)
            if n <= 0:
                break
            off += n
        t_read = time.perf_counter() - t0
        os.close(fd)
        read = off / MiB / t_read
    except OSError as e:
        log(f"O_DIRECT read failed ({e}); read speed not measured")
    os.unlink(path)
    return size / MiB / t_write, read


# ---------------------------------------------------------------- machine

def machine_info(qb):
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO).stdout.strip()
        except OSError:
            return "?"
    commit = out(["git", "rev-parse", "--short", "HEAD"])
    if out(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        nproc=os.cpu_count(),
        cpu=model,
        memory=mem,
        kernel=platform.release(),
        load=" ".join(f"{x:.2f}" for x in os.getloadavg()),
        qemu=out(["qemu-img", "--version"]).splitlines()[0] if out(["qemu-img", "--version"]) else "?",
        qbackup=f"{qb} (git {commit})",
    )


# ---------------------------------------------------------------- context

class Ctx:
    def __init__(self, args, qb, info, work):
        self.args = args
        self.qb = qb
        self.info = info
        self.W = os.path.join(work, "workloads", f"{'quick' if args.quick else 'full'}-seed{args.seed}")
        self.work = work
        # Per run, so that two runs sharing the workloads (--only of different pairs) do not wipe each other's files.
        self.scratch = os.path.join(work, f"scratch.{os.getpid()}")
        self.setup_dir = os.path.join(work, f"setup.{os.getpid()}")
        self._help = {}
        self._cache = {}

    def p(self, *parts):
        return os.path.join(self.W, *parts)

    @property
    def top(self):
        return self.p("chain", "top.qcow2")

    def has(self, *words):
        """Does `qbackup WORDS --help` succeed?"""
        if words not in self._help:
            # swift-argument-parser prints the root help (exit 0) for an unknown
            # subcommand, so the subcommand's own usage line must be there too
            r = subprocess.run([self.qb, *words, "--help"], capture_output=True, text=True)
            usage = "USAGE: qbackup " + " ".join(words) + " "
            self._help[words] = r.returncode == 0 and usage in r.stdout.replace("\n", " ")
        return self._help[words]

    def need(self, *words):
        if not self.has(*words):
            raise NotAvailable(f"n/a: command not available yet (qbackup {' '.join(words)})")

    def once(self, key, fn):
        if key not in self._cache:
            try:
                self._cache[key] = fn()
            except NotAvailable as e:
                self._cache[key] = e
        v = self._cache[key]
        if isinstance(v, NotAvailable):
            raise v
        return v


def fresh_dir(path):
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    return path


def clone_tree(src, dst, link_above=64 * MiB):
    """Copies a repository folder; files above link_above are hard-linked (layers an
    operation only reads), smaller ones copied."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            shutil.copytree(s, d)
        elif os.path.getsize(s) > link_above:
            os.link(s, d)
        else:
            shutil.copy2(s, d)


def copy_image(src, dst, backing=None):
    shutil.copyfile(src, dst)
    if backing:
        sh(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", backing, "-F", "qcow2", dst])


def qcompare(a, b):
    r = subprocess.run(["qemu-img", "compare", a, b], capture_output=True, text=True)
    if r.returncode == 0:
        return None
    return f"qemu-img compare {os.path.basename(a)} {os.path.basename(b)}: " + (r.stdout + r.stderr).strip()[:150]


def manifest_layers(repo):
    with open(os.path.join(repo, "manifest.json")) as f:
        return [os.path.join(repo, l["file"]) for l in json.load(f)["layers"]]


def qb_run(ctx, *args):
    r = subprocess.run([ctx.qb, *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise NotAvailable(f"setup failed: qbackup {' '.join(args[:1])}: {(r.stderr or r.stdout).strip()[:150]}")
    return r


# ---------------------------------------------------------------- shared setups

def chain_repo(ctx):
    """A 6-layer repository whose latest point is the workload chain. With `qbackup
    backup`: a full backup of a live disk equal to base, then for each overlay its
    guest writes (replayed with qemu-io, so the bitmap marks them) and an
    incremental backup. Without it (yet): the chain's own QEMU-made files, copied
    and renamed as layers, with a manifest written here (returns a note saying so)."""
    def build():
        d = fresh_dir(os.path.join(ctx.setup_dir, "chain-repo"))
        repo = os.path.join(d, "repo")
        if not ctx.has("backup"):
            return synth_repo(ctx, repo), "repository synthesized from the QEMU-made chain (no qbackup backup yet)"
        try:
            return real_repo(d, repo), ""
        except NotAvailable as e:
            log(f"setup: {e}; falling back to a synthesized repository")
            shutil.rmtree(repo, ignore_errors=True)
            return synth_repo(ctx, repo), f"repository synthesized from the QEMU-made chain ({e})"

    def real_repo(d, repo):
        live = os.path.join(d, "live.qcow2")
        log("setup: building the chain repository (full + incrementals)")
        shutil.copyfile(ctx.p("chain", "base.qcow2"), live)
        qb_run(ctx, "backup", live, "--repo", repo, "--full", "--bitmap", "bench")
        names = [os.path.basename(c)[:-6] for c in ctx.info["chain"][1:]]
        for name in names:
            with open(ctx.p("replay", f"{name}.cmds"), "rb") as f:
                sh(["qemu-io", "-t", "writeback", "-f", "qcow2", live], stdin=f, stdout=subprocess.DEVNULL)
            qb_run(ctx, "backup", live, "--repo", repo, "--bitmap", "bench", "--incremental")
        layers = manifest_layers(repo)
        bad = qcompare(layers[-1], ctx.top)
        if bad:
            raise NotAvailable(f"setup: repository's latest layer differs from the chain ({bad})")
        os.unlink(live)
        return repo
    return ctx.once("chain_repo", build)


def synth_repo(ctx, repo):
    import hashlib
    log("setup: synthesizing a repository from the chain files")
    os.makedirs(repo)
    layers = []
    prev = None
    for i, src in enumerate(ctx.info["chain"]):
        name = f"full-20260101T000000Z.qcow2" if i == 0 else f"incr-20260101T000000Z-{i}.qcow2"
        dst = os.path.join(repo, name)
        shutil.copyfile(src, dst)
        if prev:
            sh(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", prev, "-F", "qcow2", dst])
        h = hashlib.sha256()
        with open(dst, "rb") as f:
            for block in iter(lambda: f.read(8 * MiB), b""):
                h.update(block)
        layers.append({"file": name, "kind": "full" if i == 0 else "incremental",
                       "created": f"2026-01-01T00:00:{i:02d}Z", "bytes-copied": gen.data_bytes(dst, depth0_only=True),
                       "file-size": os.path.getsize(dst), "virtual-size": ctx.info["params"]["disk"],
                       "sha256": h.hexdigest()})
        prev = name
    manifest = {"format": "qbackup-repository", "version": 1, "id": "be0c4be0c4be0c4b",
                "virtual-size": ctx.info["params"]["disk"], "cluster-size": gen.CLUSTER, "bitmap": "bench",
                "source": ctx.top, "layers": layers}
    with open(os.path.join(repo, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    r = subprocess.run([ctx.qb, "list", repo], capture_output=True, text=True)
    if r.returncode != 0:
        raise NotAvailable(f"setup: qbackup list refuses the synthesized repository: {(r.stderr or r.stdout).strip()[:150]}")
    return repo


def bitmap_image(ctx):
    """A private copy of the 1 TiB image for the bitmap-writing pairs."""
    def build():
        d = fresh_dir(os.path.join(ctx.setup_dir, "bitmaps"))
        img = os.path.join(d, "big.qcow2")
        shutil.copyfile(ctx.p("big.qcow2"), img)
        return img
    return ctx.once("bitmap_image", build)


# ---------------------------------------------------------------- pairs

class Pair:
    def __init__(self, name, title, qb, peer, target=None, data=None, limit=None,
                 needs=(), setup=None, reset=None, verify=None, note="", ok_rc=(0,), teardown=None):
        self.name, self.title = name, title
        self.qb_argv, self.peer_argv = qb, peer  # fn(ctx, env) -> argv
        self.target = target
        self.data = data  # fn(ctx) -> bytes of guest data moved, or None
        self.limit = limit  # "read" | "write" | None
        self.needs = needs  # qbackup subcommand paths, e.g. (("bitmap", "add"),)
        self.setup = setup  # fn(ctx) -> env dict (once; may raise NotAvailable)
        self.reset = reset  # fn(ctx, env, side, rundir) -> None (untimed, before every run)
        self.verify = verify  # fn(ctx, env, side, rundir) -> None or message (after warm-up)
        self.note = note
        self.ok_rc = ok_rc  # exit statuses that still count as a timed run (0 is the expected one)
        self.teardown = teardown  # fn(ctx, env) -> None (once, after the pair, even after a failure)


def out_reset(ctx, env, side, rundir):
    fresh_dir(rundir)


def flatten_pair(fmt):
    def verify(ctx, env, side, rundir):
        return qcompare(ctx.top, os.path.join(rundir, f"out.{fmt}"))
    return Pair(
        f"flatten-{fmt}", f"flatten 5-overlay chain -> {fmt}",
        qb=lambda ctx, env, rd: [ctx.qb, "flatten", ctx.top, os.path.join(rd, f"out.{fmt}"), "--format", fmt],
        peer=lambda ctx, env, rd: ["qemu-img", "convert", "-O", fmt, ctx.top, os.path.join(rd, f"out.{fmt}")],
        target=0.95, data=lambda ctx: ctx.info["data_bytes_chain"], limit="read",
        needs=(("flatten",),), reset=out_reset, verify=verify)


def flatten_compressed_pair(codec, target):
    """flatten --compress CODEC against qemu-img convert -c with the same codec."""
    peer_opts = ["-c"] + (["-o", "compression_type=zstd"] if codec == "zstd" else [])

    def verify(ctx, env, side, rundir):
        return qcompare(ctx.top, os.path.join(rundir, "out.qcow2"))
    return Pair(
        f"flatten-{codec}", f"flatten 5-overlay chain -> qcow2, {codec}-compressed",
        qb=lambda ctx, env, rd: [ctx.qb, "flatten", ctx.top, os.path.join(rd, "out.qcow2"), "--compress", codec],
        peer=lambda ctx, env, rd: ["qemu-img", "convert", "-O", "qcow2", *peer_opts, ctx.top,
                                   os.path.join(rd, "out.qcow2")],
        target=target, data=lambda ctx: ctx.info["data_bytes_chain"], limit="read",
        needs=(("flatten",),), reset=out_reset, verify=verify)


def restore_pair(fmt):
    def setup(ctx):
        ctx.need("restore")
        repo, note = chain_repo(ctx)
        return dict(repo=repo, latest=manifest_layers(repo)[-1], note=note)

    def verify(ctx, env, side, rundir):
        return qcompare(ctx.top, os.path.join(rundir, f"out.{fmt}"))
    return Pair(
        f"restore-{fmt}", f"restore latest of 6-layer repo -> {fmt}",
        qb=lambda ctx, env, rd: [ctx.qb, "restore", env["repo"], "--to", os.path.join(rd, f"out.{fmt}"), "--format", fmt],
        peer=lambda ctx, env, rd: ["qemu-img", "convert", "-O", fmt, env["latest"], os.path.join(rd, f"out.{fmt}")],
        target=0.95, data=lambda ctx: ctx.info["data_bytes_chain"], limit="read",
        needs=(("restore",),), setup=setup, reset=out_reset, verify=verify)


# qemu-img convert writes its output with cache mode "unsafe" (no flush at all) unless told
# otherwise; a backup must be on disk before the bitmap is cleared, so qbackup fsyncs. The
# "-durable" pairs give the peer `-t writeback` (it then flushes its output on close, as
# qemu-img commit does by default): the fair comparison, so they carry the targets (issue 13);
# the pairs against the unflushed peer are context.
DURABLE_NOTE = "peer run with -t writeback, so it flushes its output as qbackup does"


def full_backup_pair(comp, target, durable=False):
    """`target` applies as given: the durable pair carries it for uncompressed backups."""
    peer_opts = {"none": [], "zstd": ["-c", "-o", "compression_type=zstd"], "zlib": ["-c"]}[comp]
    if durable:
        peer_opts = ["-t", "writeback", *peer_opts]

    def reset(ctx, env, side, rundir):
        fresh_dir(rundir)
        # a throw-away overlay on the chain, so the bitmap a full backup adds lands there
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", ctx.top, "-F", "qcow2",
            os.path.join(rundir, "disk.qcow2")])

    def verify(ctx, env, side, rundir):
        if side == "qb":
            out = manifest_layers(os.path.join(rundir, "repo"))[-1]
        else:
            out = os.path.join(rundir, "out.qcow2")
        return qcompare(ctx.top, out)
    return Pair(
        f"backup-full-{comp}" + ("-durable" if durable else ""),
        f"full backup, {'uncompressed' if comp == 'none' else comp}" + (" (durable peer)" if durable else ""),
        qb=lambda ctx, env, rd: [ctx.qb, "backup", os.path.join(rd, "disk.qcow2"), "--repo", os.path.join(rd, "repo"),
                                 "--full", "--compress", comp],
        peer=lambda ctx, env, rd: ["qemu-img", "convert", "-O", "qcow2", *peer_opts, os.path.join(rd, "disk.qcow2"),
                                   os.path.join(rd, "out.qcow2")],
        target=target, data=lambda ctx: ctx.info["data_bytes_chain"], limit="write",
        needs=(("backup",),), reset=reset, verify=verify, note=DURABLE_NOTE if durable else "")


def incremental_pair(durable=False):
    ov4 = lambda ctx: ctx.p("chain", "ov4.qcow2")

    def setup(ctx):
        ctx.need("backup")
        d = fresh_dir(os.path.join(ctx.setup_dir, "incremental"))
        disk = os.path.join(d, "disk.qcow2")
        pristine = os.path.join(d, "repo-pristine")
        # the disk as it was before top's writes: an empty overlay on ov4; a full backup
        # of it is the repository's state before the incremental
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", ov4(ctx), "-F", "qcow2", disk])
        log("setup: full backup for the incremental pair")
        qb_run(ctx, "backup", disk, "--repo", pristine, "--full", "--bitmap", "inc")
        return dict(disk=disk, pristine=pristine, repo=os.path.join(d, "repo"))

    def reset(ctx, env, side, rundir):
        fresh_dir(rundir)
        # the disk after top's writes: top (whose bitmap "inc" marks exactly them) on ov4
        copy_image(ctx.top, env["disk"], backing=ov4(ctx))
        if side == "qb":
            clone_tree(env["pristine"], env["repo"])

    def verify(ctx, env, side, rundir):
        out = manifest_layers(env["repo"])[-1] if side == "qb" else os.path.join(rundir, "inc.qcow2")
        return qcompare(ctx.top, out)
    cache = ["-t", "writeback"] if durable else []
    return Pair(
        "backup-incremental" + ("-durable" if durable else ""),
        "incremental backup of top's writes" + (" (durable peer)" if durable else ""),
        qb=lambda ctx, env, rd: [ctx.qb, "backup", env["disk"], "--repo", env["repo"], "--bitmap", "inc", "--incremental"],
        peer=lambda ctx, env, rd: ["qemu-img", "convert", *cache, "-O", "qcow2", "-B", ov4(ctx), "-F", "qcow2", env["disk"],
                                   os.path.join(rd, "inc.qcow2")],
        target=0.9 if durable else None, data=lambda ctx: ctx.info["data_bytes_top"], limit="write",
        needs=(("backup",),), setup=setup, reset=reset, verify=verify, note=DURABLE_NOTE if durable else "")


def commit_pair():
    def reset(ctx, env, side, rundir):
        fresh_dir(rundir)
        copy_image(ctx.p("chain", "ov4.qcow2"), os.path.join(rundir, "ov4.qcow2"), backing=ctx.p("chain", "ov3.qcow2"))
        copy_image(ctx.top, os.path.join(rundir, "top.qcow2"))  # backing "ov4.qcow2" (relative)

    def verify(ctx, env, side, rundir):
        return qcompare(ctx.top, os.path.join(rundir, "ov4.qcow2"))
    return Pair(
        "commit", "commit top into ov4",
        qb=lambda ctx, env, rd: [ctx.qb, "commit", os.path.join(rd, "top.qcow2")],
        peer=lambda ctx, env, rd: ["qemu-img", "commit", os.path.join(rd, "top.qcow2")],
        target=1.0, data=lambda ctx: ctx.info["data_bytes_top"], limit="write",
        needs=(("commit",),), reset=reset, verify=verify,
        note="qemu-img commit also empties top afterwards (its default)")


def merge_pair():
    def setup(ctx):
        ctx.need("merge")
        repo, note = chain_repo(ctx)
        layers = manifest_layers(repo)
        data = gen.data_bytes(layers[1], depth0_only=True)
        return dict(repo=repo, n=len(layers), data=data, note=note)

    def reset(ctx, env, side, rundir):
        fresh_dir(rundir)
        shutil.copytree(env["repo"], os.path.join(rundir, "repo"))

    def verify(ctx, env, side, rundir):
        layers = manifest_layers(os.path.join(rundir, "repo"))
        bad = qcompare(ctx.top, layers[-1])
        if bad is None and side == "qb" and len(layers) != env["n"] - 1:
            bad = f"{len(layers)} layers after merge --keep {env['n'] - 1}"
        return bad
    return Pair(
        "merge", "merge --keep N-1 (fold full+inc1)",
        qb=lambda ctx, env, rd: [ctx.qb, "merge", os.path.join(rd, "repo"), "--keep", str(env["n"] - 1)],
        peer=lambda ctx, env, rd: ["qemu-img", "commit", manifest_layers(os.path.join(rd, "repo"))[1]],
        target=1.0, data=None, limit="write",
        needs=(("merge",),), setup=setup, reset=reset, verify=verify)


def check_pair(label, image):
    def verify(ctx, env, side, rundir):
        return None  # exit status 0 is checked for every run
    return Pair(
        f"check-{label}", f"check {label} image",
        qb=lambda ctx, env, rd: [ctx.qb, "check", ctx.p(*image)],
        peer=lambda ctx, env, rd: ["qemu-img", "check", ctx.p(*image)],
        target=1.0, needs=(("check",),), ok_rc=(0, 2, 3))


def compare_pair():
    return Pair(
        "compare", "compare chain with its flat copy",
        qb=lambda ctx, env, rd: [ctx.qb, "compare", ctx.top, ctx.p("chain", "flat.qcow2")],
        peer=lambda ctx, env, rd: ["qemu-img", "compare", ctx.top, ctx.p("chain", "flat.qcow2")],
        target=1.0, data=lambda ctx: 2 * ctx.info["data_bytes_chain"], limit="read",
        needs=(("compare",),), ok_rc=(0, 1))


def norm_map(path):
    with open(path) as f:
        ext = json.load(f)
    out = []
    for e in ext:
        key = (e.get("depth"), bool(e.get("present")), bool(e.get("zero")), bool(e.get("data")))
        if out and out[-1][2] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], key])
    return out


def map_pair(label, image, target):
    def verify(ctx, env, side, rundir):
        if side != "peer" or not os.path.exists(os.path.join(rundir, "..", "qb", "stdout")):
            return None
        try:
            a, b = norm_map(os.path.join(rundir, "..", "qb", "stdout")), norm_map(os.path.join(rundir, "stdout"))
        except (OSError, ValueError) as e:
            return f"map JSON unreadable: {e}"
        if a != b:
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"map differs from qemu-img's at extent {first} ({len(a)} vs {len(b)} extents)"
        return None
    return Pair(
        f"map-{label}", f"map --output json, {label}",
        qb=lambda ctx, env, rd: [ctx.qb, "map", "--output", "json", ctx.p(*image)],
        peer=lambda ctx, env, rd: ["qemu-img", "map", "--output=json", ctx.p(*image)],
        target=target, needs=(("map",),), verify=verify)


def bitmap_add_pair():
    def setup(ctx):
        return dict(img=bitmap_image(ctx))

    def reset(ctx, env, side, rundir):
        sh(["qemu-img", "bitmap", "--remove", env["img"], "benchadd"], check=False,
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return Pair(
        "bitmap-add-1t", "bitmap add, 1 TiB image",
        qb=lambda ctx, env, rd: [ctx.qb, "bitmap", "add", env["img"], "benchadd"],
        peer=lambda ctx, env, rd: ["qemu-img", "bitmap", "--add", env["img"], "benchadd"],
        target=1.0, needs=(("bitmap", "add"),), setup=setup, reset=reset)


def bitmap_merge_pair():
    def setup(ctx):
        return dict(img=bitmap_image(ctx))

    def reset(ctx, env, side, rundir):
        img = env["img"]
        sh(["qemu-img", "bitmap", "--remove", img, "tgt"], check=False,
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sh(["qemu-img", "bitmap", "--add", img, "tgt"])
        sh(["qemu-img", "bitmap", "--merge", "b3", img, "tgt"])
    return Pair(
        "bitmap-merge-1t", "bitmap merge b1 into tgt, 1 TiB",
        qb=lambda ctx, env, rd: [ctx.qb, "bitmap", "merge", env["img"], "tgt", "--source", "b1"],
        peer=lambda ctx, env, rd: ["qemu-img", "bitmap", "--merge", "b1", env["img"], "tgt"],
        target=1.0, needs=(("bitmap", "merge"),), setup=setup, reset=reset)


def extents_from_qb(path):
    with open(path) as f:
        ext = json.load(f)
    return merge_extents((e["start"], e["length"], bool(e["dirty"])) for e in ext)


def extents_from_nbdinfo(path):
    ext = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].isdigit():
                ext.append((int(parts[0]), int(parts[1]), bool(int(parts[2]) & 1)))
    return merge_extents(ext)


def merge_extents(ext):
    out = []
    for s, l, d in ext:
        if out and out[-1][2] == d and out[-1][0] + out[-1][1] == s:
            out[-1][1] += l
        else:
            out.append([s, l, d])
    return out


def bitmap_dump_pair():
    def peer(ctx, env, rd):
        sock = os.path.join(rd, "nbd.sock")
        img = ctx.p("big.qcow2")
        script = (f"qemu-nbd -r -f qcow2 -B b1 -k '{sock}' --fork '{img}' && "
                  f"nbdinfo --map=qemu:dirty-bitmap:b1 'nbd+unix:///?socket={sock}'")
        return ["bash", "-c", script]

    def verify(ctx, env, side, rundir):
        if side != "peer" or not os.path.exists(os.path.join(rundir, "..", "qb", "stdout")):
            return None
        try:
            a = extents_from_qb(os.path.join(rundir, "..", "qb", "stdout"))
            b = extents_from_nbdinfo(os.path.join(rundir, "stdout"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"dump output unreadable: {e}"
        if a != b:
            return f"dirty extents differ from nbdinfo's ({len(a)} vs {len(b)} extents)"
        return None
    return Pair(
        "bitmap-dump-1t", "bitmap dump b1, 1 TiB (vs qemu-nbd+nbdinfo)",
        qb=lambda ctx, env, rd: [ctx.qb, "bitmap", "dump", ctx.p("big.qcow2"), "b1", "--output", "json"],
        peer=peer, target=1.0, needs=(("bitmap", "dump"),), reset=out_reset, verify=verify,
        note="peer time includes starting and stopping qemu-nbd")


class QMP:
    """A minimal QMP client for the live pair's untimed set-up: one command at a time,
    events kept until asked for."""

    def __init__(self, path, timeout=30):
        import socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rwb")
        self.events = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP: QEMU closed the monitor")
        return json.loads(line)

    def execute(self, cmd, **args):
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
            elif "error" in r:
                raise RuntimeError(f"QMP {cmd}: {r['error'].get('desc')}")
            elif "return" in r:
                return r["return"]

    def wait_event(self, name, key, value):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] == name and e.get("data", {}).get(key) == value:
                    del self.events[i]
                    return
            self.events.append(self._read())

    def close(self):
        self.sock.close()


def verify_live_output(ctx, env, side, rundir):
    """The check of both live pairs (QMP and libvirt): the run's output — qbackup's layer, the
    last in its repository, or the peer's raw file — holds the guest data of the VM's disk,
    an empty overlay on env["base"]."""
    if side == "qb":
        out, fmt = manifest_layers(os.path.join(rundir, "repo"))[-1], "qcow2"
    else:
        out, fmt = os.path.join(rundir, "out.raw"), "raw"
    r = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", fmt, env["base"], out],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"qemu-img compare: {(r.stdout + r.stderr).strip()[:150]}"


def live_pair():
    """qbackup backup --qmp of a running VM (qemu-system-x86_64 -S, TCG, no guest OS) against
    nbdcopy of the same kind of fleecing export (live-backup.md §3.1: a qcow2 overlay backed
    by the disk, blockdev-backup sync=none, a read-only NBD export on a unix socket), set up
    untimed by the bench over QMP. Both outputs are flushed: qbackup fsyncs its layer,
    the peer runs `nbdcopy URI FILE && sync -f FILE`."""
    def setup(ctx):
        ctx.need("backup")
        if not shutil.which("qemu-system-x86_64") or not shutil.which("nbdcopy"):
            raise NotAvailable("n/a: qemu-system-x86_64 or nbdcopy missing (run: bash scripts/install-deps.sh)")
        d = fresh_dir(os.path.join(ctx.setup_dir, "live"))
        env = dict(dir=d, disk=os.path.join(d, "disk.qcow2"), base=ctx.p("chain", "base.qcow2"),
                   qb_qmp=os.path.join(d, "qbackup.qmp"), bench_qmp=os.path.join(d, "bench.qmp"),
                   pidfile=os.path.join(d, "qemu.pid"), fleece=os.path.join(d, "bench-fleece.qcow2"),
                   nbd_sock=os.path.join(d, "bench-nbd.sock"), exported=False)
        # the guest's disk: an empty overlay on base (4 GiB, ~2 GiB written by qemu-io), so
        # the bitmap a full backup adds lands in a throw-away file
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", env["base"], "-F", "qcow2", env["disk"]])
        sh(["qemu-system-x86_64", "-M", "q35", "-S", "-m", "64", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-daemonize", "-pidfile", env["pidfile"],
            "-qmp", f"unix:{env['qb_qmp']},server=on,wait=off", "-qmp", f"unix:{env['bench_qmp']},server=on,wait=off",
            "-blockdev", f"driver=file,node-name=file0,filename={env['disk']}",
            "-blockdev", "driver=qcow2,node-name=disk0,file=file0",
            "-device", "virtio-blk-pci,drive=disk0,id=vda"])
        try:
            env["qmp"] = QMP(env["bench_qmp"])
        except (OSError, RuntimeError):
            kill_qemu(env)
            raise
        return env

    def kill_qemu(env):
        """Waits up to 5 s for QEMU to exit after `quit`, then kills it by its pid."""
        try:
            with open(env["pidfile"]) as f:
                pid = int(f.read().strip())
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, 9)
        except (OSError, ValueError):
            pass  # QEMU has exited

    def unexport(env):
        if not env["exported"]:
            return
        q = env["qmp"]
        q.execute("block-export-del", id="bench", mode="hard")
        q.wait_event("BLOCK_EXPORT_DELETED", "id", "bench")
        q.execute("block-job-cancel", device="bench-job", force=True)
        q.wait_event("BLOCK_JOB_CANCELLED", "device", "bench-job")
        q.execute("blockdev-del", **{"node-name": "bench-fleece"})
        q.execute("nbd-server-stop")
        os.unlink(env["fleece"])
        env["exported"] = False

    def reset(ctx, env, side, rundir):
        fresh_dir(rundir)
        unexport(env)
        q = env["qmp"]
        # every run starts from a disk without bitmaps (a full backup adds one)
        for node in q.execute("query-named-block-nodes", flat=True):
            if node.get("node-name") == "disk0":
                for b in node.get("dirty-bitmaps", []):
                    if b.get("name"):
                        q.execute("block-dirty-bitmap-remove", node="disk0", name=b["name"])
        if side == "peer":
            size = json.loads(subprocess.run(["qemu-img", "info", "--output=json", env["base"]], check=True,
                                             capture_output=True).stdout)["virtual-size"]
            sh(["qemu-img", "create", "-q", "-f", "qcow2", env["fleece"], str(size)])
            q.execute("blockdev-add", driver="qcow2", discard="unmap", backing="disk0",
                      file={"driver": "file", "filename": env["fleece"]}, **{"node-name": "bench-fleece"})
            q.execute("nbd-server-start", addr={"type": "unix", "data": {"path": env["nbd_sock"]}})
            q.execute("transaction", actions=[{"type": "blockdev-backup", "data": {
                "job-id": "bench-job", "device": "disk0", "target": "bench-fleece", "sync": "none",
                "filter-node-name": "bench-cbw"}}])
            q.execute("block-export-add", type="nbd", id="bench", name="bench", writable=False,
                      **{"node-name": "bench-fleece"})
            env["exported"] = True

    def teardown(ctx, env):
        try:
            unexport(env)
            env["qmp"].execute("quit")
        except (OSError, RuntimeError) as e:
            log(f"live: QEMU clean-up: {e}")
        env["qmp"].close()
        kill_qemu(env)

    return Pair(
        "backup-live-full", "live full backup of a running VM (QMP fleecing) vs nbdcopy",
        qb=lambda ctx, env, rd: [ctx.qb, "backup", "--qmp", env["qb_qmp"], "--repo", os.path.join(rd, "repo"),
                                 "--full", "--compress", "none"],
        peer=lambda ctx, env, rd: ["sh", "-c", 'nbdcopy "$0" "$1" && sync -f "$1"',
                                   f"nbd+unix:///bench?socket={env['nbd_sock']}", os.path.join(rd, "out.raw")],
        target=1.25, data=lambda ctx: ctx.info["data_bytes_base"], limit="write",
        needs=(("backup",),), setup=setup, reset=reset, verify=verify_live_output, teardown=teardown,
        note="target 1.25 = qbackup at least 0.8x nbdcopy's throughput; peer's fleecing set up untimed, "
             "qbackup's (overlay, job, export, clean-up) timed")


# ---------------------------------------------------------------- libvirt pair

class BenchLibvirt:
    """libvirt for the libvirt pair (live-backup.md part 2): qemu:///system when a libvirtd
    answers already, else virtlogd and libvirtd started here in the foreground and stopped by
    their PIDs (as the tests' LibvirtDaemon does); one paused TCG domain with no guest OS."""
    URI = "qemu:///system"

    def __init__(self):
        self.children = []
        if self.answers():
            return
        for daemon in ("virtlogd", "libvirtd"):
            if daemon == "virtlogd" and subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True).returncode == 0:
                continue
            self.children.append(subprocess.Popen([shutil.which(daemon) or f"/usr/sbin/{daemon}"],
                                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL))
        deadline = time.time() + 60  # the first start probes QEMU's capabilities
        while not self.answers():
            if time.time() > deadline or any(c.poll() is not None for c in self.children):
                self.stop()
                raise NotAvailable("setup: libvirtd did not start")
            time.sleep(0.2)

    def answers(self):
        return subprocess.run(["virsh", "-c", self.URI, "version"], capture_output=True).returncode == 0

    def virsh(self, *args, check=True):
        r = subprocess.run(["virsh", "-q", "-c", self.URI, *args], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()[:200]}")
        return r

    def stop(self):
        for c in reversed(self.children):  # by PID, newest first
            if c.poll() is None:
                c.terminate()
                try:
                    c.wait(15)
                except subprocess.TimeoutExpired:
                    c.kill()
                    c.wait()
        self.children = []


def libvirt_pair():
    """qbackup backup --libvirt of a running (paused, TCG, no guest OS) libvirt domain, full,
    against nbdcopy of the same kind of pull-mode export: `virsh backup-begin` (mode pull, unix
    socket, scratch file, no checkpoint) set up untimed by the bench. qbackup's run includes
    its whole libvirt work (checkpoint with the job, export, abort, checkpoint clean-up) and the
    fsync of its layer; the peer runs `nbdcopy URI FILE && sync -f FILE`."""
    def setup(ctx):
        ctx.need("backup")
        for tool in ("virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "nbdcopy"):
            if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
                raise NotAvailable(f"n/a: {tool} missing (run: bash scripts/install-deps.sh)")
        r = subprocess.run([ctx.qb, "backup", "--help"], capture_output=True, text=True)
        if "--libvirt" not in r.stdout:
            raise NotAvailable("n/a: qbackup backup has no --libvirt yet")
        d = fresh_dir(os.path.join(ctx.setup_dir, "libvirt"))
        env = dict(dir=d, disk=os.path.join(d, "disk.qcow2"), base=ctx.p("chain", "base.qcow2"),
                   sock_dir=os.path.join(d, "sock"), domain=f"qbackup-bench-{os.getpid()}", exported=False)
        env["sock"] = os.path.join(env["sock_dir"], "nbd.sock")
        # the guest's disk: an empty overlay on base (4 GiB, ~2 GiB of data), as the live pair's
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", env["base"], "-F", "qcow2", env["disk"]])
        env["lv"] = lv = BenchLibvirt()
        xml = os.path.join(d, "domain.xml")
        with open(xml, "w") as f:
            f.write(f"""<domain type='qemu'>
  <name>{env['domain']}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{env['disk']}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
""")
        try:
            lv.virsh("define", xml)
            lv.virsh("start", env["domain"], "--paused")
            # the pull export's socket: in a folder the QEMU user (libvirt's DAC label) can write
            os.makedirs(env["sock_dir"], mode=0o750)
            label = lv.virsh("dumpxml", env["domain"]).stdout
            import re
            m = re.search(r"<seclabel type='dynamic' model='dac'[^>]*>\s*<label>\+?(\d+):\+?(\d+)</label>", label)
            if m:
                os.chown(env["sock_dir"], int(m.group(1)), int(m.group(2)))
            backup_xml = os.path.join(d, "backup.xml")
            with open(backup_xml, "w") as f:
                f.write(f"""<domainbackup mode='pull'>
  <server transport='unix' socket='{env['sock']}'/>
  <disks><disk name='vda' backup='yes' type='file' exportname='bench'>
    <scratch file='{os.path.join(d, "scratch-vda.qcow2")}'/>
  </disk></disks>
</domainbackup>
""")
            env["backup_xml"] = backup_xml
        except BaseException:
            teardown(ctx, env)
            raise
        return env

    def end_job(env):
        lv = env["lv"]
        if env["exported"]:
            lv.virsh("domjobabort", env["domain"], check=False)
            for _ in range(200):  # the job ends asynchronously
                if "Backup" not in lv.virsh("domjobinfo", env["domain"], check=False).stdout:
                    break
                time.sleep(0.05)
            env["exported"] = False
        # every run starts from a disk with no checkpoint (qbackup's full backup makes one)
        names = lv.virsh("checkpoint-list", env["domain"], "--name", "--topological", check=False).stdout.split()
        for name in reversed(names):
            lv.virsh("checkpoint-delete", env["domain"], name)

    def reset(ctx, env, side, rundir):
        fresh_dir(rundir)
        end_job(env)
        if side == "peer":
            env["lv"].virsh("backup-begin", env["domain"], env["backup_xml"])
            env["exported"] = True

    def teardown(ctx, env):
        lv = env.get("lv")
        if not lv:
            return
        try:
            end_job(env)
        except RuntimeError as e:
            log(f"libvirt: clean-up: {e}")
        lv.virsh("destroy", env["domain"], check=False)
        lv.virsh("undefine", env["domain"], "--checkpoints-metadata", check=False)
        lv.stop()

    return Pair(
        "backup-libvirt-full", "libvirt live full backup of a running domain (pull mode) vs nbdcopy",
        qb=lambda ctx, env, rd: [ctx.qb, "backup", "--libvirt", env["domain"], "--connect", BenchLibvirt.URI,
                                 "--repo", os.path.join(rd, "repo"), "--full", "--compress", "none"],
        peer=lambda ctx, env, rd: ["sh", "-c", 'nbdcopy "$0" "$1" && sync -f "$1"',
                                   f"nbd+unix:///bench?socket={env['sock']}", os.path.join(rd, "out.raw")],
        target=1.25, data=lambda ctx: ctx.info["data_bytes_base"], limit="write",
        needs=(("backup",),), setup=setup, reset=reset, verify=verify_live_output, teardown=teardown,
        note="target 1.25 = qbackup at least 0.8x nbdcopy's throughput; peer's pull export set up untimed "
             "(virsh backup-begin), qbackup's (checkpoint, job, export, abort, checkpoint clean-up) timed")


# ---------------------------------------------------------------- replication pairs (over ssh)

class BenchSSHD:
    """An OpenSSH server on a free port of 127.0.0.1 for the replication pairs, as the
    tests' SSHServer fixture starts it: host and client keys made by ssh-keygen in its own
    folder, a private config, `sshd -D -e -f CONFIG` by its absolute path, ready once a real
    `ssh … true` logs in, stopped by its PID."""

    def __init__(self, directory):
        import getpass
        import socket
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        if not os.path.exists(sshd) or not shutil.which("ssh") or not shutil.which("rsync"):
            raise NotAvailable("n/a: sshd, ssh or rsync missing (run: bash scripts/install-deps.sh)")
        self.dir = fresh_dir(directory)
        self.user = getpass.getuser()
        host_key, self.key = os.path.join(self.dir, "host_key"), os.path.join(self.dir, "client_key")
        for k in (host_key, self.key):
            sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k], stdout=subprocess.DEVNULL)
        shutil.copyfile(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        os.makedirs("/run/sshd", exist_ok=True)
        self.proc, last = None, ""
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            config = os.path.join(self.dir, "sshd_config")
            with open(config, "w") as f:
                f.write("\n".join([
                    f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
                    f"AuthorizedKeysFile {self.dir}/authorized_keys", "StrictModes no",
                    f"PidFile {self.dir}/sshd.pid", "UsePAM no", "UseDNS no", "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                    "MaxStartups 100:30:200"]) + "\n")
            log_path = os.path.join(self.dir, "sshd.log")
            with open(log_path, "w") as logf:
                self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", config], stdin=subprocess.DEVNULL,
                                             stdout=logf, stderr=subprocess.STDOUT)
            for _ in range(50):
                if self.proc.poll() is not None:
                    break
                r = subprocess.run(self.command().split() + [f"{self.user}@127.0.0.1", "true"],
                                   capture_output=True, timeout=10)
                if r.returncode == 0:
                    return
                time.sleep(0.1)
            last = first_line(log_path, 300)
            self.stop()
            if "Address already in use" not in open(log_path).read():
                break
        raise NotAvailable(f"setup: sshd did not start: {last}")

    def command(self, port=True, log_file=None):
        """The ssh client command line (rsync's -e, qbackup's --ssh-command); with log_file,
        ssh logs its "Transferred: sent N, received M bytes" line there."""
        words = ["ssh"] + (["-p", str(self.port)] if port else []) + [
            "-i", self.key, "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5"]
        words += ["-o", "LogLevel=VERBOSE", "-E", log_file] if log_file else ["-o", "LogLevel=ERROR"]
        return " ".join(words)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()  # by PID
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wire_bytes(log_file):
    """Bytes that crossed the network (both directions, encrypted, all of a side's ssh
    sessions): the sum of ssh's "Transferred: sent N, received M bytes" lines."""
    import re
    total = 0
    with open(log_file) as f:
        for m in re.finditer(r"Transferred: sent (\d+), received (\d+) bytes", f.read()):
            total += int(m.group(1)) + int(m.group(2))
    return total


def layers_equal(src, dst):
    """None when every layer file of repository src is in dst with the same bytes."""
    import filecmp
    for path in manifest_layers(src):
        other = os.path.join(dst, os.path.basename(path))
        if not os.path.exists(other) or not filecmp.cmp(path, other, shallow=False):
            return f"{os.path.basename(path)} differs at the other end"
    return None


def drop_last_point(repo):
    """Yesterday's state of a repository copy: its last layer (file, sidecar, manifest entry) removed."""
    path = os.path.join(repo, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    last = m["layers"].pop()
    for name in (last["file"], last["file"] + ".json"):
        if os.path.exists(os.path.join(repo, name)):
            os.unlink(os.path.join(repo, name))
    with open(path, "w") as f:
        json.dump(m, f, indent=1)


def replicate_pair(night):
    """qbackup replicate of the 6-layer repository to ssh://127.0.0.1 (a private sshd) against
    `rsync -a --sparse` of the folder over the same ssh followed by `sync -f` at the other end.
    first: into a folder that does not exist yet; night: the other end holds the first 5 points
    (qbackup: a replica of them; rsync: a copy of that folder) and gets the 6th. Bytes on the
    wire: ssh's own count of each side's sessions (qbackup's includes its `list`)."""
    name = "replicate-night" if night else "replicate-first"

    def setup(ctx):
        ctx.need("replicate")
        source = chain_repo(ctx)[0]
        env = dict(source=source, wire={})
        env["sshd"] = BenchSSHD(os.path.join(ctx.setup_dir, f"{name}-sshd"))
        try:
            if night:
                d = fresh_dir(os.path.join(ctx.setup_dir, name))
                env["yesterday"] = os.path.join(d, "yesterday")
                clone_tree(source, env["yesterday"])
                drop_last_point(env["yesterday"])
                env["base_qb"] = os.path.join(d, "replica")
                qb_run(ctx, "replicate", env["yesterday"], env["base_qb"], "--quiet", "--no-progress")
                env["base_peer"] = env["yesterday"]
                env["data"] = os.path.getsize(manifest_layers(source)[-1])
            else:
                env["data"] = sum(os.path.getsize(p) for p in manifest_layers(source))
        except BaseException:
            env["sshd"].stop()
            raise
        return env

    def reset(ctx, env, side, rundir):
        if night:
            src, dst = env["base_qb" if side == "qb" else "base_peer"], os.makedirs(os.path.join(rundir, "dest")) \
                or os.path.join(rundir, "dest")
            for f in os.listdir(src):  # layer files hard-linked (both sides only add files), the rest copied
                (os.link if f.endswith(".qcow2") else shutil.copy2)(os.path.join(src, f), os.path.join(dst, f))

    def qb(ctx, env, rd):
        s = env["sshd"]
        return [ctx.qb, "replicate", env["source"], f"ssh://{s.user}@127.0.0.1:{s.port}{rd}/dest",
                "--ssh-command", s.command(port=False, log_file=os.path.join(rd, "ssh.log")),
                "--remote-qbackup", ctx.qb, "--quiet", "--no-progress"]

    def peer(ctx, env, rd):
        s = env["sshd"]
        ssh = s.command(log_file=os.path.join(rd, "ssh.log"))
        return ["sh", "-c", 'rsync -a --sparse -e "$0" "$1/" "$2:$3/" && $0 "$2" sync -f "$3/manifest.json"',
                ssh, env["source"], f"{s.user}@127.0.0.1", os.path.join(rd, "dest")]

    def verify(ctx, env, side, rundir):
        dest = os.path.join(rundir, "dest")
        env["wire"][side] = wire_bytes(os.path.join(rundir, "ssh.log"))
        if len(env["wire"]) == 2:
            env["note"] = (f"bytes on the wire (ssh's count, both ways): qbackup {env['wire']['qb']:,}, "
                           f"rsync {env['wire']['peer']:,}; qbackup's stream is lz4, rsync runs without -z")
        bad = layers_equal(env["source"], dest)
        if bad or side == "peer":
            return bad
        r = subprocess.run([ctx.qb, "verify", dest], capture_output=True, text=True)
        return None if r.returncode == 0 else f"qbackup verify: {(r.stderr or r.stdout).strip()[:150]}"

    def teardown(ctx, env):
        env["sshd"].stop()

    title = ("one more night (6th point) to a replica of 5" if night else "first copy of the 6-layer repository") \
        + " over ssh vs rsync -a --sparse + sync -f"
    return Pair(name, title, qb=qb, peer=peer, target=1.0, limit="write", needs=(("replicate",),),
                setup=setup, reset=reset, verify=verify, teardown=teardown)


def all_pairs():
    return [
        # targets: issue 13's table
        flatten_pair("qcow2"), flatten_pair("raw"),
        flatten_compressed_pair("zlib", 0.5), flatten_compressed_pair("zstd", 0.4),
        restore_pair("qcow2"), restore_pair("raw"),
        full_backup_pair("none", None), full_backup_pair("zstd", 0.4), full_backup_pair("zlib", 0.5),
        full_backup_pair("none", 0.9, durable=True),
        incremental_pair(), incremental_pair(durable=True),
        commit_pair(), merge_pair(),
        check_pair("4g", ("chain", "base.qcow2")), check_pair("64g", ("sparse.qcow2",)), check_pair("1t", ("big.qcow2",)),
        compare_pair(),
        map_pair("chain", ("chain", "top.qcow2"), 1.0), map_pair("1t", ("big.qcow2",), 0.5),
        bitmap_add_pair(), bitmap_merge_pair(), bitmap_dump_pair(),
        live_pair(), libvirt_pair(),
        replicate_pair(night=False), replicate_pair(night=True),
    ]


# ---------------------------------------------------------------- running a pair

class Side:
    def __init__(self):
        self.times, self.rss, self.errors, self.wrong = [], [], [], None
        self.failed = None  # warm-up failure: the side is not timed


def run_once(ctx, pair, env, side, cold):
    rundir = os.path.join(ctx.scratch, pair.name, side)
    fresh_dir(rundir)
    if pair.reset:
        pair.reset(ctx, env, side, rundir)
    argv = (pair.qb_argv if side == "qb" else pair.peer_argv)(ctx, env, rundir)
    if cold:
        drop_caches()
    else:
        os.sync()
    rc, secs, rss = measure(argv, os.path.join(rundir, "stdout"), os.path.join(rundir, "stderr"))
    err = None
    if rc is None:
        err = "timed out"
    elif rc != 0:
        err = f"exit {rc}: {message(rundir)}"
    return rundir, secs, rss, err, rc


def run_pair(ctx, pair):
    res = dict(name=pair.name, title=pair.title, target=pair.target, note=pair.note, rows=[])
    qb_missing = None
    try:
        for words in pair.needs:
            ctx.need(*words)
    except NotAvailable as e:
        if not ctx.args.peers_anyway:
            res["na"] = str(e)
            log(f"{pair.name}: {e}")
            return res
        qb_missing = str(e)
    try:
        env = pair.setup(ctx) if pair.setup else {}
    except NotAvailable as e:
        res["na"] = str(e)
        log(f"{pair.name}: {e}")
        return res
    try:
        return timed_pair(ctx, pair, env, res, qb_missing)
    finally:
        if pair.teardown:
            pair.teardown(ctx, env)


def timed_pair(ctx, pair, env, res, qb_missing):
    data = pair.data(ctx) if pair.data else (env.get("data") if isinstance(env, dict) else None)
    res["data_bytes"] = data
    sides = {"qb": Side(), "peer": Side()}
    if qb_missing:
        sides["qb"].failed = qb_missing
    # warm-up, one run each, and check the results are right
    for s in ("qb", "peer"):
        if sides[s].failed:
            continue
        rundir, secs, rss, err, rc = run_once(ctx, pair, env, s, cold=False)
        if err and rc not in pair.ok_rc:
            sides[s].failed = err
            log(f"{pair.name}: {s} failed in warm-up: {err}")
            continue
        if err:
            sides[s].wrong = err
            log(f"{pair.name}: {s} output WRONG: {err}")
            continue
        if pair.verify:
            try:
                sides[s].wrong = pair.verify(ctx, env, s, rundir)
            except Exception as e:  # a broken output is a result, not a crash of the bench
                sides[s].wrong = f"verify failed: {e}"
            if sides[s].wrong:
                log(f"{pair.name}: {s} output WRONG: {sides[s].wrong}")
    if isinstance(env, dict) and env.get("note"):  # after the warm-up: its verify may add what it measured
        res["note"] = "; ".join(x for x in (res["note"], env["note"]) if x)
    for cache in ctx.args.cache:
        row = dict(cache=cache, qb=Side(), peer=Side())
        for s in ("qb", "peer"):
            row[s].failed, row[s].wrong = sides[s].failed, sides[s].wrong
        for i in range(ctx.args.runs):
            for s in ("qb", "peer"):  # alternate: A B A B ...
                if row[s].failed:
                    continue
                _, secs, rss, err, rc = run_once(ctx, pair, env, s, cold=(cache == "cold"))
                if err and rc not in pair.ok_rc:
                    row[s].errors.append(err)
                else:
                    row[s].times.append(secs)
                    row[s].rss.append(rss)
        log(f"{pair.name} [{cache}]: " + "  ".join(
            f"{s}={statistics.median(row[s].times):.3f}s" for s in ("qb", "peer") if row[s].times))
        res["rows"].append(row)
    shutil.rmtree(os.path.join(ctx.scratch, pair.name), ignore_errors=True)  # disk space
    return res


# ---------------------------------------------------------------- report

def target_text(target):
    """0.8 -> "0.8", 1.0 -> "1.0", 1.25 -> "1.25"."""
    text = f"{target:.2f}"
    return text[:-1] if text.endswith("0") else text


def summarize(res, speeds):
    """Table rows (list of dicts of strings) for one pair result."""
    rows = []
    if "na" in res:
        rows.append(dict(pair=res["name"], cache="", note=res["na"]))
        return rows
    for row in res["rows"]:
        r = dict(pair=res["name"], cache=row["cache"])
        med = {}
        for s in ("qb", "peer"):
            side = row[s]
            if side.failed:
                r[s] = "FAILED"
                continue
            if not side.times:
                r[s] = "no run"
                continue
            med[s] = statistics.median(side.times)
            r[s] = f"{med[s]:.3f} ({min(side.times):.3f}-{max(side.times):.3f})"
            r[s + "_rss"] = f"{max(side.rss) / 1024:.1f}"
            if res.get("data_bytes"):
                r[s + "_mibs"] = f"{res['data_bytes'] / MiB / med[s]:.0f}"
        notes = []
        for s, who in (("qb", "qbackup"), ("peer", "qemu")):
            side = row[s]
            if side.failed:
                notes.append(f"{who}: {side.failed}")
            if side.wrong:
                notes.append(f"{who} output WRONG: {side.wrong}")
            if side.errors:
                notes.append(f"{who}: {len(side.errors)} runs failed ({side.errors[0]})")
        if "qb" in med and "peer" in med:
            ratio = med["qb"] / med["peer"]
            r["ratio"] = f"{ratio:.2f}"
            if res["target"] is not None:
                ok = ratio <= res["target"] and not row["qb"].wrong
                r["result"] = "PASS" if ok else "MISS"
        if res["target"] is not None:
            r["target"] = f"<={target_text(res['target'])}"
        if "qb_rss" in r:
            r["rss_result"] = "PASS" if float(r["qb_rss"]) <= RSS_LIMIT_MIB else "MISS"
        limit = speeds.get(PAIR_LIMITS.get(res["name"]))
        if limit and "qb_mibs" in r and row["cache"] == "cold":
            r["pct"] = f"{100 * float(r['qb_mibs']) / limit:.0f}%"
        if res.get("note"):
            notes.append(res["note"])
        r["note"] = "; ".join(notes)
        rows.append(r)
    return rows


PAIR_LIMITS = {}

COLUMNS = [
    ("pair", "pair"), ("cache", "cache"),
    ("qb", "qbackup s: median (min-max)"), ("peer", "qemu s: median (min-max)"),
    ("ratio", "ratio"), ("target", "target"), ("result", "result"),
    ("qb_rss", "qbackup RSS MiB"), ("peer_rss", "qemu RSS MiB"), ("rss_result", "RSS<=64"),
    ("qb_mibs", "qbackup MiB/s"), ("peer_mibs", "qemu MiB/s"), ("pct", "qbackup % of disk"),
    ("note", "note"),
]


def render_text(rows):
    widths = {k: len(h) for k, h in COLUMNS if k != "note"}
    for r in rows:
        for k in widths:
            widths[k] = max(widths[k], len(r.get(k, "")))
    lines = ["  ".join(h.ljust(widths[k]) for k, h in COLUMNS if k != "note") + "  note"]
    for r in rows:
        if "qb" not in r and "peer" not in r:
            lines.append(r["pair"].ljust(widths["pair"]) + "  " + r.get("note", ""))
            continue
        lines.append("  ".join(r.get(k, "-").ljust(widths[k]) for k, _ in COLUMNS if k != "note")
                     + "  " + r.get("note", ""))
    return "\n".join(lines)


def render_markdown(rows, header):
    out = [header, "", "| " + " | ".join(h for _, h in COLUMNS) + " |",
           "|" + "|".join(" --- " for _ in COLUMNS) + "|"]
    for r in rows:
        if "qb" not in r and "peer" not in r:
            out.append(f"| {r['pair']} | | {r.get('note', '')} |" + " |" * (len(COLUMNS) - 3))
            continue
        out.append("| " + " | ".join(r.get(k, "-").replace("|", "\\|") or "-" for k, _ in COLUMNS) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------- main

def build_qbackup(args):
    if args.qbackup:
        return os.path.abspath(args.qbackup)
    if not args.skip_build:
        log("building qbackup (scripts/build-release.sh: release, static Swift runtime)")
        sh(["nice", "bash", "scripts/build-release.sh"], cwd=REPO)
    binpath = subprocess.run(["swift", "build", "-c", "release", "--static-swift-stdlib", "--show-bin-path"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()
    return os.path.join(binpath, "qbackup")


def main():
    ap = argparse.ArgumentParser(description="qbackup vs qemu-img benchmark")
    ap.add_argument("--quick", action="store_true", help="small workloads, 1 run each, for smoke tests")
    ap.add_argument("--only", action="append", default=[],
                    help="run only pairs whose name matches this glob (repeatable; substring if no wildcard)")
    ap.add_argument("--runs", type=int, help="timed runs per side and cache state (default 5, --quick 1)")
    ap.add_argument("--cache", default="warm,cold", help="warm, cold or warm,cold (default)")
    ap.add_argument("--seed", type=int, default=20240607)
    ap.add_argument("--dir", default=os.environ.get("QBACKUP_BENCH_DIR", "/tmp/qbackup-bench"),
                    help="work dir for workloads, scratch and results (default $QBACKUP_BENCH_DIR or /tmp/qbackup-bench)")
    ap.add_argument("--skip-build", action="store_true", help="use the existing release build")
    ap.add_argument("--qbackup", help="path of a qbackup binary to use instead of building")
    ap.add_argument("--markdown", help="also write the Markdown table to this file")
    ap.add_argument("--list", action="store_true", help="list the pairs and exit")
    ap.add_argument("--peers-anyway", action="store_true",
                    help="time the qemu side even when the qbackup command does not exist yet (baseline numbers)")
    args = ap.parse_args()
    args.runs = args.runs or (1 if args.quick else 5)
    args.cache = [c.strip() for c in args.cache.split(",") if c.strip()]

    pairs = all_pairs()
    if args.list:
        for p in pairs:
            print(f"{p.name:22} {p.title}")
        return 0
    if args.only:
        pats = [o if any(ch in o for ch in "*?[") else f"*{o}*" for o in args.only]
        pairs = [p for p in pairs if any(fnmatch.fnmatch(p.name, pat) for pat in pats)]
        if not pairs:
            log("no pair matches --only")
            return 2
    for p in pairs:
        PAIR_LIMITS[p.name] = p.limit

    missing = [t for t in ("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo") if not shutil.which(t)]
    if missing:
        log(f"missing tools: {', '.join(missing)} (run: bash scripts/install-deps.sh)")
        return 1
    if "cold" in args.cache and not can_drop_caches():
        log("cannot write /proc/sys/vm/drop_caches (not root?): cold-cache runs skipped")
        args.cache = [c for c in args.cache if c != "cold"]

    build_runner(os.path.abspath(args.dir))
    work = os.path.abspath(args.dir)
    os.makedirs(work, exist_ok=True)
    qb = build_qbackup(args)
    if not os.path.exists(qb):
        log(f"no qbackup binary at {qb}")
        return 1
    W = os.path.join(work, "workloads", f"{'quick' if args.quick else 'full'}-seed{args.seed}")
    info = gen.generate(W, args.seed, args.quick)
    ctx = Ctx(args, qb, info, work)
    fresh_dir(ctx.scratch)
    fresh_dir(ctx.setup_dir)

    machine = machine_info(qb)
    log("measuring raw disk speed")
    write_speed, read_speed = disk_speed(work, (256 if args.quick else 2048) * MiB)
    speeds = {"write": write_speed, "read": read_speed}
    log(f"disk: sequential write {write_speed:.0f} MiB/s (fdatasync), read {read_speed or 0:.0f} MiB/s (O_DIRECT)")

    results = []
    t_start = time.time()
    for p in pairs:
        log(f"--- {p.name}")
        results.append(run_pair(ctx, p))
    machine["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())

    rows = [r for res in results for r in summarize(res, speeds)]
    p_ = info["params"]
    header = "\n".join([
        f"qbackup benchmark, {machine['date']}, {'QUICK (small workloads)' if args.quick else 'full'} run, "
        f"seed {args.seed}, {args.runs} timed runs per side after 1 warm-up, alternating qbackup/qemu",
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['memory']} RAM, kernel {machine['kernel']}, "
        f"load avg at start {machine['load']}, at end {machine['load_end']}",
        f"tools: {machine['qemu']}; qbackup {machine['qbackup']}",
        f"disk ({work}): sequential write {write_speed:.0f} MiB/s (with fdatasync), "
        f"read {read_speed or 0:.0f} MiB/s (O_DIRECT, cold)",
        f"workloads: {p_['disk'] >> 20} MiB chain disk, {info['data_bytes_chain'] / MiB:.0f} MiB data in chain, "
        f"{info['data_bytes_top'] / MiB:.0f} MiB in top; {p_['sparse'] >> 30} GiB sparse; "
        f"{p_['big'] >> 30} GiB disk with {p_['big_writes']} writes, 3 bitmaps",
        f"ratio = qbackup median / qemu median (lower is better); RSS = largest process of the run; "
        f"MiB/s = guest data moved / median; % of disk (cold rows) = qbackup MiB/s / raw read speed "
        f"(flatten, restore, compare: outputs are not fsynced) or raw write speed (backup, commit, merge: durable)",
    ])
    busy = max(float(machine["load"].split()[0]), float(machine["load_end"].split()[0]))
    if busy > 0.5 * (os.cpu_count() or 1):
        header += (f"\nWARNING: the machine was busy (load average up to {busy:.1f} on {os.cpu_count()} CPUs): "
                   f"other work shares the CPUs and the disk, so these numbers are noisy")
    text = render_text(rows)
    md = render_markdown(rows, header.replace("\n", "  \n"))
    print()
    print(header)
    print()
    print(text)
    res_dir = os.path.join(work, "results")
    os.makedirs(res_dir, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    md_path = os.path.join(res_dir, f"bench-{stamp}.md")
    with open(md_path, "w") as f:
        f.write(md + "\n")
    with open(os.path.join(res_dir, f"bench-{stamp}.json"), "w") as f:
        json.dump(dict(machine=machine, speeds=speeds, workload=info, results=[
            dict({k: v for k, v in r.items() if k != "rows"},
                 rows=[dict(cache=row["cache"], **{s: vars(row[s]) for s in ("qb", "peer")}) for row in r["rows"]])
            for r in results]), f, indent=1)
    if args.markdown:
        shutil.copyfile(md_path, args.markdown)
    print(f"\nMarkdown: {md_path}  (took {time.time() - t_start:.0f} s)")
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    shutil.rmtree(ctx.setup_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
