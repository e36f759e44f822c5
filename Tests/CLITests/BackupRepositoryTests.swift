import Foundation
import Testing
import TestSupport

/// Errors about the repository folder say what is wrong in words (issue 11, weak spots).
@Suite struct BackupRepositoryTests {
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
