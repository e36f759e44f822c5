import Foundation
import Testing
import TestSupport

/// QEMU's own corruption scenarios (tests/qemu-iotests 060, 271, 108), written
/// anew: the image is made with qemu-img/qemu-io, the bytes QEMU's test pokes are
/// poked, and `qbackup check [--repair all]` runs on one copy while `qemu-img
/// check [-r all]` runs on an identical one. Verdicts, counts, the repaired guest
/// data and the corrupt bit must agree, and qemu-img must find our repair clean.
@Suite struct QemuRepairScenarioTests {
    struct Scenario: CustomTestStringConvertible, Sendable {
        var name: String
        /// Whether check (without repair) must give qemu-img's exit status and counts.
        /// Where qemu-img cannot finish the check (exit 1) we still check and repair.
        var sameVerdict = true
        /// Whether qemu-img's repair leaves a clean image. Where it cannot (a snapshot's L1 table
        /// is lost), ours must leave the same verdict, the same guest data and write nothing worse.
        var repairable = true
        /// Whether read-only commands must read the image (with a warning) because qemu-img info does.
        var readable = false
        /// Where qemu-img's own repair fails (exit 1: its metadata overlap check stops its writes),
        /// ours must finish (exit 2: the snapshot's loss is reported, the leaks are freed).
        var qemuRepairFails = false
        /// A deliberate divergence: qemu-img's repair fails (exit 1, its overlap check marks the image
        /// corrupt) where ours finishes (exit 0) with the result qemu-img's own successful repair
        /// gives for the same kind of damage, and qemu-img check finds it clean.
        var oursRepairsWhereQemuImgFails = false
        var testDescription: String { name }
    }

    // Offsets of a fresh 64 MiB image with 64 KiB clusters (as 060 assumes).
    static let refcountTable: UInt64 = 0x10000, refcountBlock: UInt64 = 0x20000
    static let l1: UInt64 = 0x30000, l2: UInt64 = 0x40000

