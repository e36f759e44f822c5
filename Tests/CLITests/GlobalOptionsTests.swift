import Foundation
import Testing
import TestSupport

/// Options every command shares.
@Suite struct GlobalOptionsTests {
    /// --quiet: a cron job's night prints nothing when all is well, and errors still reach stderr.
    @Test func quietSilencesSummariesNotErrors() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        let repo = dir.file("repo")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "16M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 1 0 1M"])
        let runs: [[String]] = [
            ["backup", disk, "--repo", repo, "--quiet"],
            ["backup", disk, "--repo", repo, "-q"],
            ["verify", repo, "--image", disk, "--quiet"],
            ["restore", repo, "--to", dir.file("out.qcow2"), "--quiet"],
            ["merge", repo, "--keep", "1", "--quiet"],
            ["create", dir.file("new.qcow2"), "1M", "--quiet"],
        ]
        for args in runs {
            let result = try QBackupBinary.run(args)
            #expect(result.status == 0, "\(args): \(result.stderr)")
            #expect(result.stdout.isEmpty && result.stderr.isEmpty, "\(args): '\(result.stdout)' '\(result.stderr)'")
        }
        // Without --quiet the same night says what it did.
        let loud = try QBackupBinary.run(["backup", disk, "--repo", repo])
        #expect(loud.status == 0 && loud.stdout.contains("backup: layer"), "\(loud.stdout)")
        // An error is never silenced.
        let failed = try QBackupBinary.run(["backup", dir.file("missing.qcow2"), "--repo", repo, "--quiet"])
        #expect(failed.status != 0)
        #expect(failed.stderr.hasPrefix("qbackup: error:"), "\(failed.stderr)")
    }
}
