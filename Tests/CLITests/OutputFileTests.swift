import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Every command that writes a file the user named (restore in both formats, flatten in
/// both formats, create) goes through `OutputFile`: a temporary name beside OUT, renamed
/// only when complete. A killed or failed run leaves nothing at OUT that looks complete and
/// never removes what was there; an existing OUT is refused unless --force (issue 11, item 7).
@Suite struct OutputFileTests {
    /// A 24 MiB disk with data in several extents, and a repository with one full backup of it.
    static func fixture(_ dir: TempDir) throws -> (disk: String, repo: String) {
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "24M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x11 0 5M", "write -P 0x22 7M 3M", "write -z 12M 1M",
                                                 "write -P 0x33 15M 6M"])
        let repo = dir.file("repo")
        let backup = try QBackupBinary.run(["backup", disk, "--repo", repo])
        #expect(backup.status == 0, "\(backup.stderr)")
        return (disk, repo)
    }

    /// The names in `folder` other than `keep`.
    static func others(in folder: String, keep: Set<String>) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []).filter { !keep.contains($0) }.sorted()
    }

    static let writers: [[String]] = [
        ["restore", "REPO", "--to", "OUT", "--format", "raw"], ["restore", "REPO", "--to", "OUT", "--format", "qcow2"],
        ["flatten", "DISK", "OUT", "--format", "raw"], ["flatten", "DISK", "OUT"], ["flatten", "DISK", "OUT", "--compress", "zlib"],
    ]

    /// The real binary killed (SIGKILL, through the QBACKUP_CRASH_AFTER seam) before a seeded
    /// random write or fsync: OUT is absent, or still the file that was there before; the only
    /// leftover is one recognisable temporary file.
    @Test(arguments: writers)
    func killedAtSeededMomentsLeavesNoCompleteLookingOutput(_ command: [String]) throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        let out = dir.file("out.img")
        var rng = SeededRandom(seed: UInt64(command.joined().utf8.count) &* 7919)
        var kills = 0
        for round in 0..<8 {
            let previous = round % 2 == 1
            try? FileManager.default.removeItem(atPath: out)
            if previous { try Data("the user's file".utf8).write(to: URL(fileURLWithPath: out)) }
            for name in Self.others(in: dir.path, keep: ["disk.qcow2", "repo"]) where name.contains(".qbackup-") {
                try FileManager.default.removeItem(atPath: dir.file(name))
            }
            // Early points (every output has a few writes) and later ones (qcow2 has many).
            let n = Int.random(in: 1...(round < 5 ? 5 : 40), using: &rng)
            var arguments = command.map { $0 == "REPO" ? repo : $0 == "DISK" ? disk : $0 == "OUT" ? out : $0 }
            if previous { arguments.append("--force") }
            let run = try QBackupBinary.run(arguments, environment: ["QBACKUP_CRASH_AFTER": "\(n)"])
            if run.status == 0 {
                try Tools.qemuImg("compare", "-q", disk, out)
                continue
            }
            #expect(run.status == SIGKILL, "kill point \(n): exit \(run.status): \(run.stderr)")
            kills += 1
            if previous {
                #expect(try Data.contents(of: out) == Data("the user's file".utf8), "kill point \(n): OUT changed")
            } else {
                #expect(!FileManager.default.fileExists(atPath: out), "kill point \(n): OUT exists")
            }
            let left = Self.others(in: dir.path, keep: ["disk.qcow2", "repo", "out.img"])
            #expect(left.count <= 1 && left.allSatisfy { $0.hasPrefix(".out.img.qbackup-") && $0.hasSuffix(".tmp") },
                    "kill point \(n): \(left)")
        }
        #expect(kills >= 4, "only \(kills) of 8 runs were killed")
    }

    /// A kill -9 from outside at a seeded random moment during restore: OUT never appears
    /// partial (it is absent, or complete and equal to the disk).
    @Test(arguments: ["raw", "qcow2"])
    func killMinusNineDuringRestore(_ format: String) throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        var rng = SeededRandom(seed: format == "raw" ? 11 : 12)
        for _ in 0..<6 {
            let out = dir.file("out-\(UInt32.random(in: 0...UInt32.max, using: &rng)).\(format)")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try QBackupBinary.path())
            process.arguments = ["restore", repo, "--to", out, "--format", format]
            process.standardError = FileHandle.nullDevice
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            usleep(UInt32.random(in: 0...60_000, using: &rng))
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            if FileManager.default.fileExists(atPath: out) {
                try Tools.qemuImg("compare", "-q", "-F", format, disk, out)
            }
        }
    }

    /// flatten and create onto a full file system (a 4 MiB tmpfs): one error line, exit 1,
    /// no OUT and no temporary file left.
    @Test func fullFileSystemLeavesNothing() throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        let small = dir.file("small")
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: false)
        let mount = try Tools.run("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", small])
        try #require(mount.status == 0, "this test mounts a tmpfs and must run as root: \(mount.stderr)")
        defer { _ = try? Tools.run("umount", [small]) }
        let out = "\(small)/out"
        let commands: [[String]] = [
            ["flatten", disk, out], ["flatten", disk, out, "--format", "raw"], ["restore", repo, "--to", out],
            ["restore", repo, "--to", out, "--format", "raw"],
            // A 1 PiB disk's L1 table is 16 MiB of zeros.
            ["create", out, "1P"],
        ]
        for command in commands {
            let result = try QBackupBinary.run(command)
            #expect(result.status == 1 && result.failedCleanly, "\(command): exit \(result.status): \(result.stderr)")
            #expect(result.stderr.contains("No space left"), "\(command): \(result.stderr)")
            #expect(Self.others(in: small, keep: []).isEmpty, "\(command): left \(Self.others(in: small, keep: []))")
        }
    }

    /// An existing OUT is refused without --force (and left alone); with --force it is replaced.
    @Test(arguments: writers + [["create", "OUT", "1M"], ["create", "OUT", "1M", "-f", "raw"]])
    func existingOutputNeedsForce(_ command: [String]) throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        let out = dir.file("out.img")
        let old = Data("the user's file".utf8)
        try old.write(to: URL(fileURLWithPath: out))
        let arguments = command.map { $0 == "REPO" ? repo : $0 == "DISK" ? disk : $0 == "OUT" ? out : $0 }
        let refused = try QBackupBinary.run(arguments)
        #expect(refused.status == 1 && refused.failedCleanly, "exit \(refused.status): \(refused.stderr)")
        #expect(refused.stderr.contains("--force"), "\(refused.stderr)")
        #expect(try Data.contents(of: out) == old)
        let forced = try QBackupBinary.run(arguments + ["--force"])
        #expect(forced.status == 0, "\(forced.stderr)")
        if command[0] == "create" {
            #expect(try Tools.run("qemu-img", ["info", out]).status == 0)
        } else {
            try Tools.qemuImg("compare", "-q", disk, out)
        }
        #expect(Self.others(in: dir.path, keep: ["disk.qcow2", "repo", "out.img"]).isEmpty)
    }

    /// A symbolic link at --to survives: refused without --force, and a forced restore that
    /// fails (a damaged layer) removes only its own temporary file.
    @Test func symlinkAtTheOutputSurvivesAFailedRestore() throws {
        let dir = TempDir()
        let (_, repo) = try Self.fixture(dir)
        let out = dir.file("out.img")
        #expect(symlink("/nonexistent/target", out) == 0)
        let refused = try QBackupBinary.run(["restore", repo, "--to", out])
        #expect(refused.failedCleanly, "\(refused.stderr)")
        let layer = try #require(Self.others(in: repo, keep: []).first { $0.hasPrefix("full-") && $0.hasSuffix(".qcow2") })
        // Cut the layer short: its data clusters now lie past the end of the file.
        try Tools.run("truncate", ["-s", "600K", "\(repo)/\(layer)"])
        let failed = try QBackupBinary.run(["restore", repo, "--to", out, "--force"])
        #expect(failed.failedCleanly, "exit \(failed.status): \(failed.stderr)")
        var st = stat()
        #expect(lstat(out, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK, "the symbolic link was removed")
        #expect(Self.others(in: dir.path, keep: ["disk.qcow2", "repo", "out.img"]).isEmpty)
    }
}
