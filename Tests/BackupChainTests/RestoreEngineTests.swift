import Foundation
import Testing
import TestSupport

/// restore checks a point's layers before reading them: size and backing link always,
/// checksums with `--verify`. A refused restore writes nothing.
@Suite struct RestoreEngineTests {
    static func twoPoints(seed: UInt64) throws -> BackupScenario {
        let s = try BackupScenario(size: "16M", seed: seed)
        try s.dirty(writes: 6, maxOffset: 14 << 20)
        try s.backup()
        try s.dirty(writes: 3, maxOffset: 14 << 20)
        try s.backup()
        return s
    }

    static func expectRefused(_ s: BackupScenario, _ extra: [String], word: String,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let out = s.dir.file("out-\(UUID().uuidString.prefix(4)).raw")
        let result = try QBackupBinary.run(["restore", s.repo, "--to", out, "--format", "raw"] + extra)
        #expect(result.status == 1, "restore of a damaged point: exit \(result.status)", sourceLocation: sourceLocation)
        #expect(result.stderr.hasPrefix("qbackup: error:") && result.stderr.contains(word), "\(result.stderr)",
                sourceLocation: sourceLocation)
        #expect(!FileManager.default.fileExists(atPath: out), "a refused restore left \(out)", sourceLocation: sourceLocation)
    }

    /// The full layer lost its last cluster: reading it gave zeros where data was.
    @Test func aTruncatedLayerIsRefused() throws {
        let s = try Self.twoPoints(seed: 91)
        let full = s.layerPath(try s.layers()[0])
        let size = try #require(try FileManager.default.attributesOfItem(atPath: full)[.size] as? UInt64)
        try Tools.run("truncate", ["-s", String(size - 65536), full])
        for index in ["0", "1"] {
            try Self.expectRefused(s, ["--at", index], word: "bytes, the manifest says")
        }
    }

    /// Layer 1 replaced by another image of the same backing (and another size).
    @Test func aReplacedLayerIsRefused() throws {
        let s = try Self.twoPoints(seed: 92)
        let layers = try s.layers()
        let top = s.layerPath(layers[1])
        try FileManager.default.removeItem(atPath: top)
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", layers[0]["file"] as? String ?? "", "-F", "qcow2", top, "16M")
        try Tools.qemuIO(top, format: "qcow2", ["write -P 0x66 0 3M"])
        try Self.expectRefused(s, [], word: "layer 1")
    }

    /// One data byte changed keeps the size: only `--verify` (checksums) sees it.
    @Test func verifyChecksEveryLayersChecksum() throws {
        let s = try Self.twoPoints(seed: 93)
        let top = s.layerPath(try s.layers()[1])
        let size = try #require(try FileManager.default.attributesOfItem(atPath: top)[.size] as? UInt64)
        let old = try peek(top, at: size - 1, count: 1)[0]
        try poke(top, at: size - 1, [old ^ 0xff])
        try Self.expectRefused(s, ["--verify"], word: "checksum")
        // The undamaged point 0 restores with --verify.
        let out = s.dir.file("zero.raw")
        try s.qbackup(["restore", s.repo, "--to", out, "--at", "0", "--format", "raw", "--verify"])
        #expect(try s.same(out, s.references[0]))
    }
}
