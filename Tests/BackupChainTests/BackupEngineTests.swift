import Foundation
import Testing
import TestSupport

/// backup's argument rules: a new repository never takes over another one's bitmap, and a
/// bitmap name qbackup could not create is a usage error before the disk is even opened; a
/// broken chain is never extended.
@Suite struct BackupEngineTests {
    enum Break: String, CaseIterable, Sendable { case deleted, damaged }

    /// The dirty bytes of each bitmap of `disk`, by name (our `bitmap list`).
    static func dirtyBytes(_ disk: String) throws -> [String: Int] {
        let out = try QBackupBinary.run(["bitmap", "list", disk, "--output", "json"])
        let list = (try JSONHelpers.parse(out.stdout) as? [String: Any])?["bitmaps"] as? [[String: Any]] ?? []
        return Dictionary(uniqueKeysWithValues: list.map { ($0["name"] as? String ?? "", $0["dirty-bytes"] as? Int ?? -1) })
    }

    /// Issue 11 item 3: the newest layer file deleted, or damaged (a byte flipped in a data
    /// cluster), after more writes. `--incremental` refuses naming the broken chain and leaves
    /// the bitmap's dirty bytes and the repository as they were; auto mode takes a standalone
    /// full layer and says why (human: "taking a full backup: …", JSON: `reason`); every point
    /// that could be restored still restores byte-exact, and so does the new one.
    @Test(arguments: Break.allCases)
    func aBrokenChainIsNeverExtended(broken: Break) throws {
        let s = try BackupScenario(size: "64M", seed: broken == .deleted ? 86 : 87)
        try s.dirty(writes: 20, maxOffset: 60 << 20)
        try s.backup()
        for _ in 0..<2 {
            try s.dirty(writes: 4, maxOffset: 60 << 20)
            try s.backup()
        }
        let layers = try s.layers()
        let newest = s.layerPath(try #require(layers.last))
        switch broken {
        case .deleted:
            try FileManager.default.removeItem(atPath: newest)
        case .damaged:
            let map = try Tools.qemuImg("map", "--output=json", "-f", "qcow2", newest)
            let extents = try JSONHelpers.parse(map.stdout) as? [[String: Any]] ?? []
            let data = try #require(extents.first { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true })
            let offset = UInt64(try #require(data["offset"] as? Int)) + 100
            try poke(newest, at: offset, [try peek(newest, at: offset, count: 1)[0] ^ 0x5a])
        }
        try s.dirty(writes: 4, maxOffset: 60 << 20)
        let dirty = try Self.dirtyBytes(s.disk)
        #expect(dirty.values.contains { $0 > 0 }, "the writes left no dirty bytes: \(dirty)")
        let before = try BackupScenario.digests(s.repo)

        let refused = try QBackupBinary.run(["backup", s.disk, "--repo", s.repo, "--incremental"])
        #expect(refused.failedCleanly, "an incremental on a broken chain: exit \(refused.status) \(refused.stdout)\(refused.stderr)")
        #expect(refused.stderr.contains("chain is broken") && refused.stderr.contains((newest as NSString).lastPathComponent),
                "\(refused.stderr)")
        #expect(try Self.dirtyBytes(s.disk) == dirty, "the refused backup touched the bitmap")
        #expect(try BackupScenario.digests(s.repo) == before, "the refused backup changed the repository")

        let full: String
        if broken == .deleted {
            let out = try s.qbackup(["backup", s.disk, "--repo", s.repo])
            #expect(out.stdout.contains("taking a full backup: the chain is broken: layer 2"), "\(out.stdout)")
            #expect(out.stdout.contains("full backup: layer 3"), "\(out.stdout)")
            try s.snapshotReference()
            full = s.layerPath(try #require(try s.layers().last))
        } else {
            let out = try s.backup()
            #expect(out["kind"] as? String == "full" && out["index"] as? Int == 3, "\(out)")
            #expect((out["reason"] as? String)?.contains("the chain is broken: layer 2") == true, "\(out)")
            full = s.repo + "/" + (out["layer"] as? String ?? "")
        }
        let info = try JSONHelpers.parse(try Tools.qemuImg("info", "--output=json", full).stdout) as? [String: Any]
        #expect(info?["backing-filename"] == nil, "the new full layer is not standalone: \(info ?? [:])")
        try s.expectQemuCheckClean(full)
        for k in [0, 1] { try s.expectRestore(k, equals: s.references[k]) }
        try s.expectRestore(3, equals: s.references[3])
        // The new bitmap state continues from the full layer: the next incremental holds the next writes.
        try s.dirty(writes: 3, maxOffset: 60 << 20)
        #expect(try s.backup(["--incremental"])["kind"] as? String == "incremental")
        try s.expectRestore(4, equals: s.references[4])
    }

    /// Issue 11 item 5: `backup --repo A --bitmap nightly`, a write, `backup --repo B --bitmap
    /// nightly` reset A's bitmap, so A's next incremental missed the write.
    @Test func aNewRepositoryRefusesAnExistingBitmap() throws {
        let s = try BackupScenario(size: "16M", seed: 81, repoName: "A")
        try s.dirty(writes: 4, maxOffset: 14 << 20)
        try s.backup(["--bitmap", "nightly"])
        try s.dirty(writes: 3, maxOffset: 14 << 20)
        try s.snapshotReference()
        let b = s.dir.file("B")
        let refused = try QBackupBinary.run(["backup", s.disk, "--repo", b, "--bitmap", "nightly"])
        #expect(refused.status == 1, "\(refused.stdout)\(refused.stderr)")
        #expect(refused.stderr.hasPrefix("qbackup: error:") && refused.stderr.contains("--take-over-bitmap"), "\(refused.stderr)")
        #expect(!FileManager.default.fileExists(atPath: b + "/manifest.json"))
        // A's next incremental still has the write.
        try s.qbackup(["backup", s.disk, "--repo", s.repo, "--incremental"])
        try s.expectRestore(1, equals: s.references[1])
        // Asked for explicitly, the takeover works.
        try s.qbackup(["backup", s.disk, "--repo", b, "--bitmap", "nightly", "--take-over-bitmap"])
        try s.qbackup(["verify", b, "--image", s.disk])
    }

    /// Issue 11, weak spots: a bad `--bitmap` name is a usage error (exit 2) before the disk is
    /// read — here the disk does not even exist, so any other order fails differently.
    @Test(arguments: [
        ("empty", "''"), ("control character", "\"$(printf 'a\\tb')\""), ("DEL", "\"$(printf 'a\\177b')\""),
        ("invalid UTF-8", "\"$(printf 'a\\377b')\""), ("1024 bytes", "\"$(printf 'x%.0s' $(seq 1024))\""),
    ])
    func aBadBitmapNameIsAUsageError(_ what: String, _ shellWord: String) throws {
        let dir = TempDir("qbackup-bitmap-name")
        let binary = try QBackupBinary.path()
        let result = try Tools.run("bash", ["-c", "\"$0\" backup \"$1/missing.qcow2\" --repo \"$1/repo\" --bitmap \(shellWord)",
                                            binary, dir.path])
        #expect(result.status == 2, "\(what): exit \(result.status): \(result.stderr)")
        #expect(result.stderr.hasPrefix("qbackup: error: --bitmap"), "\(what): \(result.stderr)")
        #expect(!FileManager.default.fileExists(atPath: dir.file("repo")), "\(what): the repository folder was made")
    }

    /// The limits are on names qbackup creates: 1023 bytes of UTF-8 (non-ASCII included) is fine.
    @Test func aLongUnicodeBitmapNameIsAccepted() throws {
        let s = try BackupScenario(size: "4M", seed: 82)
        let name = String(repeating: "é", count: 511) + "x"  // 1023 bytes
        try s.qbackup(["backup", s.disk, "--repo", s.repo, "--bitmap", name])
        let info = try JSONHelpers.parse(try Tools.qemuImg("info", "--output=json", s.disk).stdout) as? [String: Any]
        let bitmaps = ((info?["format-specific"] as? [String: Any])?["data"] as? [String: Any])?["bitmaps"] as? [[String: Any]]
        #expect(bitmaps?.compactMap { $0["name"] as? String } == [name], "QEMU does not see the bitmap")
    }
}
