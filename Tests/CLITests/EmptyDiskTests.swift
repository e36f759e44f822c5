import Foundation
import Testing
import TestSupport

/// A 0-byte disk is a valid, empty disk: every command either works on it or says
/// clearly why it cannot (issue 11, item 12: these used to die with SIGILL, exit 132).
@Suite struct EmptyDiskTests {
    static func emptyDisk(_ dir: TempDir) throws -> String {
        let path = dir.file("empty.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "0")
        return path
    }

    /// QEMU cannot keep a persistent bitmap on a 0-byte disk either (its bitmap table would
    /// have no entries): `bitmap add` refuses with one error line and leaves the image as it was.
    @Test func bitmapAddRefusesCleanly() throws {
        let dir = TempDir()
        let disk = try Self.emptyDisk(dir)
        let before = try Data.contents(of: disk)
        let add = try QBackupBinary.run(["bitmap", "add", disk, "nightly"])
        #expect(add.status == 1 && add.failedCleanly, "\(add.status): \(add.stderr)")
        #expect(add.stderr.contains("0 bytes"), "\(add.stderr)")
        #expect(try Data.contents(of: disk) == before)
        #expect(try Tools.run("qemu-img", ["check", disk]).status == 0)
    }

    /// Full, incremental and auto backups of a 0-byte disk work; every point restores (both
    /// formats) to what QEMU calls identical; verify (with --image) and merge are content.
    @Test func backupAndRestoreOfAnEmptyDisk() throws {
        let dir = TempDir()
        let disk = try Self.emptyDisk(dir)
        let repo = dir.file("repo")
        for mode in [["--full"], [], ["--incremental"]] {
            let backup = try QBackupBinary.run(["backup", disk, "--repo", repo, "--output", "json"] + mode)
            #expect(backup.status == 0, "\(mode): \(backup.stderr)")
            let json = try JSONHelpers.parse(backup.stdout) as? [String: Any]
            #expect(json?["bytes-copied"] as? Int == 0)
            #expect(json?["virtual-size"] as? Int == 0)
        }
        #expect(try Tools.run("qemu-img", ["check", disk]).status == 0)
        for (format, index) in [("qcow2", "0"), ("raw", "2"), ("qcow2", "2")] {
            let out = dir.file("restored-\(index).\(format)")
            let restore = try QBackupBinary.run(["restore", repo, "--to", out, "--at", index, "--format", format])
            #expect(restore.status == 0, "\(restore.stderr)")
            try Tools.qemuImg("compare", "-f", "qcow2", "-F", format, disk, out)
            if format == "qcow2" { #expect(try Tools.run("qemu-img", ["check", out]).status == 0) }
        }
        let verify = try QBackupBinary.run(["verify", repo, "--image", disk])
        #expect(verify.status == 0, "\(verify.stdout) \(verify.stderr)")
        let merge = try QBackupBinary.run(["merge", repo, "--keep", "1"])
        #expect(merge.status == 0, "\(merge.stderr)")
        let list = try JSONHelpers.parse(try QBackupBinary.run(["list", repo, "--output", "json"]).stdout) as? [String: Any]
        #expect((list?["layers"] as? [Any])?.count == 1)
    }

    /// `--cluster-size 0` (dry run or not) is a usage error, before anything is opened or created.
    @Test(arguments: [["--dry-run"], []])
    func backupWithClusterSizeZeroIsAUsageError(_ extra: [String]) throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "1M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 7 0 64k"])
        let repo = dir.file("repo")
        let backup = try QBackupBinary.run(["backup", disk, "--repo", repo, "--cluster-size", "0"] + extra)
        #expect(backup.status == 2 && backup.failedCleanly, "\(backup.status): \(backup.stderr)")
        #expect(backup.stderr.contains("cluster size"), "\(backup.stderr)")
        #expect(!FileManager.default.fileExists(atPath: repo))
    }

    /// The image commands on a 0-byte disk (qcow2 and raw), checked against QEMU.
    @Test func imageCommandsOnAnEmptyDisk() throws {
        let dir = TempDir()
        let disk = try Self.emptyDisk(dir)
        let raw = dir.file("empty.raw")
        FileManager.default.createFile(atPath: raw, contents: nil)
        for image in [disk, raw] {
            for command in [["info"], ["info", "--output", "json"], ["map"], ["map", "--output", "json"]] {
                let result = try QBackupBinary.run(command + [image])
                #expect(result.status == 0, "\(command) \(image): \(result.stderr)")
            }
            #expect(try QBackupBinary.run(["compare", disk, image]).status == 0)
        }
        #expect(try QBackupBinary.run(["check", disk]).status == 0)
        for (name, options) in [("f1.qcow2", [String]()), ("f2.qcow2", ["--compress", "zstd"]), ("f3.raw", ["--format", "raw"])] {
            let out = dir.file(name)
            let flatten = try QBackupBinary.run(["flatten", disk, out] + options)
            #expect(flatten.status == 0, "\(name): \(flatten.stderr)")
            try Tools.qemuImg("compare", "-f", "qcow2", disk, out)
        }
        for options in [[String](), ["--cluster-size", "16K", "--extended-l2"], ["--refcount-bits", "1"]] {
            let out = dir.file("new-\(options.count).qcow2")
            let create = try QBackupBinary.run(["create", out, "0"] + options)
            #expect(create.status == 0, "\(options): \(create.stderr)")
            #expect(try Tools.run("qemu-img", ["check", out]).status == 0)
        }
        let top = dir.file("top.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", disk, "-F", "qcow2", top)
        #expect(try QBackupBinary.run(["commit", top]).status == 0)
        #expect(try Tools.run("qemu-img", ["check", disk]).status == 0)
    }
}