    /// Makes the damaged image at `path` for `name`.
    static func make(_ name: String, _ path: String, _ dir: TempDir) throws {
        func fresh(_ options: [String] = []) throws {
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", (["compat=1.1"] + options).joined(separator: ","), path, "64M")
        }
        func withData() throws {
            try fresh()
            try Tools.qemuIO(path, format: "qcow2", ["write -P 0x11 0 128k", "write -P 0x22 1M 64k"])
        }
        /// Data, an internal snapshot of it, then different data (the snapshot keeps its own L1 and L2).
        func withSnapshot() throws {
            try withData()
            try Tools.qemuImg("snapshot", "-c", "s1", path)
            try Tools.qemuIO(path, format: "qcow2", ["write -P 0x33 0 64k"])
        }
        func u64(_ path: String, at offset: UInt64) throws -> UInt64 {
            try peek(path, at: offset, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        }
        if let write = iotest026[name] { return try write.make(path, dir) }
        switch name {
        case "060 L2 reference into the L1 table":
            try withData()
            try poke(path, at: l1, be(UInt64(0x8000_0000_0000_0000) | l1))
        case "060 cluster data reference into refcount block":
            try fresh()
            // An L2 table at 0x40000 whose first entry points at the refcount block.
            try FileHandle(forWritingTo: URL(fileURLWithPath: path)).truncate(atOffset: l2 + 65536)
            try poke(path, at: l1, be(UInt64(0x8000_0000_0004_0000)))
            try poke(path, at: refcountBlock + 8, be(UInt16(1)))
            try poke(path, at: l2, be(UInt64(0x8000_0000_0002_0000)))
        case "060 data in refcount block, refcount matching":
            try make("060 cluster data reference into refcount block", path, dir)
            try poke(path, at: refcountBlock + 4, be(UInt16(2)))
        case "271 unaligned cluster, no allocated subclusters":
            let base = dir.file("base.raw")
            try Tools.qemuImg("create", "-q", "-f", "raw", base, "128k")
            try Tools.qemuIO(base, format: "raw", ["write -P 0xff 0 128k"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-F", "raw", "-b", "base.raw", path)
            try Tools.qemuIO(path, format: "qcow2", ["write -q -P 1 4k 2k", "write -q -z 4k 2k"])
            // The host offset 0x50000 becomes 0x50200.
            try poke(path, at: l2 + 6, [0x02])
        case "060 write to unaligned preallocated zero cluster":
            try fresh()
            try Tools.qemuIO(path, format: "qcow2", ["write 0 64k", "discard 0 64k"])
            try poke(path, at: l2, be(UInt64(0x8000_0000_0000_2a01)))
            // QEMU refuses the write and marks the image corrupt.
            let write = try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write 0 64k", path])
            #expect(write.stdout.contains("write failed") || write.stderr.contains("write failed"))
        case "corrupt bit on a consistent image":
            try withData()
            try poke(path, at: 79, [0x02])
        case "108 refcount_table_clusters 0":
            try withData()
            try poke(path, at: 56, be(UInt32(0)))
        case "refcount table entry past the end of the file":
            try withData()
            try poke(path, at: refcountTable, be(UInt64(0x1000_0000)))
        case "refcount table entry 0x7fff…":
            try withData()
            try poke(path, at: refcountTable, be(UInt64(0x7fff_ffff_ffff_0000)))
        case "refcount table entry 0xffff…":
            try withData()
            try poke(path, at: refcountTable, be(UInt64(0xffff_ffff_ffff_0000)))
        case "L2 table past the end of the file":
            try withData()
            try poke(path, at: l1, be(UInt64(0x8000_0000_1000_0000)))
        case "snapshot table past the end of the file":
            try withSnapshot()
            try poke(path, at: 64, be(UInt64(0x1000_0000)))
        case "snapshot L1 table past the end of the file":
            try withSnapshot()
            try poke(path, at: try u64(path, at: 64), be(UInt64(0x1000_0000)))
        case "060 refcount block overlapping the refcount table":
            try withData()
            try poke(path, at: refcountTable, be(UInt64(refcountTable)))
        case "060 L2 reference into the refcount table":
            try withData()
            try poke(path, at: l1, be(UInt64(0x8000_0000_0000_0000) | refcountTable))
        case "060 data reference into the L1 table":
            try withData()
            try poke(path, at: l2, be(UInt64(0x8000_0000_0000_0000) | l1))
        case "L1 entry with reserved bits":
            try withData()
            try poke(path, at: l1, be(UInt64(0x8100_0000_0004_0000)))
        case "L2 entry with reserved bits":
            try withData()
            try poke(path, at: l2, be(UInt64(0x8000_0000_0005_0010)))
        case "080 snapshot L1 table size too large":
            try withSnapshot()
            try poke(path, at: try u64(path, at: 64) + 8, be(UInt32(0x1000_0000)))
        case "039 dirty bit after a crash (lazy refcounts)":
            try fresh(["lazy_refcounts=on"])
            // qemu-io aborts after the flush: the dirty bit stays, the refcounts were never written.
            let crash = try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x5a 0 512", "-c", "flush", "-c", "abort", path])
            #expect(crash.status != 0)
            #expect(try peek(path, at: 79, count: 1)[0] & 0x01 != 0, "the dirty bit is set")
        case "snapshot L1 table not cluster aligned":
            try withSnapshot()
            let entry = try u64(path, at: 64)
            try poke(path, at: entry, be(try u64(path, at: entry) + 0x200))
        default:
            Issue.record("unknown scenario \(name)")
        }
    }

    static let scenarios: [Scenario] = [
        Scenario(name: "060 cluster data reference into refcount block"),
        Scenario(name: "060 data in refcount block, refcount matching"),
        Scenario(name: "271 unaligned cluster, no allocated subclusters"),
        Scenario(name: "060 write to unaligned preallocated zero cluster"),
        Scenario(name: "corrupt bit on a consistent image"),
        Scenario(name: "108 refcount_table_clusters 0"),
        Scenario(name: "refcount table entry past the end of the file"),
        Scenario(name: "refcount table entry 0x7fff…", sameVerdict: false),
        Scenario(name: "refcount table entry 0xffff…", sameVerdict: false),
        // Exit 2 as qemu-img, not 1 (the check completes); the snapshot cases read what can be read.
        Scenario(name: "L2 table past the end of the file", repairable: false),
        Scenario(name: "snapshot table past the end of the file", readable: true),
        Scenario(name: "snapshot L1 table past the end of the file", repairable: false, readable: true),
        Scenario(name: "snapshot L1 table not cluster aligned", repairable: false, readable: true),
        Scenario(name: "080 snapshot L1 table size too large", repairable: false, readable: true, qemuRepairFails: true),
        Scenario(name: "039 dirty bit after a crash (lazy refcounts)"),
        Scenario(name: "060 refcount block overlapping the refcount table"),
        Scenario(name: "060 L2 reference into the refcount table"),
        Scenario(name: "060 data reference into the L1 table"),
        Scenario(name: "L1 entry with reserved bits", repairable: false),
        Scenario(name: "L2 entry with reserved bits", repairable: false),
        // The lead's decision: keep our repair (the L2 table is the L1 table itself; COPIED cleared,
        // the refcount raised, as qemu-img's successful repair of "data reference into L1" does).
        Scenario(name: "060 L2 reference into the L1 table", oursRepairsWhereQemuImgFails: true),
    ] + iotest026.keys.sorted().map { Scenario(name: $0) }

    /// iotest 026 (qcow2 error paths): qemu-io writes through QEMU's blkdebug driver, which fails the
    /// I/O at `event` with `errno`, once or from then on; the image is left as QEMU's error path left it
    /// (leaked clusters at worst). 1 GiB image, 1 KiB clusters (512 bytes and a 64 MiB write for
    /// refcount table growth), as 026 does.
    struct BlkdebugWrite: Sendable {
        var event: String, errno: Int, once: Bool, background = false, clusterSize = 1024, length = "128k"

        func make(_ path: String, _ dir: TempDir) throws {
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", path, "1G")
            let config = dir.file("blkdebug.conf")
            try """
                [inject-error]
                event = "\(event)"
                errno = "\(errno)"
                immediately = "off"
                once = "\(once ? "on" : "off")"

                """.write(toFile: config, atomically: true, encoding: .utf8)
            let mode = background ? "-b " : ""
            // 026 catches a plain L2 update, not the first L2 table's allocation.
            if event == "l2_update" { try Tools.qemuIO(path, format: "qcow2", ["write \(mode)0 512"]) }
            var commands = ["write \(mode)0 \(length)"]
            // l2_load is not reached on allocation: 026 writes again and reads.
            if event == "l2_load" { commands += ["write \(mode)0 \(length)", "read \(mode)0 \(length)"] }
            var failed = false
            for command in commands {
                let io = try Tools.run("qemu-io", ["-c", command, "blkdebug:\(config):\(path)"])
                #expect(!io.stderr.contains("can't open"), "blkdebug refused the rule: \(io.stderr)")
                failed = failed || (io.stdout + io.stderr).contains("failed")
            }
            #expect(failed, "the injected error never happened: the image is not damaged by an error path")
        }
    }

    /// A representative subset of 026's matrix (every event of its first loop, both errnos, once on
    /// and off, with and without -b; one refcount-table-growth and two L1-growth events), chosen
    /// to keep the test short: the full 104-case matrix gave qemu-img's verdicts, counts and repair
    /// results on this machine (see the issue 12 note).
    static let iotest026: [String: BlkdebugWrite] = [
        "026 l1_update EIO from then on": BlkdebugWrite(event: "l1_update", errno: 5, once: false),
        "026 l1_update ENOSPC once -b": BlkdebugWrite(event: "l1_update", errno: 28, once: true, background: true),
        "026 l2_load EIO from then on": BlkdebugWrite(event: "l2_load", errno: 5, once: false),
        "026 l2_update EIO from then on": BlkdebugWrite(event: "l2_update", errno: 5, once: false),
        "026 l2_update ENOSPC once -b": BlkdebugWrite(event: "l2_update", errno: 28, once: true, background: true),
        "026 l2_alloc_write EIO from then on -b": BlkdebugWrite(event: "l2_alloc_write", errno: 5, once: false, background: true),
        "026 write_aio ENOSPC from then on": BlkdebugWrite(event: "write_aio", errno: 28, once: false),
        "026 refblock_load EIO from then on -b": BlkdebugWrite(event: "refblock_load", errno: 5, once: false, background: true),
        "026 refblock_update_part ENOSPC from then on": BlkdebugWrite(event: "refblock_update_part", errno: 28, once: false),
        "026 refblock_alloc EIO once": BlkdebugWrite(event: "refblock_alloc", errno: 5, once: true),
        "026 cluster_alloc ENOSPC from then on -b": BlkdebugWrite(event: "cluster_alloc", errno: 28, once: false, background: true),
        "026 refblock_alloc_write_table ENOSPC from then on": BlkdebugWrite(event: "refblock_alloc_write_table", errno: 28,
                                                                           once: false, clusterSize: 512, length: "64M"),
        "026 l1_grow_activate_table EIO from then on -b": BlkdebugWrite(event: "l1_grow_activate_table", errno: 5, once: false,
                                                                       background: true, length: "64k"),
        "026 l1_grow_write_table ENOSPC once -b": BlkdebugWrite(event: "l1_grow_write_table", errno: 28, once: true,
                                                               background: true, length: "64k"),
    ]

    static func counts(_ text: String) -> (corruptions: Int, leaks: Int) {
        let json = (try? JSONHelpers.parse(text)) as? [String: Any] ?? [:]
        return (json["corruptions"] as? Int ?? 0, json["leaks"] as? Int ?? 0)
    }

    static func corruptBit(_ path: String) throws -> Bool { try peek(path, at: 79, count: 1)[0] & 0x02 != 0 }

    @Test(arguments: scenarios)
    func repairsAsQemuImgDoes(_ scenario: Scenario) throws {
        let dir = TempDir()
        let made = dir.file("made.qcow2")
        try Self.make(scenario.name, made, dir)
        let ours = dir.file("ours.qcow2"), theirs = dir.file("theirs.qcow2")
        try FileManager.default.copyItem(atPath: made, toPath: ours)
        try FileManager.default.copyItem(atPath: made, toPath: theirs)

        let qemuCheck = try Tools.run("qemu-img", ["check", "--output=json", theirs])
        let ourCheck = try QBackupBinary.run(["check", ours, "--output", "json"])
        if !scenario.sameVerdict {
            #expect(ourCheck.status == 2, "the damage is found: \(ourCheck.stdout)")
        } else {
            #expect(ourCheck.status == qemuCheck.status, "qemu-img: \(qemuCheck.stdout)\(qemuCheck.stderr)\nours: \(ourCheck.stdout)\(ourCheck.stderr)")
            #expect(Self.counts(ourCheck.stdout).corruptions == Self.counts(qemuCheck.stdout).corruptions,
                    "qemu-img: \(qemuCheck.stdout)\nours: \(ourCheck.stdout)")
            #expect(Self.counts(ourCheck.stdout).leaks == Self.counts(qemuCheck.stdout).leaks)
        }
        #expect(try Data.contents(of: ours) == Data.contents(of: made), "check without --repair wrote to the image")
        if scenario.readable {
            // qemu-img info and map open the image; so do ours, with one warning naming the damage.
            #expect(try Tools.run("qemu-img", ["info", theirs]).status == 0)
            let info = try QBackupBinary.run(["info", ours])
            #expect(info.status == 0, "\(info.stderr)")
            #expect(info.stderr.split(separator: "\n").filter { $0.hasPrefix("qbackup: warning: ") && $0.contains("snapshot") }.count == 1,
                    "\(info.stderr)")
            let theirMap = try Tools.run("qemu-img", ["map", "--output=json", theirs]).stdout
            let ourMap = try QBackupBinary.run(["map", "--output", "json", ours])
            #expect(ourMap.status == 0, "\(ourMap.stderr)")
            #expect(JSONHelpers.canonical(try JSONHelpers.mergedMap(ourMap.stdout)) == JSONHelpers.canonical(try JSONHelpers.mergedMap(theirMap)))
            #expect(try Data.contents(of: ours) == Data.contents(of: made), "a read-only command wrote to the image")
        }

        let qemuRepair = try Tools.run("qemu-img", ["check", "-r", "all", theirs])
        let ourRepair = try QBackupBinary.run(["check", "--repair", "all", ours])
        #expect(scenario.oursRepairsWhereQemuImgFails || (scenario.qemuRepairFails ? qemuRepair.status == 1 && ourRepair.status == 2 : ourRepair.status == qemuRepair.status), "qemu-img: \(qemuRepair.stdout)\(qemuRepair.stderr)\nours: \(ourRepair.stdout)\(ourRepair.stderr)")
        let afterwards = try Tools.run("qemu-img", ["check", ours])
        if scenario.oursRepairsWhereQemuImgFails {
            #expect(qemuRepair.status == 1 && ourRepair.status == 0, "qemu-img: \(qemuRepair.stdout)\(qemuRepair.stderr)\nours: \(ourRepair.stdout)\(ourRepair.stderr)")
            #expect(afterwards.status == 0, "qemu-img check of our repair: \(afterwards.stdout)\(afterwards.stderr)")
            #expect(try Self.corruptBit(theirs) && !Self.corruptBit(ours), "qemu-img marked its copy corrupt, ours is clean")
            // The mapping stays as it was (qemu-img map), and guest cluster 0 still reads the L1 table
            // (with COPIED now clear in its first entry), as qemu-img's own repair of 060's "data
            // reference into L1" leaves the guest reading the L1 table's bytes.
            let mapBefore = try Tools.run("qemu-img", ["map", "--output=json", made]).stdout
            let mapAfter = try Tools.run("qemu-img", ["map", "--output=json", ours]).stdout
            #expect(JSONHelpers.canonical(try JSONHelpers.mergedMap(mapAfter)) == JSONHelpers.canonical(try JSONHelpers.mergedMap(mapBefore)))
            let raw = dir.file("ours.raw")
            try Tools.qemuImg("convert", "-O", "raw", ours, raw)
            #expect(try peek(raw, at: 0, count: 65536) == peek(ours, at: Self.l1, count: 65536), "guest cluster 0 is the L1 table")
            try Tools.qemuIO(ours, format: "qcow2", ["write -P 0x2a 64k 512"])
            #expect(try Tools.run("qemu-img", ["check", ours]).status == 0)
            return
        }
        guard scenario.repairable else {
            // What qemu-img's repair cannot fix, ours leaves the same: same verdict on both, same guest data.
            let theirsAfter = try Tools.run("qemu-img", ["check", "--output=json", theirs])
            #expect(afterwards.status == (scenario.qemuRepairFails ? 2 : theirsAfter.status), "qemu-img check of ours: \(afterwards.stdout), of theirs: \(theirsAfter.stdout)")
            let compare = try Tools.run("qemu-img", ["compare", ours, theirs])
            #expect(compare.status == 0, "guest data differs from qemu-img's repair: \(compare.stdout)\(compare.stderr)")
            return
        }
        #expect(afterwards.status == 0, "qemu-img check of our repair: \(afterwards.stdout)\(afterwards.stderr)")
        #expect(try !Self.corruptBit(ours), "the corrupt bit is cleared once the image is consistent")
        #expect(try Self.corruptBit(theirs) == Self.corruptBit(ours))
        let compare = try Tools.run("qemu-img", ["compare", ours, theirs])
        #expect(compare.status == 0, "guest data differs from qemu-img's repair: \(compare.stdout)")

        // Both take an unrelated write afterwards without changing anything else (060: the
        // guest data at 0 was the refcount block, and an in-place refcount update changed it).
        for image in [ours, theirs] { try Tools.qemuIO(image, format: "qcow2", ["write -P 0x2a 64k 512"]) }
        #expect(try Tools.run("qemu-img", ["compare", ours, theirs]).status == 0)
        #expect(try Tools.run("qemu-img", ["check", ours]).status == 0)
    }

    /// Header values the spec forbids and qemu-img refuses: ours refuses them too (exit 1, one
    /// error line naming the field), for check as for info.
    @Test(arguments: ["compression-type bit with compression_type 0", "snapshots_offset misaligned, nb_snapshots 0",
                      "287 compression_type zstd without the compression-type bit"])
    func refusesWhatQemuImgRefuses(_ name: String) throws {
        let dir = TempDir()
        let path = dir.file("bad.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, "1M")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 0x11 0 64k"])
        let field: String
        switch name {
        case "compression-type bit with compression_type 0":
            // Incompatible bit 3 (compression type) set; byte 104 (compression_type) stays 0 (zlib).
            #expect(try peek(path, at: 104, count: 1) == [0])
            try poke(path, at: 79, [try peek(path, at: 79, count: 1)[0] | 0x08])
            field = "compression"
        case "287 compression_type zstd without the compression-type bit":
            try poke(path, at: 104, [1])
            field = "compression"
        default:
            #expect(try peek(path, at: 60, count: 4) == [0, 0, 0, 0])
            try poke(path, at: 64, be(UInt64(0x1234)))
            field = "snapshots_offset"
        }
        let before = try Data.contents(of: path)
        for command in ["info", "check"] {
            let theirs = try Tools.run("qemu-img", [command, path])
            let ours = try QBackupBinary.run([command, path])
            #expect(theirs.status == 1, "qemu-img \(command): \(theirs.stdout)\(theirs.stderr)")
            #expect(ours.status == theirs.status && ours.failedCleanly, "\(command): \(ours.stdout)\(ours.stderr)")
            #expect(ours.stderr.contains(field), "\(command): \(ours.stderr)")
        }
        #expect(try Data.contents(of: path) == before)
    }

