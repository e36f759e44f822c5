import Foundation
import Testing
import TestSupport

/// Damaged images end in one `qbackup: error:` line naming the structure and
/// offset, exit 1, quickly, within bounded memory, and the file is unchanged.
@Suite struct BadInputTests {
    struct Damage: CustomTestStringConvertible, Sendable {
        var name: String
        /// Words the error line must contain (the structure, and the offset in hex).
        var expect: [String]
        /// Commands to run; the image path is appended.
        var commands: [[String]] = [["info"], ["map", "--output", "json"]]
        var damage: @Sendable (String, TempDir) throws -> Void
        var testDescription: String { name }
    }

    /// A small image with data, two L2 tables and a refcount block, made by QEMU.
    static func makeImage(_ dir: TempDir) throws -> String {
        let path = dir.file("bad.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", path, "1G")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 0x5a 0 128k", "write -P 0x6b 600M 64k"])
        return path
    }

    /// The file offset of the first L2 table (from the L1 table).
    static func firstL2(_ path: String) throws -> UInt64 {
        let l1Offset = try peek(path, at: 40, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        return try peek(path, at: l1Offset, count: 8).reduce(0) { $0 << 8 | UInt64($1) } & 0x00ff_ffff_ffff_fe00
    }

    static let flatten: [String] = ["flatten", "--format", "raw"]

    static let damages: [Damage] = [
        Damage(name: "truncated to 50 bytes", expect: ["header", "0x0"]) { path, _ in
            try Tools.run("truncate", ["-s", "50", path])
        },
        Damage(name: "bad magic", expect: ["header", "0x0", "magic"], commands: [["info", "-f", "qcow2"]]) { path, _ in
            try poke(path, at: 0, [0x51, 0x46, 0x49, 0x00])
        },
        Damage(name: "version 4", expect: ["header", "0x4", "version"]) { path, _ in
            try poke(path, at: 4, be(UInt32(4)))
        },
        Damage(name: "cluster_bits 30", expect: ["header", "0x14", "cluster_bits"]) { path, _ in
            try poke(path, at: 20, be(UInt32(30)))
        },
        Damage(name: "cluster_bits 8", expect: ["header", "0x14", "cluster_bits"]) { path, _ in
            try poke(path, at: 20, be(UInt32(8)))
        },
        Damage(name: "l1_size 2^31", expect: ["header", "0x24", "l1_size"]) { path, _ in
            try poke(path, at: 36, be(UInt32(1) << 31))
        },
        Damage(name: "l1_size past end of file", expect: ["header", "0x28", "L1 table"]) { path, _ in
            try poke(path, at: 36, be(UInt32(3_000_000)))
        },
        Damage(name: "l1_table_offset past EOF", expect: ["header", "0x28", "L1 table"]) { path, _ in
            try poke(path, at: 40, be(UInt64(1) << 40))
        },
        Damage(name: "l1_table_offset unaligned", expect: ["header", "0x28", "l1_table_offset"]) { path, _ in
            try poke(path, at: 40, be(UInt64(0x30200)))
        },
        Damage(name: "refcount table past EOF", expect: ["header", "0x30", "refcount table"]) { path, _ in
            try poke(path, at: 48, be(UInt64(1) << 40))
        },
        Damage(name: "refcount_table_clusters huge", expect: ["header", "0x38", "refcount_table_clusters"]) { path, _ in
            try poke(path, at: 56, be(UInt32(0x7fff_ffff)))
        },
        Damage(name: "nb_snapshots huge", expect: ["header", "0x3c", "nb_snapshots"]) { path, _ in
            try poke(path, at: 60, be(UInt32(0x7fff_ffff)))
        },
        // A snapshot table past EOF is no longer refused by the read-only commands: they read the
        // active image with a warning, as QEMU opens it (QemuRepairScenarioTests).
        Damage(name: "unknown incompatible feature", expect: ["header", "0x48", "incompatible"]) { path, _ in
            try poke(path, at: 72, be(UInt64(1) << 40))
        },
        Damage(name: "encryption", expect: ["header", "0x20", "encrypt"]) { path, _ in
            try poke(path, at: 32, be(UInt32(2)))
        },
        Damage(name: "header_length past end", expect: ["header", "0x64", "header_length"]) { path, _ in
            try poke(path, at: 100, be(UInt32(0x100_0000)))
        },
        Damage(name: "header extension length runs past first cluster", expect: ["header extension"]) { path, _ in
            // The first extension starts at header_length (112).
            try poke(path, at: 112 + 4, be(UInt32(0x00ff_0000)))
        },
        Damage(name: "L1 entry past EOF", expect: ["L1 table", "0x"], commands: [["map", "--output", "json"], flatten]) {
            path, _ in
            let l1Offset = try peek(path, at: 40, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
            try poke(path, at: l1Offset, be(UInt64(1) << 63 | UInt64(1) << 40))
        },
        Damage(name: "L1 entry misaligned", expect: ["L1 table", "aligned"], commands: [["map", "--output", "json"], flatten]) {
            path, _ in
            let l1Offset = try peek(path, at: 40, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
            try poke(path, at: l1Offset, be(UInt64(1) << 63 | UInt64(0x40200)))
        },
        Damage(name: "L2 entry past EOF", expect: ["L2 table", "past the end"], commands: [["map", "--output", "json"], flatten]) {
            path, _ in
            try poke(path, at: try firstL2(path), be(UInt64(1) << 63 | UInt64(1) << 40))
        },
        Damage(name: "L2 entry misaligned", expect: ["L2 table", "aligned"], commands: [["map", "--output", "json"], flatten]) {
            path, _ in
            try poke(path, at: try firstL2(path) + 8, be(UInt64(1) << 63 | UInt64(0x50200)))
        },
        Damage(name: "compressed cluster garbage", expect: ["compressed cluster"], commands: [flatten]) { path, _ in
            // A compressed descriptor pointing at the header: does not inflate.
            try poke(path, at: try firstL2(path), be(UInt64(1) << 62 | 0x10))
        },
        Damage(name: "backing file names itself", expect: ["backing chain", "loops"]) { path, _ in
            try Tools.qemuImg("rebase", "-u", "-f", "qcow2", "-b", "bad.qcow2", "-F", "qcow2", path)
        },
        Damage(name: "backing file missing", expect: ["nothere.qcow2", "No such file"]) { path, _ in
            try Tools.qemuImg("rebase", "-u", "-f", "qcow2", "-b", "nothere.qcow2", "-F", "qcow2", path)
        },
        Damage(name: "backing loop through two files", expect: ["backing chain", "loops"]) { path, dir in
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "bad.qcow2", "-F", "qcow2", dir.file("other.qcow2"), "1G")
            try Tools.qemuImg("rebase", "-u", "-f", "qcow2", "-b", "other.qcow2", "-F", "qcow2", path)
        },
    ]

    @Test(arguments: damages)
    func endsInOneClearError(_ damage: Damage) throws {
        let dir = TempDir()
        let path = try Self.makeImage(dir)
        try damage.damage(path, dir)
        let before = try Data.contents(of: path)
        for command in damage.commands {
            var args = command
            let isFlatten = command.first == "flatten"
            if isFlatten { args = ["flatten", path, dir.file("out.raw"), "--format", "raw"] } else { args.append(path) }
            // 512 MiB of address space and 10 seconds: an allocation sized by an untrusted
            // field, or a loop that does not end, fails the test.
            let binary = try QBackupBinary.path()
            let started = Date()
            let result = try Bounded.run([binary] + args, mebibytes: 512, seconds: 10)
            let elapsed = Date().timeIntervalSince(started)
            let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: true)
            #expect(result.status == 1, "\(args): exit \(result.status), stderr: \(result.stderr)")
            #expect(lines.count == 1, "\(args): stderr should be one line: \(result.stderr)")
            #expect(lines.first?.hasPrefix("qbackup: error: ") == true, "\(result.stderr)")
            for word in damage.expect {
                #expect(result.stderr.contains(word), "\(args): '\(word)' missing from: \(result.stderr)")
            }
            #expect(elapsed < 3, "\(args) took \(elapsed) s")
            #expect(try Data.contents(of: path) == before, "\(args) changed the image")
            if isFlatten { try? FileManager.default.removeItem(atPath: dir.file("out.raw")) }
        }
    }

    /// A feature name table shorter than one entry (14 bytes: type, bit, 12 name bytes) is read
    /// as far as it goes, as QEMU does, so the refusal names the feature as qemu-img's does.
    @Test func unknownFeatureNamedFromAShortTable() throws {
        let dir = TempDir()
        let path = dir.file("feature.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "compat=1.1", path, "1M")
        // QEMU's only header extension here is its feature name table, right after the 112-byte header.
        #expect(try peek(path, at: 100, count: 4) == be(UInt32(112)))
        #expect(try peek(path, at: 112, count: 4) == be(UInt32(0x6803_f857)))
        let entry: [UInt8] = [0, 63] + Array("test_feature".utf8)
        try poke(path, at: 112, be(UInt32(0x6803_f857)) + be(UInt32(UInt32(entry.count))) + entry
             + [UInt8](repeating: 0, count: 2 + 8))
        try poke(path, at: 72, be(UInt64(1) << 63))
        let theirs = try Tools.run("qemu-img", ["info", path])
        #expect(theirs.status == 1 && theirs.stderr.contains("Unsupported qcow2 feature(s): test_feature"), "\(theirs.stderr)")
        for command in ["info", "check"] {
            let ours = try QBackupBinary.run([command, path])
            #expect(ours.status == 1 && ours.failedCleanly, "\(command): \(ours.stderr)")
            #expect(ours.stderr.contains("unsupported incompatible feature: test_feature"), "\(command): \(ours.stderr)")
        }
    }
}
