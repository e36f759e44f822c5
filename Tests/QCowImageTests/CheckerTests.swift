import Foundation
import QCowImage
import Testing
import TestSupport

/// The checker against qemu-img check: clean images are clean, damaged ones are
/// reported the same way, and our repairs leave images qemu-img calls clean.
@Suite struct CheckerTests {
    static func qemuCheck(_ path: String) throws -> (status: Int32, json: [String: Any]) {
        let result = try Tools.run("qemu-img", ["check", "--output=json", path])
        let json = (try? JSONHelpers.parse(result.stdout) as? [String: Any]) ?? [:]
        return (result.status, json)
    }

    static func check(_ path: String, repair: QCowChecker.RepairMode = .none) throws -> CheckReport {
        let file = try QCowChecker.open(path, repair: repair)
        defer { file.close() }
        return try QCowChecker.check(file, repair: repair)
    }

    /// An image with data, zero clusters, a snapshot and compressed clusters.
    static func makeImage(_ dir: TempDir, options: String = "cluster_size=65536") throws -> String {
        let path = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", options, path, "16M")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 1 0 1M", "write -z 2M 128k", "write -P 2 5M 70k"])
        return path
    }

    static func refcountTable(_ path: String) throws -> (offset: UInt64, firstBlock: UInt64) {
        let table = try peek(path, at: 48, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        let block = try peek(path, at: table, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        return (table, block)
    }

    @Test(arguments: ["cluster_size=65536", "cluster_size=512", "cluster_size=2097152,extended_l2=on",
                      "refcount_bits=1", "refcount_bits=64", "compat=0.10", "lazy_refcounts=on"])
    func cleanImagesAreClean(_ options: String) throws {
        let dir = TempDir()
        let path = try Self.makeImage(dir, options: options)
        if !options.contains("refcount_bits=1") {
            // A snapshot needs refcounts of 2; with 1-bit refcounts QEMU cannot make one.
            try Tools.qemuImg("snapshot", "-c", "snap", path)
            try Tools.qemuIO(path, format: "qcow2", ["write -P 3 0 64k"])
        }
        let ours = try Self.check(path)
        #expect(ours.exitStatus == 0, "\(ours.findings)")
        let theirs = try Self.qemuCheck(path)
        #expect(theirs.status == 0)
        #expect(ours.allocatedClusters == theirs.json["allocated-clusters"] as? UInt64 ?? UInt64((theirs.json["allocated-clusters"] as? Int) ?? -1))
        #expect(Int(ours.imageEndOffset) == theirs.json["image-end-offset"] as? Int)
    }

    @Test func compressedImageIsClean() throws {
        let dir = TempDir()
        let source = try Self.makeImage(dir)
        let out = dir.file("c.qcow2")
        try Tools.qemuImg("convert", "-c", "-O", "qcow2", source, out)
        let ours = try Self.check(out)
        #expect(ours.exitStatus == 0, "\(ours.findings)")
        #expect(ours.compressedClusters > 0)
    }

    @Test func leakIsFoundAndRepaired() throws {
        let dir = TempDir()
        let path = try Self.makeImage(dir)
        // Claim one more cluster past the end of the file: refcount 1, referenced by nothing.
        let size = try FileManager.default.attributesOfItem(atPath: path)[.size] as? UInt64 ?? 0
        let cluster = size / 65536
        try Tools.run("truncate", ["-s", String((cluster + 1) * 65536), path])
        let (_, block) = try Self.refcountTable(path)
        try poke(path, at: block + cluster * 2, be(UInt16(1)))
        let before = try Self.check(path)
        #expect(before.exitStatus == 3)
        #expect(before.leaks == 1)
        #expect(try Self.qemuCheck(path).status == 3)
        let after = try Self.check(path, repair: .leaks)
        #expect(after.exitStatus == 0)
        #expect(after.leaksFixed == 1)
        #expect(try Self.qemuCheck(path).status == 0)
    }

    @Test func refcountTooLowIsCorruptionAndRepairAllFixesIt() throws {
        let dir = TempDir()
        let path = try Self.makeImage(dir)
        try Tools.qemuImg("convert", "-O", "raw", path, dir.file("before.raw"))
        // The first data cluster (guest 0) lives at the L2 entry's offset; zero its refcount.
        let l1 = try peek(path, at: 40, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        let l2 = try peek(path, at: l1, count: 8).reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00
        let data = try peek(path, at: l2, count: 8).reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00
        let (_, block) = try Self.refcountTable(path)
        try poke(path, at: block + (data / 65536) * 2, be(UInt16(0)))
        let before = try Self.check(path)
        #expect(before.exitStatus == 2)
        #expect(before.findings.contains { $0.severity == .corruption && $0.offset == data })
        #expect(try Self.qemuCheck(path).status == 2)
        let after = try Self.check(path, repair: .all)
        #expect(after.exitStatus == 0, "\(after.findings)")
        #expect(after.corruptionsFixed >= 1)
        #expect(try Self.qemuCheck(path).status == 0)
        try Tools.qemuImg("compare", "-f", "qcow2", "-F", "raw", path, dir.file("before.raw"))
    }

    @Test func missingRefcountBlockIsRebuilt() throws {
        let dir = TempDir()
        let path = try Self.makeImage(dir)
        try Tools.qemuImg("convert", "-O", "raw", path, dir.file("before.raw"))
        let (table, _) = try Self.refcountTable(path)
        try poke(path, at: table, be(UInt64(0)))
        let before = try Self.check(path)
        #expect(before.exitStatus == 2)
        let after = try Self.check(path, repair: .all)
        #expect(after.exitStatus == 0, "\(after.findings)")
        let qemu = try Self.qemuCheck(path)
        #expect(qemu.status == 0, "\(qemu.json)")
        try Tools.qemuImg("compare", "-f", "qcow2", "-F", "raw", path, dir.file("before.raw"))
    }

    @Test func copiedFlagIsCheckedAndRepaired() throws {
        let dir = TempDir()
        let path = try Self.makeImage(dir)
        let l1 = try peek(path, at: 40, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        let l2 = try peek(path, at: l1, count: 8).reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00
        let entry = try peek(path, at: l2, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        try poke(path, at: l2, be(entry & ~(UInt64(1) << 63)))
        let before = try Self.check(path)
        #expect(before.exitStatus == 2)
        #expect(before.findings.contains { $0.message.contains("OFLAG_COPIED") && $0.offset == l2 })
        #expect(try Self.qemuCheck(path).status == 2)
        let after = try Self.check(path, repair: .all)
        #expect(after.exitStatus == 0, "\(after.findings)")
        #expect(try Self.qemuCheck(path).status == 0)
    }

    @Test func overlappingReferencesAreCorruption() throws {
        let dir = TempDir()
        let path = try Self.makeImage(dir)
        // Point guest cluster 1 at the L1 table: a data cluster overlapping metadata.
        let l1 = try peek(path, at: 40, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        let l2 = try peek(path, at: l1, count: 8).reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00
        try poke(path, at: l2 + 8, be(UInt64(1) << 63 | l1))
        let ours = try Self.check(path)
        #expect(ours.exitStatus == 2)
        #expect(ours.findings.contains { $0.offset == l1 && $0.severity == .corruption })
        #expect(try Self.qemuCheck(path).status == 2)
    }
}