    /// iotest 080 (qcow2 header input validation), written anew: each header field QEMU's test
    /// pokes on a fresh 64 MiB image. `qbackup info` and `check` give qemu-img's exit status
    /// (refused: 1, with one error line), and nothing is written.
    static let header080: [(String, [(UInt64, [UInt8])])] = [
        ("huge header size", [(100, be(UInt32(0xffff_ffff)))]),
        ("header size 0x7fffffff", [(100, be(UInt32(0x7fff_ffff)))]),
        ("huge unknown header extension", [(8, be(UInt64.max)), (104, be(UInt32(0x1234_5678))), (108, be(UInt32(0x7fff_ffff)))]),
        ("huge unknown header extension, no backing file", [(104, be(UInt32(0x1234_5678))), (108, be(UInt32(0x7fff_ffff)))]),
        ("huge refcount table size", [(56, be(UInt32(0xffff_ffff)))]),
        ("refcount table size 0x20001", [(56, be(UInt32(0x0002_0001)))]),
        ("misaligned refcount table", [(48, be(UInt64(0x1234_5678_90ab_cdef)))]),
        ("huge refcount offset", [(48, be(UInt64(0xffff_ffff_ffff_0000))), (56, be(UInt32(0x7f)))]),
        ("nb_snapshots 0xffffffff", [(60, be(UInt32(0xffff_ffff)))]),
        ("nb_snapshots 0x7fffffff", [(60, be(UInt32(0x7fff_ffff)))]),
        ("huge snapshots_offset", [(64, be(UInt64(0xffff_ffff_ffff_0000))), (60, be(UInt32(0xffff)))]),
        ("misaligned snapshots_offset, no snapshots", [(64, be(UInt64(0x1234_5678_90ab_cdef))), (60, be(UInt32(0)))]),
        ("l1_size 0xffffffff", [(36, be(UInt32(0xffff_ffff)))]),
        ("l1_size 0x7fffffff", [(36, be(UInt32(0x7fff_ffff)))]),
        ("huge l1_table_offset", [(40, be(UInt64(0x7fff_ffff_ffff_0000))), (36, be(UInt32(0xffff)))]),
        ("misaligned l1_table_offset", [(40, be(UInt64(0x1234_5678_90ab_cdef))), (36, be(UInt32(1)))]),
        ("invalid backing file size", [(8, be(UInt64(0x1000))), (16, be(UInt32(0xffff_ffff)))]),
    ]

