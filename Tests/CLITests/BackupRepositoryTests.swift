import Foundation
import Testing
import TestSupport

/// Errors about the repository folder say what is wrong in words (issue 11, weak spots), and
/// files in it that the repository does not own are never touched (issue 11 item 6).
@Suite struct BackupRepositoryTests {
    /// SHA-256 of a file.
    static func sha256(_ path: String) throws -> String {
        String(try Tools.run("sha256sum", [path]).stdout.prefix(64))
    }

    /// Issue 11 item 6: a qemu-img image named like a layer and a `*.partial` file of the user
    /// in the repository folder survive three backups, a merge and a merge that has nothing to
    /// merge, byte-identical; verify names them as foreign and still passes.
    @Test func foreignFilesInTheFolderAreNeverTouched() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "64M")
        try FileManager.default.createDirectory(atPath: repo, withIntermediateDirectories: false)
        let lookalike = repo + "/full-20250101T000000Z.qcow2"
        let partial = repo + "/x.qcow2.partial"
        try Tools.qemuImg("create", "-q", "-f", "qcow2", lookalike, "16M")
        try Tools.qemuIO(lookalike, format: "qcow2", ["write -P 7 0 1M"])
        try Data(repeating: 0x42, count: 70_000).write(to: URL(fileURLWithPath: partial))
        let expected = [lookalike: try Self.sha256(lookalike), partial: try Self.sha256(partial)]
        func expectUntouched(_ step: String) throws {
            for (path, digest) in expected {
                let now = FileManager.default.fileExists(atPath: path) ? try Self.sha256(path) : "missing"
                #expect(now == digest,
                        "\(step) changed or removed \((path as NSString).lastPathComponent)")
            }
        }
        for round in 0..<3 {
            try Tools.qemuIO(disk, format: "qcow2", ["write -P \(round + 1) \(round * 4)M 1M"])
            let out = try QBackupBinary.run(["backup", disk, "--repo", repo])
            #expect(out.status == 0, "backup \(round): \(out.stderr)")
            try expectUntouched("backup \(round)")
        }
        let merge = try QBackupBinary.run(["merge", repo, "--keep", "1"])
        #expect(merge.status == 0, "\(merge.stderr)")
        try expectUntouched("merge")
        let nothing = try QBackupBinary.run(["merge", repo, "--keep", "1"])
        #expect(nothing.status == 0 && nothing.stdout.contains("nothing to merge"), "\(nothing.stdout)\(nothing.stderr)")
        try expectUntouched("a merge with nothing to merge")
        let verify = try QBackupBinary.run(["verify", repo])
        #expect(verify.status == 0, "\(verify.stdout)\(verify.stderr)")
        for path in expected.keys {
            let name = (path as NSString).lastPathComponent
            #expect(verify.stderr.contains("qbackup: warning: \(name) is not a file of this repository"), "\(verify.stderr)")
        }
        try expectUntouched("verify")
    }

    /// `--repo` below a regular file: one error line naming the file that is not a folder,
    /// not "NSCocoaErrorDomain error 512".
    @Test func repositoryBelowARegularFile() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "1M")
        FileManager.default.createFile(atPath: dir.file("plain"), contents: Data("x".utf8))
        let result = try QBackupBinary.run(["backup", disk, "--repo", dir.file("plain/sub/repo")])
        #expect(result.status == 1 && result.failedCleanly, "exit \(result.status): \(result.stderr)")
        #expect(result.stderr.contains("\(dir.file("plain")) is a file, not a folder"), "\(result.stderr)")
        #expect(!result.stderr.contains("NSCocoaErrorDomain"), "\(result.stderr)")
    }
}
