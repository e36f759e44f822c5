import Foundation
import Testing
import TestSupport

/// backup's argument rules: a new repository never takes over another one's bitmap, and a
/// bitmap name qbackup could not create is a usage error before the disk is even opened.
@Suite struct BackupEngineTests {
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