    @Test(arguments: header080.map(\.0))
    func headerValidationAsIotest080(_ name: String) throws {
        let pokes = try #require(Self.header080.first { $0.0 == name }).1
        let dir = TempDir()
        let path = dir.file("080.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "64M")
        for (offset, bytes) in pokes { try poke(path, at: offset, bytes) }
        let before = try Data.contents(of: path)
        for command in ["info", "check"] {
            let theirs = try Tools.run("qemu-img", [command, path])
            let ours = try Bounded.run([try QBackupBinary.path(), command, path], mebibytes: 512, seconds: 10)
            #expect(ours.status == theirs.status, "\(name): \(command): qemu-img \(theirs.status) \(theirs.stderr), ours \(ours.status) \(ours.stderr)")
            if ours.status == 1 { #expect(ours.failedCleanly, "\(name): \(command): \(ours.stderr)") }
        }
        #expect(try Data.contents(of: path) == before)
    }

    /// iotest 036 (feature bits), written anew: unknown incompatible bits 61-63 with no feature
    /// name table, or tables naming some of them (full 48-byte entries; other kinds of entries
    /// must not name an incompatible bit). Refused as qemu-img refuses, naming what it names.
    static let features036: [(String, bits: [Int], table: [(UInt8, UInt8, String)]?)] = [
        ("bit 63, no table", [63], nil),
        ("bits 61-63, no table", [61, 62, 63], nil),
        ("bits 61-63, table names 63", [61, 62, 63], [(0, 63, "Test feature")]),
        ("bits 61-63, table names 61 and 62", [61, 62, 63], [(0, 61, "test1"), (0, 62, "test2")]),
        ("bits 61-63, table names all", [61, 62, 63], [(0, 61, "test1"), (0, 62, "test2"), (0, 63, "test3")]),
        ("bits 61-63, unrelated entries", [61, 62, 63], [(1, 61, "test1"), (0, 62, "test2"), (2, 63, "test3"), (0, 60, "test4")]),
    ]

    @Test(arguments: features036.map(\.0))
    func unknownFeaturesAsIotest036(_ name: String) throws {
        let feature = try #require(Self.features036.first { $0.0 == name })
        let dir = TempDir()
        let path = dir.file("036.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, "64M")
        // QEMU's only header extension here is its feature name table, right after the 112-byte header.
        #expect(try peek(path, at: 112, count: 4) == be(UInt32(0x6803_f857)))
        var area: [UInt8] = []
        if let table = feature.table {
            var data: [UInt8] = []
            for (kind, bit, label) in table {
                let bytes = Array(label.utf8)
                data += [kind, bit] + bytes + [UInt8](repeating: 0, count: 46 - bytes.count)
            }
            area = be(UInt32(0x6803_f857)) + be(UInt32(UInt32(data.count))) + data
        }
        try poke(path, at: 112, area + [UInt8](repeating: 0, count: 8))
        try poke(path, at: 72, be(feature.bits.reduce(UInt64(0)) { $0 | UInt64(1) << UInt64($1) }))
        let theirs = try Tools.run("qemu-img", ["info", path])
        #expect(theirs.status == 1 && theirs.stderr.contains("Unsupported qcow2 feature(s): "), "\(theirs.stderr)")
        let named = (theirs.stderr.components(separatedBy: "Unsupported qcow2 feature(s): ").last ?? "")
            .trimmingCharacters(in: .whitespacesAndNewlines).components(separatedBy: ", ")
            .filter { !$0.hasPrefix("Unknown incompatible feature") }
        for command in ["info", "check"] {
            let ours = try QBackupBinary.run([command, path])
            #expect(ours.status == 1 && ours.failedCleanly, "\(name): \(command): \(ours.stderr)")
            for label in named { #expect(ours.stderr.contains(label), "\(name): qemu-img names \(label): \(ours.stderr)") }
            for (_, _, label) in feature.table ?? [] where !named.contains(label) {
                #expect(!ours.stderr.contains(label), "\(name): qemu-img does not name \(label): \(ours.stderr)")
            }
            #expect(ours.stderr.components(separatedBy: ", ").count == feature.bits.count, "\(name): one name per bit: \(ours.stderr)")
        }
    }

    /// iotest 036's last case: an unknown autoclear bit is cleared by a repair, as qemu-img -r all
    /// clears it (a program that writes an image clears the autoclear bits it does not know).
    @Test func repairClearsUnknownAutoclearBitsAsIotest036() throws {
        let dir = TempDir()
        let ours = dir.file("ours.qcow2"), theirs = dir.file("theirs.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1", ours, "64M")
        try poke(ours, at: 88, be(UInt64(1) << 63))
        try FileManager.default.copyItem(atPath: ours, toPath: theirs)
        #expect(try QBackupBinary.run(["check", ours]).status == 0)
        #expect(try peek(ours, at: 88, count: 8) == be(UInt64(1) << 63), "check without --repair writes nothing")
        let theirRepair = try Tools.run("qemu-img", ["check", "-r", "all", theirs])
        let ourRepair = try QBackupBinary.run(["check", "--repair", "all", ours])
        #expect(ourRepair.status == theirRepair.status, "\(ourRepair.stdout)\(ourRepair.stderr)")
        #expect(try peek(theirs, at: 88, count: 8) == be(UInt64(0)), "qemu-img clears it")
        #expect(try peek(ours, at: 88, count: 8) == peek(theirs, at: 88, count: 8))
        #expect(try Tools.run("qemu-img", ["check", ours]).status == 0)
    }

    /// iotest 287 (zstd compression), written anew: adjacent zstd-compressed clusters written by
    /// qemu-io, and a qemu-img convert -c of incompressible and compressible data, read back by
    /// qbackup exactly as the source (compare) and checked clean.
    @Test func zstdImagesReadAsIotest287() throws {
        let dir = TempDir()
        let adjacent = dir.file("adjacent.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compression_type=zstd", adjacent, "64M")
        try Tools.qemuIO(adjacent, format: "qcow2", ["write -c -P 0xAB 0 64K", "write -c -P 0xAC 64K 64K", "write -c -P 0xAD 128K 64K"])
        let raw = dir.file("rand.raw")
        var generator = SeededRandom(seed: 287)
        var bytes = [UInt8](repeating: 0xFA, count: 2 << 20)
        for i in (1 << 20)..<(2 << 20) { bytes[i] = UInt8(truncatingIfNeeded: generator.next()) }
        try Data(bytes).write(to: URL(fileURLWithPath: raw))
        let zlib = dir.file("zlib.qcow2"), zstd = dir.file("zstd.qcow2")
        try Tools.qemuImg("convert", "-f", "raw", "-O", "qcow2", "-c", "-o", "compression_type=zlib", raw, zlib)
        try Tools.qemuImg("convert", "-O", "qcow2", "-c", "-o", "compression_type=zstd", zlib, zstd)
        for (image, reference) in [(adjacent, nil), (zstd, raw), (zstd, zlib)] as [(String, String?)] {
            let check = try QBackupBinary.run(["check", image])
            #expect(check.status == 0, "\(image): \(check.stdout)\(check.stderr)")
            if let reference {
                let compare = try QBackupBinary.run(["compare", image, reference])
                #expect(compare.status == 0, "\(image) vs \(reference): \(compare.stdout)\(compare.stderr)")
            }
        }
        let flat = dir.file("adjacent.raw")
        #expect(try QBackupBinary.run(["flatten", "--format", "raw", adjacent, flat]).status == 0)
        try Tools.qemuIO(flat, format: "raw", ["read -P 0xAB 0 64k", "read -P 0xAC 64K 64k", "read -P 0xAD 128K 64k"])
    }

    /// Issue 12 item 7 (map's zero flag over host holes): the images iotest 061 makes with `qemu-img
    /// amend` (zero clusters expanded on a downgrade to compat 0.10, with a snapshot, over a backing
    /// file, on a fully preallocated image) and a data cluster whose host range is punched: `map
    /// --output json` says what qemu-img map says. The amend downgrades do not reproduce the item's
    /// zero flag on QEMU 7.2 (regression cases); 061's external-data-file images (a data file, and
    /// `data_file_raw` set again and cleared by `qemu-img amend`) do: the code the issue was filed
    /// against mapped them as unallocated, since map opened the image without its data file.
    @Test(arguments: ["zero expansion", "zero expansion with a snapshot", "zero expansion over a backing file",
                      "zero expansion on a fully preallocated image", "punched host cluster",
                      "external data file", "raw data file set again by amend", "raw data file cleared by amend"])
    func mapAsQemuImgOnAmendImagesAsIotest061(_ name: String) throws {
        let dir = TempDir()
        let image = dir.file("t.qcow2")
        let writes = ["write -P 0x2a 0 128k", "write -z 64k 64k", "write -z 1M 64k"]
        switch name {
        case "zero expansion with a snapshot":
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1", image, "8M")
            try Tools.qemuIO(image, format: "qcow2", writes)
            try Tools.qemuImg("snapshot", "-c", "s1", image)
            try Tools.qemuIO(image, format: "qcow2", ["write -z 0 64k", "write -P 0x3b 2M 64k"])
            try Tools.qemuImg("amend", "-o", "compat=0.10", image)
        case "zero expansion over a backing file":
            let base = dir.file("base.qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", base, "8M")
            try Tools.qemuIO(base, format: "qcow2", ["write -P 0x11 0 4M"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1", "-b", base, "-F", "qcow2", image)
            try Tools.qemuIO(image, format: "qcow2", writes)
            try Tools.qemuImg("amend", "-o", "compat=0.10", image)
        case "zero expansion on a fully preallocated image":
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,preallocation=full", image, "8M")
            try Tools.qemuIO(image, format: "qcow2", writes)
            try Tools.qemuImg("amend", "-o", "compat=0.10", image)
        case "punched host cluster":
            try Tools.qemuImg("create", "-q", "-f", "qcow2", image, "8M")
            try Tools.qemuIO(image, format: "qcow2", ["write -P 0x2a 0 256k"])
            let map = try JSONHelpers.parse(try Tools.qemuImg("map", "--output=json", image).stdout) as? [[String: Any]]
            let host = try #require(map?.first?["offset"] as? Int)
            try Tools.run("fallocate", ["-p", "-o", String(host + 65536), "-l", "65536", image])
        case "external data file", "raw data file set again by amend", "raw data file cleared by amend":
            let raw = name == "external data file" ? "" : ",data_file_raw=on"
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1,data_file=\(dir.file("t.data"))\(raw)", image, "8M")
            try Tools.qemuIO(image, format: "qcow2", writes)
            if name != "external data file" {
                try Tools.qemuImg("amend", "-o", name.contains("cleared") ? "data_file_raw=off" : "data_file_raw=on", image)
            }
        default:
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1", image, "8M")
            try Tools.qemuIO(image, format: "qcow2", writes)
            try Tools.qemuImg("amend", "-o", "compat=0.10", image)
        }
        let theirs = try Tools.qemuImg("map", "--output=json", image).stdout
        if name == "punched host cluster" {
            #expect(theirs.contains(#""zero": true, "data": true"#), "the punched cluster is not an allocated zero extent: \(theirs)")
        }
        let ours = try QBackupBinary.run(["map", "--output", "json", image])
        #expect(ours.status == 0, "\(ours.stderr)")
        #expect(JSONHelpers.canonical(try JSONHelpers.mergedMap(ours.stdout)) == JSONHelpers.canonical(try JSONHelpers.mergedMap(theirs)),
                "qemu-img: \(theirs)\nours: \(ours.stdout)")
    }
}
